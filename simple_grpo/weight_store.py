"""Published policy weights: one safetensors file on disk, its metadata, streamed (de)serialising.

The trainer streams its state dict as safetensors (`iter_state_dict_safetensors`: the header, then
one tensor at a time, so no second full copy is held) to the reference server, which keeps only the
latest version as `weights.safetensors` + `weights.json` in a folder (`WeightStore`); generation
workers download it and `load_safetensors_file` it. Only the safetensors header (JSON) is ever
parsed from uploaded bytes: nothing is unpickled.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import struct
import tempfile
import threading
from pathlib import Path
from typing import IO, Any, Iterator, Mapping

import torch

from simple_grpo.checkpoint import write_text_atomic
from simple_grpo.wsgi import ApiError

WEIGHTS_FILE, META_FILE = "weights.safetensors", "weights.json"
MAX_HEADER_BYTES = 100 << 20  # the safetensors library's own limit
CHUNK = 1 << 20

# safetensors dtype name -> bytes per element
DTYPE_SIZES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "I16": 2, "U16": 2,
               "F16": 2, "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}
_TORCH_TO_ST = {torch.bool: "BOOL", torch.uint8: "U8", torch.int8: "I8", torch.int16: "I16",
                torch.float16: "F16", torch.bfloat16: "BF16", torch.int32: "I32",
                torch.float32: "F32", torch.int64: "I64", torch.float64: "F64"}


class InvalidWeights(ValueError):
    """The bytes are not a consistent safetensors file."""


# ---------------------------------------------------------------------------- serialising
def _prepared(t: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    t = t.detach()
    if dtype is not None and t.is_floating_point():
        t = t.to(dtype)
    if t.dtype not in _TORCH_TO_ST:
        raise TypeError(f"dtype {t.dtype} cannot be written as safetensors here")
    return t


def iter_state_dict_safetensors(state_dict: Mapping[str, torch.Tensor],
                                dtype: torch.dtype | None = None,
                                metadata: Mapping[str, str] | None = None,
                                chunk_bytes: int = CHUNK) -> Iterator[bytes]:
    """A safetensors file as a stream of byte chunks: the header, then each tensor's raw bytes,
    converting (to CPU, to `dtype` for floating-point tensors) one tensor at a time. Tensors that
    share storage (tied embeddings) are written once per key."""
    entries, offset = {}, 0
    for name, t in state_dict.items():
        st = _TORCH_TO_ST[dtype] if dtype is not None and t.is_floating_point() else None
        st = st or _TORCH_TO_ST.get(t.dtype)
        if st is None:
            raise TypeError(f"{name}: dtype {t.dtype} cannot be written as safetensors here")
        n = t.numel() * DTYPE_SIZES[st]
        entries[name] = {"dtype": st, "shape": list(t.shape), "data_offsets": [offset, offset + n]}
        offset += n
    header: dict[str, Any] = {"__metadata__": dict(metadata)} if metadata else {}
    header.update(entries)
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned, as safetensors writes it
    yield struct.pack("<Q", len(raw)) + raw
    for name, t in state_dict.items():
        t = _prepared(t, dtype).to("cpu").contiguous().reshape(-1)
        if t.numel() == 0:
            continue
        buf = memoryview(t.view(torch.uint8).numpy())  # little-endian hosts (x86, ARM)
        for i in range(0, len(buf), chunk_bytes):
            yield bytes(buf[i:i + chunk_bytes])


def state_dict_safetensors_bytes(state_dict: Mapping[str, torch.Tensor],
                                 dtype: torch.dtype | None = None) -> bytes:
    """The whole file in memory (small models, tests)."""
    return b"".join(iter_state_dict_safetensors(state_dict, dtype))


def load_safetensors_file(path: str | Path, device: str = "cpu") -> dict[str, torch.Tensor]:
    """The worker's side: the tensors of a downloaded file (no pickle involved)."""
    from safetensors.torch import load_file

    return load_file(str(path), device=device)


# ---------------------------------------------------------------------------- validating
def check_safetensors(f: IO[bytes], size: int) -> dict[str, Any]:
    """Parse only the header of the open file `f` (`size` bytes) and check that every tensor's
    dtype, shape and offsets fit the file exactly; return the header. Raises InvalidWeights."""
    if size < 8:
        raise InvalidWeights(f"not a safetensors file: {size} bytes")
    f.seek(0)
    (n,) = struct.unpack("<Q", f.read(8))
    if n > MAX_HEADER_BYTES or 8 + n > size:
        raise InvalidWeights(f"bad safetensors header length {n} for a {size}-byte file")
    try:
        header = json.loads(f.read(n))
    except (ValueError, RecursionError) as e:  # UnicodeDecodeError is a ValueError
        raise InvalidWeights(f"safetensors header is not JSON: {str(e)[:100]}") from None
    if not isinstance(header, dict):
        raise InvalidWeights("safetensors header is not a JSON object")
    meta = header.get("__metadata__", {})
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise InvalidWeights("__metadata__ must map strings to strings")
    spans = []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if not isinstance(info, dict) or not isinstance(info.get("dtype"), str) \
                or info["dtype"] not in DTYPE_SIZES:  # a list dtype is unhashable
            raise InvalidWeights(f"tensor {name!r}: missing or unknown dtype")
        shape, offs = info.get("shape"), info.get("data_offsets")
        if (not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape)
                or not isinstance(offs, list) or len(offs) != 2
                or not all(type(o) is int and o >= 0 for o in offs) or offs[0] > offs[1]):
            raise InvalidWeights(f"tensor {name!r}: bad shape {shape!r} or data_offsets {offs!r}")
        if offs[1] - offs[0] != math.prod(shape) * DTYPE_SIZES[info["dtype"]]:
            raise InvalidWeights(f"tensor {name!r}: {offs[1] - offs[0]} bytes do not fit "
                                 f"{info['dtype']} {shape}")
        spans.append((offs[0], offs[1], name))
    end = 0
    for begin, stop, name in sorted(spans):
        if begin != end:
            raise InvalidWeights(f"tensor {name!r} starts at {begin}, expected {end} "
                                 f"(overlapping or missing data)")
        end = stop
    if 8 + n + end != size:
        raise InvalidWeights(f"file is {size} bytes but the header describes {8 + n + end} "
                             f"(truncated or trailing bytes)")
    return header


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

    def open(self) -> tuple[dict[str, Any], IO[bytes]] | None:
        """The current metadata and an open handle on exactly that version, or None."""
        with self._lock:
            if self._meta is None:
                return None
            return dict(self._meta), open(self._folder / WEIGHTS_FILE, "rb")
