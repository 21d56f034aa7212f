"""Weight deltas: version v of a published weights file as the byte-wise XOR against version p,
compressed with zstandard. Bit-exact by construction and blind to what the file holds (a full
state dict or a LoRA adapter): only two files of the same length have a delta.

One delta on the wire (format 1):

    b"SGWDELTA" | u32 little-endian n | n bytes of JSON header | body (one zstd frame)
    header = {"format": 1, "codec": "zstd", "from_version": p, "to_version": v,
              "bytes": length of both files, "base_sha256": sha256 of version p's file,
              "sha256": sha256 of version v's file, "body_bytes": length of the body}

A chain of deltas (the server's answer to GET /weights/delta?from=U):

    b"SGWCHAIN" | u32 n | JSON {"format": 1, "from_version": U, "to_version": V,
                                "links": [{"from_version", "to_version", "bytes"}, ...]} | the links

Everything streams in CHUNK pieces: `encode_delta` reads the two files as byte-chunk iterables
(the body goes to a spooled temporary file); `apply_deltas` (simple_grpo/wire/delta_apply.py)
reads the base file once and writes the result once however many links it applies. A corrupted,
truncated or misapplied delta always raises DeltaError (a bad frame, a zstd checksum error, a
length or a sha256 mismatch), never yields a silently wrong file.

    enc = encode_delta(old_chunks, new_chunks, from_version=3, to_version=4)  # None: lengths differ
    with open("new", "wb") as out:   # simple_grpo/wire/delta_apply.py
        sha = apply_delta(open("old", "rb"), io.BytesIO(b"".join(enc.chunks())), out)
"""
from __future__ import annotations

import hashlib
import json
import struct
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import IO, Any, Iterable, Iterator

import numpy as np
import zstandard

FORMAT = 1
MAGIC, CHAIN_MAGIC = b"SGWDELTA", b"SGWCHAIN"
LEVEL = 1  # zstandard level: benchmarks/delta_codec.py, BENCHMARKS.md "Weight deltas"
CHUNK = 4 << 20
MAX_HEADER = 1 << 16
SPOOL_BYTES = 64 << 20  # an encoded body up to this size stays in memory


class DeltaError(ValueError):
    """A delta or chain that cannot be applied: malformed, truncated, corrupted, or made against
    another base. The message is one line."""


# ---------------------------------------------------------------------------- framing
def pack(magic: bytes, header: dict[str, Any]) -> bytes:
    raw = json.dumps(header, separators=(",", ":")).encode()
    return magic + struct.pack("<I", len(raw)) + raw


def _read_exact(f: IO[bytes], n: int, what: str) -> bytes:
    out = f.read(n)
    if len(out) != n:
        raise DeltaError(f"{what} truncated: {len(out)} of {n} bytes")
    return out


def _unpack(f: IO[bytes], magic: bytes, what: str) -> dict[str, Any]:
    head = _read_exact(f, len(magic) + 4, what)
    if head[:len(magic)] != magic:
        raise DeltaError(f"not a {what}: bad magic {head[:len(magic)]!r}")
    (n,) = struct.unpack("<I", head[len(magic):])
    if n > MAX_HEADER:
        raise DeltaError(f"{what} header of {n} bytes is too large")
    try:
        header = json.loads(_read_exact(f, n, f"{what} header"))
    except ValueError as e:  # UnicodeDecodeError too
        raise DeltaError(f"{what} header is not JSON: {str(e)[:100]}") from None
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        got = header.get("format") if isinstance(header, dict) else None
        raise DeltaError(f"{what} format {got!r}, this reader knows {FORMAT}")
    return header


_INTS = ("from_version", "to_version", "bytes", "body_bytes")


def read_header(f: IO[bytes]) -> dict[str, Any]:
    """The header of the delta at `f`'s position (left at the start of its body)."""
    h = _unpack(f, MAGIC, "weight delta")
    if h.get("codec") != "zstd" or not all(type(h.get(k)) is int and h[k] >= 0 for k in _INTS) \
            or not all(isinstance(h.get(k), str) and len(h[k]) == 64 for k in ("sha256", "base_sha256")):
        raise DeltaError(f"weight delta header has bad fields: {json.dumps(h)[:200]}")
    return h


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
        if not isinstance(link, dict) or not all(type(link.get(k)) is int and link[k] >= 0
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
class _LengthsDiffer(Exception):
    pass


def _next_view(it: Iterator[bytes]) -> memoryview | None:
    for c in it:
        if len(c):
            return memoryview(c).cast("B")
    return None


def pairs(a_chunks: Iterable[bytes], b_chunks: Iterable[bytes]) -> Iterator[tuple[memoryview, memoryview]]:
    """Two byte streams side by side in pieces of equal length (at most CHUNK), without copying;
    raises _LengthsDiffer when one ends before the other."""
    a_it, b_it = iter(a_chunks), iter(b_chunks)
    a, b = _next_view(a_it), _next_view(b_it)
    while a is not None and b is not None:
        n = min(len(a), len(b), CHUNK)
        yield a[:n], b[:n]
        a, b = a[n:], b[n:]
        a = a if len(a) else _next_view(a_it)
        b = b if len(b) else _next_view(b_it)
    if a is not None or b is not None:
        raise _LengthsDiffer


class Behind:
    """Runs calls in order on one helper thread, at most one call behind the caller: sha256 and
    writes (which release the GIL) overlap with the next chunk's decompression and XOR."""

    def __init__(self):
        self.pool, self.pending = ThreadPoolExecutor(1, thread_name_prefix="delta"), None

    def submit(self, fn, *args) -> None:
        self.wait()
        self.pending = self.pool.submit(fn, *args)

    def wait(self) -> None:
        if self.pending is not None:
            pending, self.pending = self.pending, None
            pending.result()

    def __enter__(self) -> "Behind":
        return self

    def __exit__(self, *exc) -> None:
        try:
            self.wait()
        finally:
            self.pool.shutdown(wait=True)


@dataclass
class EncodedDelta:
    """A framed delta: `header`, then the body kept in a (spooled) temporary file."""
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


def encode_delta(base: Iterable[bytes], new: Iterable[bytes], *, from_version: int, to_version: int,
                 level: int = LEVEL, threads: int = 0, max_body_bytes: int | None = None,
                 base_sha256: str | None = None) -> EncodedDelta | None:
    """The delta that turns the file streamed by `base` into the one streamed by `new` -> an
    EncodedDelta, or None when the two lengths differ or the body grows past max_body_bytes
    (then a full file is the cheaper upload). `threads` > 0: zstandard's multithreaded mode;
    `base_sha256`: the base file's, when known (saves hashing it again)."""
    body = tempfile.SpooledTemporaryFile(max_size=SPOOL_BYTES)
    comp = zstandard.ZstdCompressor(level=level, write_checksum=True, threads=threads).compressobj()
    sha, base_sha = hashlib.sha256(), None if base_sha256 else hashlib.sha256()
    buf, n, written = np.empty(CHUNK, np.uint8), 0, 0

    def hash_pair(a, b):
        if base_sha is not None:
            base_sha.update(a)
        sha.update(b)
    try:
        with Behind() as behind:
            for a, b in pairs(base, new):
                behind.submit(hash_pair, a, b)
                x = buf[:len(b)]
                np.bitwise_xor(np.frombuffer(a, np.uint8), np.frombuffer(b, np.uint8), out=x)
                n += len(b)
                written += body.write(comp.compress(x))
                if max_body_bytes is not None and written > max_body_bytes:
                    body.close()
                    return None
            written += body.write(comp.flush())
    except _LengthsDiffer:
        body.close()
        return None
    except BaseException:
        body.close()
        raise
    if max_body_bytes is not None and written > max_body_bytes:
        body.close()
        return None
    header = {"format": FORMAT, "codec": "zstd", "from_version": from_version,
              "to_version": to_version, "bytes": n,
              "base_sha256": base_sha256 or base_sha.hexdigest(), "sha256": sha.hexdigest(),
              "body_bytes": written}
    return EncodedDelta(header, body)
