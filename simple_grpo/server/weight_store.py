"""The reference server's copy of the published policy weights: the latest version only, as
`weights.safetensors` + `weights.json` in a folder, each upload validated (simple_grpo/wire/weights.py)
before it replaces the current one.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
import threading
from pathlib import Path
from typing import IO, Any

from simple_grpo.io import write_text_atomic
from simple_grpo.server.wsgi import ApiError
from simple_grpo.wire.weights import InvalidWeights, check_safetensors

WEIGHTS_FILE, META_FILE = "weights.safetensors", "weights.json"


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
            dtypes = sorted({v["dtype"] for k, v in header.items() if k != "__metadata__"})
            meta = {"version": self.version, "bytes": self.bytes, "sha256": self.sha.hexdigest(),
                    "dtype": dtypes[0] if len(dtypes) == 1 else ",".join(dtypes)}
            self.store._commit(self.tmp, meta)
            return meta
        finally:
            self.abort()

    def abort(self) -> None:
        self.file.close()
        self.tmp.unlink(missing_ok=True)


class WeightStore:
    """The latest published weights in `folder`: weights.safetensors + weights.json (version,
    bytes, sha256, dtype). Versions must increase; both files are replaced atomically, and a
    reader that opened the old file keeps reading the old version (POSIX rename semantics)."""

    def __init__(self, folder: str | Path | None):
        """folder None or "": a temporary folder, made at the first publish."""
        self._lock = threading.Lock()
        self._meta: dict[str, Any] | None = None
        self._folder = Path(folder).expanduser() if folder else None
        if self._folder is None:
            return
        self._folder.mkdir(parents=True, exist_ok=True)
        for stale in self._folder.glob(".upload-*.tmp"):
            stale.unlink(missing_ok=True)
        try:
            meta = json.loads((self.folder / META_FILE).read_text())
            if os.path.getsize(self.path()) == meta["bytes"]:
                self._meta = meta  # a restarted server keeps serving what it had
        except (OSError, ValueError, KeyError, TypeError):
            pass

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

    def _commit(self, tmp: Path, meta: dict[str, Any]) -> None:
        with self._lock:
            self._check_version(meta["version"])  # a concurrent publish may have won
            os.replace(tmp, self._folder / WEIGHTS_FILE)
            write_text_atomic(self._folder / META_FILE, json.dumps(meta))
            self._meta = meta

    def publish(self, chunks, version: int) -> dict[str, Any]:
        """In-process publish from an iterable of byte chunks."""
        writer = self.begin(version)
        try:
            for chunk in chunks:
                writer.write(chunk)
        except BaseException:
            writer.abort()
            raise
        return writer.commit()

    def reset(self) -> None:
        """A new training run: forget the published weights (their versions were another run's)."""
        with self._lock:
            if self._meta is not None and self._folder is not None:
                (self._folder / META_FILE).unlink(missing_ok=True)
                (self._folder / WEIGHTS_FILE).unlink(missing_ok=True)  # open readers keep their copy
            self._meta = None

    def open(self) -> tuple[dict[str, Any], IO[bytes]] | None:
        """The current metadata and an open handle on exactly that version, or None."""
        with self._lock:
            if self._meta is None:
                return None
            return dict(self._meta), open(self._folder / WEIGHTS_FILE, "rb")
