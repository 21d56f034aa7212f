"""Policy weights on the wire: a safetensors file streamed one tensor at a time, and its checks.

The trainer streams its state dict as safetensors (`iter_state_dict_safetensors`: the header, then
one tensor at a time, so no second full copy is held) to the reference server, which validates it
with `check_safetensors` and keeps the latest version (simple_grpo/server/weight_store.py);
generation workers download it and `load_safetensors_file` it. Only the safetensors header (JSON)
is ever parsed from uploaded bytes: nothing is unpickled.
"""
from __future__ import annotations

import json
import math
import struct
from pathlib import Path
from typing import IO, Any, Iterator, Mapping

import torch

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


def publish_bytes(state: Mapping[str, torch.Tensor], dtype: torch.dtype | None) -> int:
    """Bytes of `state`'s tensors as published: floats in `dtype` (None: their own), tied tensors
    (one storage, two names) once, as the trainer's snapshot sends them. Reads only shapes and
    dtypes, so a model built on the meta device is measured without its weights."""
    seen, total = set(), 0
    for t in state.values():
        where = (t.untyped_storage()._cdata, t.storage_offset()) if t.is_meta else t.data_ptr()
        key = (where, t.dtype, tuple(t.shape), t.stride())  # on meta every data_ptr is 0
        if key in seen:
            continue
        seen.add(key)
        as_dtype = dtype if dtype is not None and t.is_floating_point() else t.dtype
        total += t.numel() * as_dtype.itemsize
    return total


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
