"""Weight deltas, tensor by tensor: version v of the published weights as the changes against
version p, made straight from the trainer's tensors and applied straight into a box's model (or a
server's file) -- no whole-file pass, rewrite or reload on either side.

Per tensor (its bytes in the publish dtype, seen as integers of the same width):
  same    nothing changed: no body
  sparse  few values changed: the positions (gaps between them, u32; u64 past 2**31 elements)
          then the changed values XORed with the old ones, one zstd frame
  dense   many changed: the XOR of the whole tensor, one zstd frame
whichever is smaller by element count (`SPARSE_BELOW`). Each tensor carries the xxh3-128 digest
of its new bytes; a version's digest is the xxh3-128 of its safetensors header and its tensors'
digests in file order (`version_digest`), the identity a box, the server and the trainer compare.

One delta on the wire (format 2):

    b"SGWDELT2" | u32 little-endian n | n bytes of JSON header | the tensors' bodies, in order
    header = {"format": 2, "codec": "zstd", "from_version": p, "to_version": v,
              "base_digest": version p's digest, "digest": version v's, "bytes": file length,
              "st_header": the new file's safetensors header (JSON text, padded),
              "tensors": [{"name", "enc", "count", "index", "body_bytes", "digest"}, ...],
              "body_bytes": the sum}

A chain (the server's answer to GET /weights/delta?from=U) frames consecutive deltas:

    b"SGWCHAIN" | u32 n | JSON {"format": 2, "from_version": U, "to_version": V,
                                "links": [{"from_version", "to_version", "bytes"}, ...]} | the links

The trainer's side is two passes (simple_grpo/train/publish.py): `read_changes` compares the live
tensors with the kept copy of the last version and updates that copy in place (only this pass
must finish before the optimizer changes the weights), then `finish` compresses and hashes on
threads into an EncodedDelta. Applying: simple_grpo/wire/delta_apply.py. A corrupt, truncated or
misapplied delta raises DeltaError (one line), never leaves a silently wrong tensor unnoticed.
"""
from __future__ import annotations

import json
import struct
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import IO, Any, Iterator

import torch
import xxhash
import zstandard

FORMAT = 2
MAGIC, CHAIN_MAGIC = b"SGWDELT2", b"SGWCHAIN"
LEVEL = 1  # zstandard level: BENCHMARKS.md "Weight deltas"
CHUNK_ELEMS = 1 << 24  # the read pass works on this many elements of a tensor at a time
SPARSE_BELOW = 1 / 8  # a tensor goes sparse when fewer than this fraction of its elements changed
MAX_HEADER = 64 << 20
SPOOL_BYTES = 64 << 20  # encoded bodies up to this size stay in memory
THREADS = 4
BITS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}  # itemsize -> same-width int
DENSE_INDEX = 4  # the index width a dense tensor's entry records (it has no positions)


class DeltaError(ValueError):
    """A delta or chain that cannot be applied: malformed, truncated, corrupted, or made against
    another base. The message is one line."""


# ---------------------------------------------------------------------------- digests
def bits(t: torch.Tensor) -> torch.Tensor:
    """`t`'s bytes as a flat tensor of same-width integers (a view when `t` is contiguous)."""
    return t.detach().contiguous().view(-1).view(BITS[t.element_size()])


def tensor_digest(t: torch.Tensor) -> str:
    """xxh3-128 of a tensor's bytes (read on the CPU)."""
    t = t.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    return xxhash.xxh3_128(memoryview(bits(t).numpy()).cast("B")).hexdigest() if t.numel() else \
        xxhash.xxh3_128(b"").hexdigest()


def version_digest(st_header: bytes, digests: list[str]) -> str:
    """A published version's identity: its safetensors header (with the 8-byte length) and its
    tensors' digests in file order."""
    h = xxhash.xxh3_128(st_header)
    for d in digests:
        h.update(bytes.fromhex(d))
    return h.hexdigest()


def digests(tensors: list[torch.Tensor], threads: int = THREADS) -> list[str]:
    """tensor_digest of each, on threads (xxhash releases the GIL)."""
    with ThreadPoolExecutor(threads) as pool:
        return list(pool.map(tensor_digest, tensors))


# ---------------------------------------------------------------------------- framing
def pack(magic: bytes, header: dict[str, Any]) -> bytes:
    raw = json.dumps(header, separators=(",", ":")).encode()
    return magic + struct.pack("<I", len(raw)) + raw


def read_exact(f: IO[bytes], n: int, what: str) -> bytes:
    out = f.read(n)
    if len(out) != n:
        raise DeltaError(f"{what} truncated: {len(out)} of {n} bytes")
    return out


def _unpack(f: IO[bytes], magic: bytes, what: str) -> dict[str, Any]:
    head = read_exact(f, len(magic) + 4, what)
    if head[:len(magic)] != magic:
        raise DeltaError(f"not a {what} of format {FORMAT}: bad magic {head[:len(magic)]!r}")
    (n,) = struct.unpack("<I", head[len(magic):])
    if n > MAX_HEADER:
        raise DeltaError(f"{what} header of {n} bytes is too large")
    try:
        header = json.loads(read_exact(f, n, f"{what} header"))
    except ValueError as e:  # UnicodeDecodeError too
        raise DeltaError(f"{what} header is not JSON: {str(e)[:100]}") from None
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        got = header.get("format") if isinstance(header, dict) else None
        raise DeltaError(f"{what} format {got!r}, this reader knows {FORMAT}")
    return header


def _ok_int(v) -> bool:
    return type(v) is int and v >= 0


def _ok_digest(v) -> bool:
    return isinstance(v, str) and len(v) == 32 and all(c in "0123456789abcdef" for c in v)


def read_header(f: IO[bytes]) -> dict[str, Any]:
    """The header of the delta at `f`'s position (left at the start of its bodies), checked."""
    h = _unpack(f, MAGIC, "weight delta")
    ok = h.get("codec") == "zstd" and all(_ok_int(h.get(k)) for k in
                                          ("from_version", "to_version", "bytes", "body_bytes")) \
        and _ok_digest(h.get("digest")) and _ok_digest(h.get("base_digest")) \
        and isinstance(h.get("st_header"), str) and isinstance(h.get("tensors"), list)
    total = 0
    for e in h.get("tensors") or []:
        ok = ok and isinstance(e, dict) and isinstance(e.get("name"), str) \
            and e.get("enc") in ("same", "sparse", "dense") and _ok_int(e.get("count")) \
            and _ok_int(e.get("body_bytes")) and e.get("index") in (4, 8) and _ok_digest(e.get("digest")) \
            and (e["enc"] != "same" or e["body_bytes"] == 0)
        total += e.get("body_bytes", 0) if ok else 0
    if not ok or total != h["body_bytes"]:
        raise DeltaError(f"weight delta header has bad fields: {json.dumps(h)[:200]}")
    described = _file_bytes(h["st_header"])
    if described != h["bytes"]:
        raise DeltaError(f"weight delta {h['from_version']}->{h['to_version']} says its file is "
                         f"{h['bytes']} bytes, its safetensors header describes {described}")
    return h


def _file_bytes(st_json: str) -> int | None:
    """The length of the safetensors file whose header (JSON text) this is, or None."""
    try:
        header = json.loads(st_json)
        end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    except (ValueError, KeyError, TypeError, IndexError, AttributeError):
        return None
    return 8 + len(st_json.encode()) + end if type(end) is int else None


def pack_chain(links: list[dict[str, int]]) -> bytes:
    """The chain header for links [{"from_version", "to_version", "bytes"}, ...] (contiguous)."""
    return pack(CHAIN_MAGIC, {"format": FORMAT, "from_version": links[0]["from_version"],
                              "to_version": links[-1]["to_version"], "links": links})


def read_chain(f: IO[bytes], size: int) -> tuple[dict[str, Any], list[tuple[int, int]]]:
    """A chain file of `size` bytes -> (its header, [(offset, bytes)] of each link), checked to
    fill the file exactly and to run contiguously from from_version to to_version."""
    h = _unpack(f, CHAIN_MAGIC, "weight delta chain")
    links, spans, at, version = h.get("links"), [], f.tell(), h.get("from_version")
    if not isinstance(links, list) or not links:
        raise DeltaError("weight delta chain has no links")
    for link in links:
        if not isinstance(link, dict) or not all(_ok_int(link.get(k))
                                                 for k in ("from_version", "to_version", "bytes")):
            raise DeltaError(f"weight delta chain has a bad link {str(link)[:100]}")
        if link["from_version"] != version:
            raise DeltaError(f"weight delta chain is not contiguous at version {version}")
        spans.append((at, link["bytes"]))
        at, version = at + link["bytes"], link["to_version"]
    if version != h.get("to_version") or at != size:
        raise DeltaError(f"weight delta chain is {size} bytes, its header describes {at} "
                         f"(truncated or trailing bytes)")
    return h, spans


# ---------------------------------------------------------------------------- encoding
@dataclass
class Change:
    """What the read pass found in one tensor: nothing, the changed positions and XORed values
    (sparse), or the XOR of the whole tensor written to a temporary file (dense: in memory it
    would be another full copy). Both are compressed later, on threads (`finish`)."""
    name: str
    numel: int
    parts: list[tuple[int, torch.Tensor, torch.Tensor]] = field(default_factory=list)  # (offset, idx, xor)
    count: int = 0  # elements changed
    dense: IO[bytes] | None = None


def read_changes(base: dict[str, torch.Tensor], live: dict[str, torch.Tensor],
                 threads: int = THREADS, ready: "torch.cuda.Event | None" = None) -> list[Change]:
    """Compare each live tensor (any device and float dtype) in `base`'s dtype with `base` (CPU,
    the last version's copy) and bring `base` up to it in place -> the changes, in `base`'s order.
    The one pass that reads the live weights: after it the optimizer may change them. Tensors run
    on `threads` threads; on a GPU the comparison runs there, on a stream of its own that first
    waits for `ready` (recorded after the optimizer step), and only the base crosses PCIe."""
    stream = None
    if any(t.is_cuda for t in live.values()):
        stream = torch.cuda.Stream(device=next(t.device for t in live.values() if t.is_cuda))
        if ready is not None:
            stream.wait_event(ready)

    def one(name: str) -> Change:
        if stream is None:
            return _read_tensor(name, base[name], live[name])
        with torch.cuda.stream(stream):
            return _read_tensor(name, base[name], live[name])
    with ThreadPoolExecutor(threads) as pool:
        return list(pool.map(one, base))


def _read_tensor(name: str, b: torch.Tensor, live: torch.Tensor) -> Change:
    b_flat, l_flat, n = bits(b), live.detach().reshape(-1), b.numel()
    assert live.numel() == n, f"{name}: {live.numel()} elements, the base has {n}"
    ch, limit, dev = Change(name, n), n * SPARSE_BELOW, live.device
    for off in range(0, n, CHUNK_ELEMS):
        new = bits(l_flat[off:off + CHUNK_ELEMS].to(b.dtype))  # on the live tensor's device
        old = b_flat[off:off + CHUNK_ELEMS]
        old_dev = old.to(dev, non_blocking=True) if dev.type != "cpu" else old
        if ch.dense is not None:  # dense: the XOR to the file, the new values into the base
            x = torch.bitwise_xor(old_dev, new).cpu()
            ch.count += int(torch.count_nonzero(x))
            ch.dense.write(memoryview(x.numpy()).cast("B"))
            old.copy_(new.cpu() if dev.type != "cpu" else new)
            continue
        idx = torch.nonzero(new != old_dev).view(-1)
        if len(idx):
            got, x = new[idx], old_dev[idx] ^ new[idx]
            idx, got, x = (idx.cpu(), got.cpu(), x.cpu()) if dev.type != "cpu" else (idx, got, x)
            ch.parts.append((off, idx.to(torch.int32), x))
            ch.count += len(idx)
            old[idx] = got
        if ch.count > limit:  # too many changes: the whole tensor's XOR instead
            ch.dense = tempfile.TemporaryFile(prefix="simple_grpo-delta-")
            parts = {p_off: (p_idx, p_x) for p_off, p_idx, p_x in ch.parts}
            for p_off in range(0, off + CHUNK_ELEMS, CHUNK_ELEMS):  # every chunk read so far,
                full = torch.zeros(min(CHUNK_ELEMS, n - p_off), dtype=b_flat.dtype)  # unchanged too
                if p_off in parts:
                    full[parts[p_off][0].long()] = parts[p_off][1]
                ch.dense.write(memoryview(full.numpy()).cast("B"))
            ch.parts = []
    return ch


def discard(changes: list[Change]) -> None:
    """Drop a read pass's changes that will not be encoded (their dense files are closed)."""
    for ch in changes:
        if ch.dense is not None:
            ch.dense.close()


def _dense_body(ch: Change, level: int) -> bytes:
    """A dense change's body: its XOR file, compressed as one zstd frame (the file is closed)."""
    comp, out = zstandard.ZstdCompressor(level=level, write_checksum=True).compressobj(), []
    with ch.dense as f:
        f.seek(0)
        while piece := f.read(CHUNK_ELEMS):
            out.append(comp.compress(piece))
    out.append(comp.flush())
    return b"".join(out)


def _sparse_body(ch: Change, level: int) -> tuple[bytes, int]:
    """A sparse change's body: the gaps between changed positions, then the XORed values -> (one
    zstd frame, index width)."""
    idx = torch.cat([p_idx.to(torch.int64) + off for off, p_idx, _ in ch.parts])
    vals = torch.cat([x for _, _, x in ch.parts])
    width = 4 if ch.numel < 2**31 else 8
    gaps = torch.diff(idx, prepend=idx.new_zeros(1)).to(torch.int32 if width == 4 else torch.int64)
    raw = memoryview(gaps.numpy()).cast("B").tobytes() + memoryview(vals.numpy()).cast("B").tobytes()
    return zstandard.ZstdCompressor(level=level, write_checksum=True).compress(raw), width


@dataclass
class EncodedDelta:
    """A framed delta: `header`, then the bodies kept in a (spooled) temporary file."""
    header: dict[str, Any]
    body: IO[bytes]

    @property
    def size(self) -> int:
        return len(pack(MAGIC, self.header)) + self.header["body_bytes"]

    def chunks(self, chunk_bytes: int = 1 << 20) -> Iterator[bytes]:
        yield pack(MAGIC, self.header)
        self.body.seek(0)
        while piece := self.body.read(chunk_bytes):
            yield piece

    def close(self) -> None:
        self.body.close()

    def __enter__(self) -> "EncodedDelta":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def finish(changes: list[Change], base: dict[str, torch.Tensor], st_header: bytes, *,
           from_version: int, to_version: int, base_digest: str, file_bytes: int,
           level: int = LEVEL, threads: int = THREADS,
           max_body_bytes: int | None = None) -> tuple[EncodedDelta | None, str, list[str]]:
    """The read pass's changes -> (the framed delta, or None when its bodies pass max_body_bytes
    (the full file is then the cheaper upload), the new version's digest, its tensors' digests).
    Compression and hashing run on `threads` threads; `base` (already the new version) is read."""
    def body(ch: Change) -> tuple[bytes, int]:
        if ch.dense is not None:
            return _dense_body(ch, level), DENSE_INDEX
        if not ch.count:
            return b"", 4
        return _sparse_body(ch, level)
    with ThreadPoolExecutor(threads) as pool:
        hashed = pool.map(tensor_digest, base.values())
        bodies = list(pool.map(body, changes))
        tensor_digests = list(hashed)
    digest = version_digest(st_header, tensor_digests)
    total = sum(len(b) for b, _ in bodies)
    if max_body_bytes is not None and total > max_body_bytes:
        return None, digest, tensor_digests
    spool = tempfile.SpooledTemporaryFile(max_size=SPOOL_BYTES)
    entries = []
    for ch, (raw, width), d in zip(changes, bodies, tensor_digests):
        enc = "dense" if ch.dense is not None else "sparse" if ch.count else "same"
        entries.append({"name": ch.name, "enc": enc, "count": ch.count, "index": width,
                        "body_bytes": len(raw), "digest": d})
        spool.write(raw)
    header = {"format": FORMAT, "codec": "zstd", "from_version": from_version,
              "to_version": to_version, "base_digest": base_digest, "digest": digest,
              "bytes": file_bytes, "st_header": st_header[8:].decode(), "tensors": entries,
              "body_bytes": total}
    return EncodedDelta(header, spool), digest, tensor_digests


def encode(base: dict[str, torch.Tensor], live: dict[str, torch.Tensor], st_header: bytes,
           **kw) -> tuple[EncodedDelta | None, str, list[str]]:
    """Both passes in one call (tests, benchmarks): `read_changes` then `finish`."""
    return finish(read_changes(base, live, kw.get("threads", THREADS)), base, st_header, **kw)

