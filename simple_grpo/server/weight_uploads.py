"""Uploads of published weights in progress on the reference server: a full file (`WeightWriter`)
or a delta (`DeltaWriter`) streamed to a temporary file in the store's folder, checked, then
committed to the store (simple_grpo/server/weight_store.py) or aborted."""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

from simple_grpo.server.wsgi import ApiError
from simple_grpo.wire import delta
from simple_grpo.wire.delta_apply import file_digest, published_dtypes
from simple_grpo.wire.weights import InvalidWeights, check_safetensors


class WeightWriter:
    """One upload in progress: write() chunks to a temp file, then commit() or abort()."""

    def __init__(self, store: "WeightStore", version: int):
        self.store, self.version, self.bytes = store, version, 0
        fd, name = tempfile.mkstemp(dir=store.folder, prefix=".upload-", suffix=".tmp")
        self.tmp, self.file = Path(name), os.fdopen(fd, "w+b")

    def write(self, chunk: bytes) -> None:
        self.file.write(chunk)
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
            meta = {"version": self.version, "bytes": self.bytes, "digest": file_digest(self.tmp)[0],
                    "dtype": _dtype(header)}
            self.store._commit_full(self.tmp, meta)
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
    file; commit() checks its header and makes it the newest link (ApiError 400 bad delta, 409 not
    newer, 412 the current version is not `base` or another file)."""

    def __init__(self, store: "WeightStore", version: int, base: int):
        super().__init__(store, version)
        self.base = base

    def commit(self) -> dict[str, Any]:
        try:
            self.file.flush()
            self.file.seek(0)
            try:
                h = delta.read_header(self.file)
                if self.file.tell() + h["body_bytes"] != self.bytes:
                    raise delta.DeltaError(f"the delta is {self.bytes} bytes, its header describes "
                                           f"{self.file.tell() + h['body_bytes']}")
                published_dtypes(h["st_header"])  # a readable safetensors header
            except delta.DeltaError as e:
                raise ApiError(400, f"invalid weight delta: {e}") from None
            if (h["from_version"], h["to_version"]) != (self.base, self.version):
                raise ApiError(400, f"the delta leads from version {h['from_version']} to "
                                    f"{h['to_version']}, the request says {self.base} to {self.version}")
            os.fsync(self.file.fileno())
            self.file.close()
            meta = {"version": self.version, "bytes": h["bytes"], "digest": h["digest"],
                    "dtype": _dtype(json.loads(h["st_header"]))}
            link = {"from_version": self.base, "to_version": self.version, "bytes": self.bytes,
                    "base_digest": h["base_digest"], "digest": h["digest"]}
            self.store._commit_link(self.tmp, meta, link)
            return {**meta, "delta_bytes": self.bytes}
        finally:
            self.abort()
