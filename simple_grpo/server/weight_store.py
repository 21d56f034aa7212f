"""The reference server's copy of the published policy weights: the latest version as
`weights.safetensors` + `weights.json` in a folder, each upload validated (simple_grpo/wire/weights.py)
before it replaces the current one, plus the last K deltas (`delta-P-V.sgwd`, simple_grpo/wire/delta.py)
that lead to it, for workers a few versions behind.

A delta upload (version V against base P) is rebuilt here into the full file of V from the current
full file (which must be P: else 412 and the trainer sends the full file), its sha256 checked
against the one the trainer declared, then committed with the delta kept as the newest link. A
full upload drops every delta (none leads to it). The folder holds at most the full file, K deltas
and one upload in progress (a delta and the file rebuilt from it).
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import threading
from pathlib import Path
from typing import IO, Any

from simple_grpo.io import write_text_atomic
from simple_grpo.server.wsgi import ApiError
from simple_grpo.wire import delta
from simple_grpo.wire.delta_apply import apply_deltas
from simple_grpo.wire.weights import InvalidWeights, check_safetensors

WEIGHTS_FILE, META_FILE, RUN_FILE = "weights.safetensors", "weights.json", "run.json"
DELTA_FILE = "delta-{}-{}.sgwd"


# ---------------------------------------------------------------------------- the store
class WeightWriter:
    """One upload in progress: write() chunks to a temp file, then commit() or abort()."""

    def __init__(self, store: "WeightStore", version: int):
        self.store, self.version, self.bytes = store, version, 0
        self.sha = hashlib.sha256()
        fd, name = tempfile.mkstemp(dir=store.folder, prefix=".upload-", suffix=".tmp")
        self.tmp, self.file = Path(name), os.fdopen(fd, "w+b")

    def write(self, chunk: bytes) -> None:
        self.file.write(chunk)
        self.sha.update(chunk)
        self.bytes += len(chunk)

    def commit(self) -> dict[str, Any]:
        """Validate, then make this the current version (ApiError 400 / 409 otherwise)."""
        try:
            self.file.flush()
            try:
                header = check_safetensors(self.file, self.bytes)
            except InvalidWeights as e:
                raise ApiError(400, f"invalid weights upload: {e}") from None
            os.fsync(self.file.fileno())
            self.file.close()
            meta = {"version": self.version, "bytes": self.bytes, "sha256": self.sha.hexdigest(),
                    "dtype": _dtype(header)}
            self.store._commit(self.tmp, meta)
            return meta
        finally:
            self.abort()

    def abort(self) -> None:
        self.file.close()
        self.tmp.unlink(missing_ok=True)


def _dtype(header: dict[str, Any]) -> str:
    dtypes = sorted({v["dtype"] for k, v in header.items() if k != "__metadata__"})
    return dtypes[0] if len(dtypes) == 1 else ",".join(dtypes)


class DeltaWriter(WeightWriter):
    """A delta upload in progress (version `version` against `base`): its bytes go to a temp
    file; commit() rebuilds the new version's full file from the current one, checks it, and
    commits both (ApiError 400 bad delta, 409 not newer, 412 the current version is not `base`)."""

    def __init__(self, store: "WeightStore", version: int, base: int):
        super().__init__(store, version)
        self.base = base

    def commit(self) -> dict[str, Any]:
        rebuilt = None
        try:
            self.file.flush()
            self.file.seek(0)
            try:
                h = delta.read_header(self.file)
            except delta.DeltaError as e:
                raise ApiError(400, f"invalid weight delta: {e}") from None
            if (h["from_version"], h["to_version"]) != (self.base, self.version):
                raise ApiError(400, f"the delta leads from version {h['from_version']} to "
                                    f"{h['to_version']}, the request says {self.base} to {self.version}")
            meta, base = self.store._open_base(self.base, h["base_sha256"])
            fd, name = tempfile.mkstemp(dir=self.store.folder, prefix=".upload-", suffix=".tmp")
            rebuilt = Path(name)
            self.file.seek(0)
            with base, os.fdopen(fd, "w+b") as out:
                try:
                    apply_deltas(base, [(self.file, self.bytes)], out, base_sha256=meta["sha256"],
                                 from_version=self.base)
                    out.flush()
                    header = check_safetensors(out, h["bytes"])
                except (delta.DeltaError, InvalidWeights) as e:
                    raise ApiError(400, f"invalid weight delta: {e}") from None
                os.fsync(out.fileno())
            os.fsync(self.file.fileno())
            self.file.close()
            full = {"version": self.version, "bytes": h["bytes"], "sha256": h["sha256"],
                    "dtype": _dtype(header)}
            link = {"from_version": self.base, "to_version": self.version, "bytes": self.bytes,
                    "base_sha256": h["base_sha256"], "sha256": h["sha256"]}
            self.store._commit(rebuilt, full, (self.tmp, link))
            return {**full, "delta_bytes": self.bytes}
        finally:
            self.abort()
            if rebuilt is not None:
                rebuilt.unlink(missing_ok=True)


class WeightStore:
    """The latest published weights in `folder`: weights.safetensors + weights.json (version,
    bytes, sha256, dtype), and up to `keep_deltas` deltas leading to it. Versions must increase;
    files are replaced atomically, and a reader that opened the old file keeps reading the old
    version (POSIX rename semantics)."""

    def __init__(self, folder: str | Path | None, keep_deltas: int = 0):
        """folder None or "": a temporary folder, made at the first publish."""
        self._lock = threading.Lock()
        self._meta: dict[str, Any] | None = None
        self._deltas: list[dict[str, Any]] = []  # oldest first, contiguous, ending at _meta's version
        self.keep = keep_deltas
        self._folder = Path(folder).expanduser() if folder else None
        if self._folder is None:
            return
        self._folder.mkdir(parents=True, exist_ok=True)
        for stale in self._folder.glob(".upload-*.tmp"):
            stale.unlink(missing_ok=True)
        try:
            meta = json.loads((self.folder / META_FILE).read_text())
            if os.path.getsize(self.path()) == meta["bytes"] and _sha256(self.path()) == meta["sha256"]:
                self._meta = meta  # a restarted server keeps serving what it had
        except (OSError, ValueError, KeyError, TypeError):
            pass
        self._deltas = self._restore_deltas()

    def _restore_deltas(self) -> list[dict[str, Any]]:
        """The delta files that still lead to the current version (the others are deleted)."""
        found = {}
        for p in self._folder.glob("delta-*.sgwd"):
            try:
                with open(p, "rb") as f:
                    h = delta.read_header(f)
                    if f.tell() + h["body_bytes"] == p.stat().st_size and \
                            p.name == DELTA_FILE.format(h["from_version"], h["to_version"]):
                        found[h["to_version"]] = {"from_version": h["from_version"],
                                                  "to_version": h["to_version"], "bytes": p.stat().st_size,
                                                  "base_sha256": h["base_sha256"], "sha256": h["sha256"]}
            except (OSError, delta.DeltaError):
                pass
        chain, want = [], self._meta and (self._meta["version"], self._meta["sha256"])
        while want and len(chain) < self.keep and (link := found.get(want[0])) and link["sha256"] == want[1]:
            chain.insert(0, link)
            want = (link["from_version"], link["base_sha256"])
        for p in self._folder.glob("delta-*.sgwd"):
            if p.name not in {DELTA_FILE.format(x["from_version"], x["to_version"]) for x in chain}:
                p.unlink(missing_ok=True)
        return chain

    @property
    def folder(self) -> Path:
        with self._lock:
            if self._folder is None:
                self._folder = Path(tempfile.mkdtemp(prefix="simple_grpo-weights-"))
            return self._folder

    def path(self) -> Path:
        return self.folder / WEIGHTS_FILE

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

    def _check_base(self, base: int, sha256: str | None) -> None:
        cur = self._meta
        if cur is None or cur["version"] != base or (sha256 is not None and cur["sha256"] != sha256):
            held = "no weights" if cur is None else f"version {cur['version']}"
            why = "another file" if cur is not None and cur["version"] == base else held
            raise ApiError(412, f"the server holds {why}, not the delta's base version {base}: "
                                f"upload the full file")

    def _open_base(self, base: int, sha256: str) -> tuple[dict[str, Any], IO[bytes]]:
        with self._lock:
            self._check_base(base, sha256)
            return dict(self._meta), open(self._folder / WEIGHTS_FILE, "rb")

    def _commit(self, tmp: Path, meta: dict[str, Any],
                link: tuple[Path, dict[str, Any]] | None = None) -> None:
        """Make `tmp` the current full file; with `link` = (its delta's temp file, the link) the
        delta becomes the newest link (else every delta goes: none leads to a full upload)."""
        with self._lock:
            self._check_version(meta["version"])  # a concurrent publish may have won
            if link is not None:
                self._check_base(link[1]["from_version"], link[1]["base_sha256"])
            os.replace(tmp, self._folder / WEIGHTS_FILE)
            if link is not None and self.keep > 0:
                os.replace(link[0], self._folder / DELTA_FILE.format(link[1]["from_version"],
                                                                     meta["version"]))
                self._deltas.append(link[1])
            else:
                self._drop_deltas(len(self._deltas))
            self._drop_deltas(len(self._deltas) - self.keep)
            write_text_atomic(self._folder / META_FILE, json.dumps(meta))
            self._meta = meta

    def _drop_deltas(self, n: int) -> None:
        """Delete the n oldest deltas (caller holds the lock)."""
        for link in self._deltas[:max(n, 0)]:
            (self._folder / DELTA_FILE.format(link["from_version"], link["to_version"])).unlink(missing_ok=True)
        del self._deltas[:max(n, 0)]

    def deltas(self) -> list[dict[str, int]]:
        """The kept deltas, oldest first: [{"from_version", "to_version", "bytes"}]."""
        with self._lock:
            return [{k: d[k] for k in ("from_version", "to_version", "bytes")} for d in self._deltas]

    def open_chain(self, from_version: int, sha256: str | None = None):
        """The deltas from `from_version` to the current version -> (current meta, links, open
        files), or (current meta, None, why there is none). from_version == current: ([], [])."""
        with self._lock:
            if self._meta is None:
                raise ApiError(404, "no weights published yet")
            meta, cur = dict(self._meta), self._meta["version"]
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
            if sha256 is not None and self._deltas[i]["base_sha256"] != sha256:
                return meta, None, f"version {from_version} here is another file (a new run?)"
            links = [dict(d) for d in self._deltas[i:]]
            files = [open(self._folder / DELTA_FILE.format(d["from_version"], d["to_version"]), "rb")
                     for d in links]
            return meta, links, files

    def publish(self, chunks, version: int) -> dict[str, Any]:
        """In-process publish from an iterable of byte chunks."""
        return _write_all(self.begin(version), chunks)

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
        with self._lock:
            if self._meta is not None and self._folder is not None:
                (self._folder / META_FILE).unlink(missing_ok=True)
                (self._folder / WEIGHTS_FILE).unlink(missing_ok=True)  # open readers keep their copy
            if self._folder is not None:
                self._drop_deltas(len(self._deltas))
            self._meta = None

    def delta_publish(self, chunks, version: int, base: int) -> dict[str, Any]:
        """In-process delta upload from an iterable of byte chunks (a framed delta)."""
        return _write_all(self.begin_delta(version, base), chunks)

    def open(self) -> tuple[dict[str, Any], IO[bytes]] | None:
        """The current metadata and an open handle on exactly that version, or None."""
        with self._lock:
            if self._meta is None:
                return None
            return dict(self._meta), open(self._folder / WEIGHTS_FILE, "rb")


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


def _sha256(path: Path) -> str:
    sha = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            sha.update(chunk)
    return sha.hexdigest()


def _write_all(writer, chunks) -> dict[str, Any]:
    """Feed `chunks` to an upload writer and commit it (aborted on any error)."""
    try:
        for chunk in chunks:
            writer.write(chunk)
    except BaseException:
        writer.abort()
        raise
    return writer.commit()
