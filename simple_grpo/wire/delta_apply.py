"""Applying weight deltas (the format: simple_grpo/wire/delta.py) in place: into a box's model
tensors (`apply_chain_file(chain, targets, ...)`, on whatever device they live) or into a
safetensors file (`rebuild_file`, the server's full file, through a memory map). Only the changed
elements of a sparse tensor are touched; every tensor is checked against its digest once, after
the last link.

    targets = {name: param for name, param in params.items()}   # unique published names
    headers = apply_chain_file("chain", targets, from_version=3, base_digest=mine)   # 3 -> 7
    digest, per_tensor, header = file_digest("weights.safetensors")
"""
from __future__ import annotations

import json
import mmap
import os
import shutil
import struct
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch
import xxhash
import zstandard

from simple_grpo.wire.delta import (THREADS, DeltaError, bits, read_chain, read_exact,
                                    read_header, tensor_digest, version_digest)
from simple_grpo.wire.weights import InvalidWeights, check_safetensors

ST_DTYPES = {"BOOL": torch.bool, "U8": torch.uint8, "I8": torch.int8, "I16": torch.int16,
             "F16": torch.float16, "BF16": torch.bfloat16, "I32": torch.int32, "F32": torch.float32,
             "I64": torch.int64, "F64": torch.float64}


def st_prefix(st_json: str) -> bytes:
    """A safetensors header as it starts the file: u64 length, then the (padded) JSON."""
    raw = st_json.encode()
    return struct.pack("<Q", len(raw)) + raw


def published_dtypes(st_json: str) -> dict[str, torch.dtype]:
    """name -> torch dtype of each tensor a safetensors header lists (file order)."""
    try:
        header = json.loads(st_json)
        return {k: ST_DTYPES[v["dtype"]] for k, v in header.items() if k != "__metadata__"}
    except (ValueError, KeyError, TypeError, AttributeError):
        raise DeltaError("weight delta carries a bad safetensors header") from None


class _Work:
    """A target tensor as integers of the published width: a view of it when it already holds the
    published dtype (contiguous), else a converted copy written back by `commit`."""

    def __init__(self, target: torch.Tensor, dtype: torch.dtype):
        self.target = target
        same = target.dtype == dtype and target.is_contiguous()
        self.copy = None if same else target.detach().to(dtype).contiguous()
        self.bits = bits(target if same else self.copy)

    def commit(self) -> None:
        if self.copy is not None:
            with torch.no_grad():
                self.target.copy_(self.copy.view(self.target.shape))


def _decompress(raw: bytes, size: int, what: str) -> np.ndarray:
    """One zstd frame of exactly `size` bytes -> a writable array."""
    out = np.empty(size + 1, np.uint8)  # one byte more: a longer frame shows
    view, got = memoryview(out), 0
    try:
        with zstandard.ZstdDecompressor().stream_reader(raw, read_across_frames=False) as r:
            while got < len(view) and (n := r.readinto(view[got:])):
                got += n
    except zstandard.ZstdError as e:
        raise DeltaError(f"{what} is corrupt: {e}") from None
    if got != size:
        raise DeltaError(f"{what} holds {got} bytes, expected {size} (truncated or corrupt)")
    return out[:size]


def _apply_tensor(work: torch.Tensor, entry: dict[str, Any], raw: bytes, what: str) -> None:
    """XOR one tensor's body into `work` (flat integers of the published width), in place."""
    n, width, item = work.numel(), entry["index"], work.element_size()
    if entry["enc"] == "dense":
        x = torch.from_numpy(_decompress(raw, n * item, what).view(np.dtype(f"<i{item}")
                                                                     if item > 1 else np.uint8))
        work.bitwise_xor_(x.view(work.dtype).to(work.device))
        return
    count = entry["count"]
    buf = _decompress(raw, count * (width + item), what)
    gaps = torch.from_numpy(buf[:count * width].view(np.int32 if width == 4 else np.int64)).to(torch.int64)
    idx = torch.cumsum(gaps, 0)
    if count and (int(gaps[0]) < 0 or (count > 1 and int(gaps[1:].min()) <= 0) or int(idx[-1]) >= n):
        raise DeltaError(f"{what} has positions outside its {n} elements (corrupt)")
    vals = torch.from_numpy(buf[count * width:].view(np.uint8 if item == 1 else np.dtype(f"<i{item}")))
    idx, vals = idx.to(work.device), vals.view(work.dtype).to(work.device)
    work[idx] = work[idx] ^ vals


def apply_link(f: IO[bytes], works: dict[str, _Work], expect: tuple[int | None, str | None],
               end: int | None = None) -> dict[str, Any]:
    """Apply the delta at `f`'s position to `works` -> its header. `expect`: the (version, digest)
    it must start from (None: not checked)."""
    h = read_header(f)
    version, digest = expect
    if (version is not None and h["from_version"] != version) or \
            (digest is not None and h["base_digest"] != digest):
        raise DeltaError(f"weight delta {h['from_version']}->{h['to_version']} does not apply to "
                         f"version {version} (another base)")
    names = [e["name"] for e in h["tensors"]]
    if sorted(names) != sorted(works):
        missing, extra = sorted(set(works) - set(names))[:3], sorted(set(names) - set(works))[:3]
        raise DeltaError(f"weight delta {h['from_version']}->{h['to_version']} is for other tensors "
                         f"(missing {missing}, unexpected {extra})")
    if end is not None and end - f.tell() != h["body_bytes"]:
        raise DeltaError(f"weight delta {h['from_version']}->{h['to_version']} body is "
                         f"{end - f.tell()} bytes, its header says {h['body_bytes']} (truncated or "
                         f"trailing bytes)")
    for e in h["tensors"]:
        if e["enc"] != "same":
            what = f"weight delta {h['from_version']}->{h['to_version']} tensor {e['name']}"
            _apply_tensor(works[e["name"]].bits, e, read_exact(f, e["body_bytes"], what), what)
    return h


def verify(works: dict[str, _Work], last: dict[str, Any], threads: int = THREADS) -> None:
    """Every tensor against the last link's digests, and the version's digest; raises DeltaError
    naming the first tensor that differs."""
    order = [e["name"] for e in last["tensors"]]
    with ThreadPoolExecutor(threads) as pool:
        got = list(pool.map(lambda name: tensor_digest(works[name].bits), order))
    for e, d in zip(last["tensors"], got):
        if d != e["digest"]:
            raise DeltaError(f"weight deltas to version {last['to_version']}: tensor {e['name']} "
                             f"differs after applying them (a corrupt delta or another base)")
    if version_digest(st_prefix(last["st_header"]), got) != last["digest"]:
        raise DeltaError(f"weight deltas to version {last['to_version']}: the version digest "
                         f"differs (another file)")


def apply_chain_file(chain_path, targets: dict[str, torch.Tensor], from_version: int,
                     base_digest: str | None) -> list[dict[str, Any]]:
    """Apply a chain file (pack_chain + links) to `targets` (name -> tensor, unique published
    names, in place; a tensor of a wider float dtype than published takes the exact values) ->
    the links' headers. After a DeltaError the targets hold neither version (load the full file)."""
    size = os.path.getsize(chain_path)
    with open(chain_path, "rb") as f:
        chain, spans = read_chain(f, size)
        if chain["from_version"] != from_version:
            raise DeltaError(f"the chain starts at version {chain['from_version']}, not {from_version}")
        headers, works, expect = [], None, (from_version, base_digest)
        for offset, n in spans:
            f.seek(offset)
            if works is None:  # the dtypes of the first link's file (every version has the same)
                h0 = read_header(f)
                f.seek(offset)
                dtypes = published_dtypes(h0["st_header"])
                works = {k: _Work(t, dtypes.get(k, t.dtype)) for k, t in targets.items()}
            h = apply_link(f, works, expect, end=offset + n)
            headers.append(h)
            expect = (h["to_version"], h["digest"])
    verify(works, headers[-1])
    for w in works.values():
        w.commit()
    if headers[-1]["to_version"] != chain["to_version"]:
        raise DeltaError("the chain's links do not end at its to_version")
    return headers


# ---------------------------------------------------------------------------- files
def _spans(path) -> tuple[bytes, dict[str, tuple[str, int, int]]]:
    """A safetensors file's header bytes (with the length) and name -> (dtype, start, end)."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        try:
            header = check_safetensors(f, size)
        except InvalidWeights as e:
            raise DeltaError(f"{path}: {e}") from None
        f.seek(0)
        (n,) = struct.unpack("<Q", f.read(8))
        f.seek(0)
        prefix = f.read(8 + n)
    spans = {k: (v["dtype"], 8 + n + v["data_offsets"][0], 8 + n + v["data_offsets"][1])
             for k, v in header.items() if k != "__metadata__"}
    return prefix, dict(sorted(spans.items(), key=lambda kv: kv[1][1]))


def file_digest(path, threads: int = THREADS) -> tuple[str, dict[str, str]]:
    """A safetensors file's version digest and its tensors' digests (file order), hashed on
    threads from a memory map."""
    prefix, spans = _spans(path)  # a valid file: at least its 8-byte header length
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        view = memoryview(mm)
        try:
            with ThreadPoolExecutor(threads) as pool:
                got = list(pool.map(lambda s: xxhash.xxh3_128(view[s[1]:s[2]]).hexdigest(),
                                    spans.values()))
        finally:
            view.release()
    return version_digest(prefix, got), dict(zip(spans, got))


def rebuild_file(base_path, link_paths: list[Path], out_path, from_version: int,
                 base_digest: str) -> dict[str, Any]:
    """The file of the last link's version: base_path copied to out_path, then the links applied
    in place through a memory map (sparse tensors touch only their changed pages) -> the last
    link's header. The result is verified tensor by tensor; out_path is left behind on error."""
    shutil.copyfile(base_path, out_path)
    prefix, spans = _spans(out_path)
    with open(out_path, "r+b") as f:
        mm = np.memmap(f, dtype=np.uint8, mode="r+")
        try:
            targets = {}
            for name, (dtype, start, end) in spans.items():
                t = torch.from_numpy(mm[start:end])
                targets[name] = t.view(ST_DTYPES[dtype])
            works = {k: _Work(t, t.dtype) for k, t in targets.items()}
            expect, last = (from_version, base_digest), None
            for p in link_paths:
                with open(p, "rb") as lf:
                    last = apply_link(lf, works, expect, end=os.path.getsize(p))
                expect = (last["to_version"], last["digest"])
            new_prefix = st_prefix(last["st_header"])
            if len(new_prefix) != len(prefix):
                raise DeltaError(f"weight delta to version {last['to_version']} changes the file's "
                                 f"header length ({len(prefix)} -> {len(new_prefix)} bytes)")
            mm[:len(new_prefix)] = np.frombuffer(new_prefix, np.uint8)
            verify(works, last)
            mm.flush()
        finally:
            del mm
        os.fsync(f.fileno())  # the rebuilt file
    return last
