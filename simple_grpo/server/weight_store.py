"""The reference server's copy of the published policy weights: the latest version's metadata
(`weights.json`), a full file (`weights.safetensors`, described by `full.json`) and the deltas
(`delta-P-V.sgwd`, simple_grpo/wire/delta.py) that lead from it to the latest version and, for
workers a few versions behind, from before it.

A delta upload (version V against base P) is checked (its header, and P must be the latest version
with the digest the delta names: else 412 and the trainer sends the full file), written and
fsynced as the newest link: nothing is rebuilt on the upload's path. The full file follows in the
background every `max(keep_deltas, 1)` links, and at once when a full download asks for a version
it does not hold yet (`rebuild`: a copy of the full file with the links applied in place through a
memory map, each tensor verified). A full upload drops every delta (none leads to it). The folder
holds the full file, the links since it plus at most `keep_deltas` older ones, and one upload or
rebuild in progress.
"""
from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import threading
from pathlib import Path
from typing import IO, Any

from simple_grpo.io import write_text_atomic
from simple_grpo.server.wsgi import ApiError
from simple_grpo.wire import delta
from simple_grpo.server.weight_uploads import DeltaWriter, WeightWriter
from simple_grpo.wire.delta_apply import file_digest, rebuild_file

WEIGHTS_FILE, META_FILE, FULL_FILE, RUN_FILE = "weights.safetensors", "weights.json", "full.json", "run.json"
DELTA_FILE = "delta-{}-{}.sgwd"


# ---------------------------------------------------------------------------- the store
class WeightStore:
    """The latest published weights in `folder`; see the module docstring. Versions must increase;
    files are replaced atomically, and a reader that opened the old full file keeps reading it
    (POSIX rename semantics)."""

    def __init__(self, folder: str | Path | None, keep_deltas: int = 0):
        """folder None or "": a temporary folder, made at the first publish."""
        self._lock = threading.Lock()  # the metadata and the folder's files
        self._rebuilding = threading.Lock()  # one rebuild at a time
        self._meta: dict[str, Any] | None = None  # the latest version
        self._full: dict[str, Any] | None = None  # the version weights.safetensors holds
        self._deltas: list[dict[str, Any]] = []  # oldest first, contiguous, ending at _meta's version
        self._rebuild_error: str | None = None
        self.keep = keep_deltas
        self._folder = Path(folder).expanduser() if folder else None
        if self._folder is None:
            return
        self._folder.mkdir(parents=True, exist_ok=True)
        for stale in self._folder.glob(".upload-*.tmp"):
            stale.unlink(missing_ok=True)
        self._restore()

    def _restore(self) -> None:
        """A restarted server keeps serving what its folder holds: the full file (checked against
        its digest), the links that lead on from it, and up to `keep` that led to it (the others
        are deleted)."""
        try:
            full = json.loads((self._folder / FULL_FILE).read_text())
            if os.path.getsize(self.path()) == full["bytes"] and file_digest(self.path())[0] == full["digest"]:
                self._full = self._meta = full
        except (OSError, ValueError, KeyError, TypeError, delta.DeltaError):
            pass
        found = {}
        for p in self._folder.glob("delta-*.sgwd"):
            try:
                with open(p, "rb") as f:
                    h = delta.read_header(f)
                ok = p.name == DELTA_FILE.format(h["from_version"], h["to_version"])
            except (OSError, delta.DeltaError):
                ok = False
            if ok:
                found[h["from_version"]] = ({"from_version": h["from_version"], "to_version": h["to_version"],
                                             "bytes": p.stat().st_size, "base_digest": h["base_digest"],
                                             "digest": h["digest"]}, h)
        while self._meta is not None and (got := found.get(self._meta["version"])) \
                and got[0]["base_digest"] == self._meta["digest"]:
            link, h = got
            self._deltas.append(link)
            self._meta = {"version": h["to_version"], "bytes": h["bytes"], "digest": h["digest"],
                          "dtype": self._meta["dtype"]}
        ending = {link["to_version"]: link for link, _ in found.values()}  # and up to `keep` links
        want = self._full and (self._full["version"], self._full["digest"])  # that led to the full
        while want and len(self._deltas) < self._behind() + self.keep and (link := ending.get(want[0])) \
                and link["digest"] == want[1]:  # file, for workers a few versions behind
            self._deltas.insert(0, link)
            want = (link["from_version"], link["base_digest"])
        kept = {DELTA_FILE.format(x["from_version"], x["to_version"]) for x in self._deltas}
        for p in self._folder.glob("delta-*.sgwd"):
            if p.name not in kept:
                p.unlink(missing_ok=True)

    @property
    def folder(self) -> Path:
        with self._lock:
            if self._folder is None:
                self._folder = Path(tempfile.mkdtemp(prefix="simple_grpo-weights-"))
            return self._folder

    def path(self) -> Path:
        return self._folder / WEIGHTS_FILE

    def current(self) -> dict[str, Any] | None:
        with self._lock:
            return dict(self._meta) if self._meta else None

    def _check_version(self, version: int) -> None:
        cur = self._meta["version"] if self._meta else None
        if cur is not None and version <= cur:
            raise ApiError(409, f"weight version {version} is not newer than the current "
                                f"version {cur}")

    def begin(self, version: int) -> WeightWriter:
        """Start an upload of `version` (409 at once when it is not newer than the current)."""
        if type(version) is not int or version < 0:
            raise ApiError(400, f"version must be an int >= 0, got {version!r}")
        with self._lock:
            self._check_version(version)
        return WeightWriter(self, version)

    def begin_delta(self, version: int, base: int) -> DeltaWriter:
        """Start a delta upload of `version` against `base` (409 not newer, 412 base not current)."""
        if type(version) is not int or type(base) is not int or not 0 <= base < version:
            raise ApiError(400, f"need versions 0 <= from < version, got from={base!r} version={version!r}")
        with self._lock:
            self._check_version(version)
            self._check_base(base, None)
        return DeltaWriter(self, version, base)

    def _check_base(self, base: int, digest: str | None) -> None:
        cur = self._meta
        if cur is None or cur["version"] != base or (digest is not None and cur["digest"] != digest):
            held = "no weights" if cur is None else f"version {cur['version']}"
            why = "another file" if cur is not None and cur["version"] == base else held
            raise ApiError(412, f"the server holds {why}, not the delta's base version {base}: "
                                f"upload the full file")

    def _commit_full(self, tmp: Path, meta: dict[str, Any]) -> None:
        """Make the uploaded `tmp` the full file and the latest version; every delta goes."""
        with self._lock:
            self._check_version(meta["version"])  # a concurrent publish may have won
            os.replace(tmp, self._folder / WEIGHTS_FILE)
            self._drop_deltas(len(self._deltas))
            write_text_atomic(self._folder / FULL_FILE, json.dumps(meta))
            write_text_atomic(self._folder / META_FILE, json.dumps(meta))
            self._meta = self._full = meta

    def _commit_link(self, tmp: Path, meta: dict[str, Any], link: dict[str, Any]) -> None:
        """Make the uploaded delta `tmp` the newest link and its version the latest."""
        with self._lock:
            self._check_version(meta["version"])
            self._check_base(link["from_version"], link["base_digest"])
            os.replace(tmp, self._folder / DELTA_FILE.format(link["from_version"], meta["version"]))
            self._deltas.append(link)
            write_text_atomic(self._folder / META_FILE, json.dumps(meta))
            self._meta = meta
            due = self._behind() >= max(self.keep, 1)
        if due and not self._rebuilding.locked():
            threading.Thread(target=self._rebuild_quietly, name="weights-rebuild", daemon=True).start()

    def _behind(self) -> int:
        """Links between the full file and the latest version (caller holds the lock)."""
        return sum(d["to_version"] > self._full["version"] for d in self._deltas) if self._full else 0

    def _drop_deltas(self, n: int) -> None:
        """Delete the n oldest deltas (caller holds the lock)."""
        for link in self._deltas[:max(n, 0)]:
            (self._folder / DELTA_FILE.format(link["from_version"], link["to_version"])).unlink(missing_ok=True)
        del self._deltas[:max(n, 0)]

    def rebuild(self) -> dict[str, Any] | None:
        """Bring the full file up to the latest version (from the full file and the links after
        it) -> the full file's metadata. Old links beyond the newest `keep` go once the full file
        has passed them. Raises DeltaError when the links do not rebuild (a corrupt folder)."""
        with self._rebuilding:
            with self._lock:
                if self._full is None or self._meta is None or self._full["version"] == self._meta["version"]:
                    return dict(self._full) if self._full else None
                full, links = dict(self._full), [d for d in self._deltas if d["to_version"] > self._full["version"]]
                paths = [self._folder / DELTA_FILE.format(d["from_version"], d["to_version"]) for d in links]
                fd, name = tempfile.mkstemp(dir=self._folder, prefix=".upload-", suffix=".tmp")
                os.close(fd)
            out = Path(name)
            try:
                last = rebuild_file(self.path(), paths, out, full["version"], full["digest"])
                meta = {"version": last["to_version"], "bytes": last["bytes"], "digest": last["digest"],
                        "dtype": full["dtype"]}
                with self._lock:
                    if self._full is not None and self._full["version"] == full["version"] and \
                            any(d["to_version"] == meta["version"] for d in self._deltas):
                        os.replace(out, self._folder / WEIGHTS_FILE)
                        write_text_atomic(self._folder / FULL_FILE, json.dumps(meta))
                        self._full = meta
                        older = [d for d in self._deltas if d["to_version"] <= meta["version"]]
                        self._drop_deltas(len(older) - self.keep)
                    return dict(self._full)
            except delta.DeltaError:
                self._revert(full)
                raise
            finally:
                out.unlink(missing_ok=True)

    def _revert(self, full: dict[str, Any]) -> None:
        """Links that do not rebuild (a damaged folder): back to the full file's version, so the
        trainer's next delta is refused (412) and the full file comes instead."""
        with self._lock:
            if self._full is not None and self._full["version"] == full["version"]:
                self._drop_deltas(len(self._deltas))
                write_text_atomic(self._folder / META_FILE, json.dumps(self._full))
                self._meta = dict(self._full)

    def _rebuild_quietly(self) -> None:
        """The background rebuild, again at once while links committed during one leave the full
        file due (their commits saw a rebuild running and started none), until it is not due or
        stops advancing."""
        try:
            while True:
                before = self.full_version()
                after = (self.rebuild() or {}).get("version")
                self._rebuild_error = None
                with self._lock:
                    if after == before or self._behind() < max(self.keep, 1):
                        return
        except (OSError, delta.DeltaError) as e:  # the next full download tries again and says why
            self._rebuild_error = str(e)[:300]

    def deltas(self) -> list[dict[str, int]]:
        """The kept deltas, oldest first: [{"from_version", "to_version", "bytes"}]."""
        with self._lock:
            return [{k: d[k] for k in ("from_version", "to_version", "bytes")} for d in self._deltas]

    def full_version(self) -> int | None:
        """The version the full file holds (it may trail the latest by a few links)."""
        with self._lock:
            return self._full["version"] if self._full else None

    def open_chain(self, from_version: int, digest: str | None = None):
        """The deltas from `from_version` to the current version -> (current meta, links, open
        files), or (current meta, None, why there is none). from_version == current: ([], [])."""
        with self._lock:
            if self._meta is None:
                raise ApiError(404, "no weights published yet")
            meta, cur = dict(self._meta), self._meta["version"]
            if from_version == cur and digest is not None and digest != meta["digest"]:
                return meta, None, f"version {from_version} here is another file (a new run?)"
            if from_version == cur:
                return meta, [], []
            if from_version > cur:
                return meta, None, f"version {from_version} is newer than the server's {cur} (a new run?)"
            i = next((i for i, d in enumerate(self._deltas) if d["from_version"] == from_version), None)
            if i is None:
                oldest = self._deltas[0]["from_version"] if self._deltas else cur
                why = (f"older than the oldest delta kept (from {oldest}, --weight_deltas={self.keep})"
                       if from_version < oldest else "no delta starts there (a full upload since)")
                return meta, None, f"version {from_version} is {why}"
            if digest is not None and self._deltas[i]["base_digest"] != digest:
                return meta, None, f"version {from_version} here is another file (a new run?)"
            links = [dict(d) for d in self._deltas[i:]]
            files = [open(self._folder / DELTA_FILE.format(d["from_version"], d["to_version"]), "rb")
                     for d in links]
            return meta, links, files

    def publish(self, chunks, version: int) -> dict[str, Any]:
        """In-process publish from an iterable of byte chunks."""
        return _write_all(self.begin(version), chunks)

    def delta_publish(self, chunks, version: int, base: int) -> dict[str, Any]:
        """In-process delta upload from an iterable of byte chunks (a framed delta)."""
        return _write_all(self.begin_delta(version, base), chunks)

    def saved_run(self) -> str | None:
        """The run whose weights the folder holds (a restarted server's --weights_dir), if known."""
        try:
            return json.loads((self._folder / RUN_FILE).read_text())["run_id"] if self._folder else None
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def save_run(self, run_id: str) -> None:
        if self._folder is not None:
            write_text_atomic(self._folder / RUN_FILE, json.dumps({"run_id": run_id}))

    def reset(self) -> None:
        """A new training run: forget the published weights (their versions were another run's)."""
        with self._rebuilding, self._lock:
            if self._folder is not None:
                for name in (META_FILE, FULL_FILE, WEIGHTS_FILE):  # open readers keep their copy
                    (self._folder / name).unlink(missing_ok=True)
                self._drop_deltas(len(self._deltas))
            self._meta = self._full = None

    def open(self) -> tuple[dict[str, Any], IO[bytes]] | None:
        """The latest version's metadata and an open handle on exactly its full file (rebuilt
        first when the full file trails it; links that do not rebuild are dropped, and the full
        file's own version is served), or None."""
        if self.current() is None:
            return None
        try:
            self.rebuild()
        except (OSError, delta.DeltaError) as e:
            print(f"[ref_server] the weight deltas after version {self.full_version()} do not "
                  f"rebuild, dropped (the trainer's next publish sends the full file): {str(e)[:200]}",
                  file=sys.stderr, flush=True)
        with self._lock:
            if self._full is None:
                return None
            return dict(self._full), open(self._folder / WEIGHTS_FILE, "rb")


def disk_warning(folder: str | Path | None, limit_bytes: int) -> str | None:
    """A line when the weights folder (a temporary one when not given) has less free disk than
    two files of `limit_bytes` (the latest one and an upload in progress; the kept deltas are
    small), else None. Only a warning, never a refusal: the files published may be far smaller
    than the limit (bf16, a LoRA adapter), and scoring needs no disk."""
    where = Path(folder).expanduser() if folder else Path(tempfile.gettempdir())
    probe = where
    while not probe.exists() and probe != probe.parent:  # a folder made at the first publish
        probe = probe.parent
    try:
        free = shutil.disk_usage(probe).free
        held = (where / WEIGHTS_FILE).stat().st_size if folder and (where / WEIGHTS_FILE).exists() else 0
    except OSError:
        return None
    need = 2 * limit_bytes - held  # a file kept from before already takes its room
    if free >= need:
        return None
    return (f"the weights folder {where} has {free / 2**30:,.1f} GiB free; weights up to "
            f"--max_weights_mb={limit_bytes / 2**20:,.0f} need {need / 2**30:,.1f} GiB (the latest "
            f"file and an upload in progress), and an upload that does not fit fails: free space, "
            f"give another --weights_dir, or a lower --max_weights_mb (bf16 weights are half of "
            f"fp32, a LoRA adapter far less)")


def _write_all(writer, chunks) -> dict[str, Any]:
    """Feed `chunks` to an upload writer and commit it (aborted on any error)."""
    try:
        for chunk in chunks:
            writer.write(chunk)
    except BaseException:
        writer.abort()
        raise
    return writer.commit()
