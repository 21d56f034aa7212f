"""Applying weight deltas (the format: simple_grpo/wire/delta.py): one pass over the base file,
however many links, into a new file whose sha256 is checked.

    sha = apply_delta(open("v3", "rb"), open("delta-3-4", "rb"), open("v4", "wb"))
    headers = apply_chain_file("v3", "chain", "v7", base_sha256=..., from_version=3)  # 3 -> 7
"""
from __future__ import annotations

import hashlib
import os
from typing import IO, Any, BinaryIO

import numpy as np
import zstandard

from simple_grpo.wire.delta import CHUNK, DeltaError, Behind, read_chain, read_header


class _Window:
    """Reads `size` bytes of `f` from `offset` (a link of a chain file): the zstd reader's input."""

    def __init__(self, f: IO[bytes], offset: int, size: int):
        self.f, self.left = f, size
        f.seek(offset)

    def read(self, n: int = -1) -> bytes:
        n = self.left if n is None or n < 0 else min(n, self.left)
        out = self.f.read(n)
        self.left -= len(out)
        return out


def _link_reader(f: IO[bytes], header: dict[str, Any], end: int | None):
    start = f.tell()
    if end is not None and end - start != header["body_bytes"]:
        raise DeltaError(f"weight delta {header['from_version']}->{header['to_version']} body is "
                         f"{end - start} bytes, its header says {header['body_bytes']} (truncated or "
                         f"trailing bytes)")
    window = _Window(f, start, header["body_bytes"])
    return zstandard.ZstdDecompressor().stream_reader(window, read_size=1 << 17), window


def _fill(f, view: memoryview) -> int:
    """readinto `view` until full or the end of `f` -> bytes read."""
    got = 0
    while got < len(view):
        n = f.readinto(view[got:])
        if not n:
            break
        got += n
    return got


def _read_link(reader, view: memoryview, header: dict[str, Any]) -> None:
    try:
        got = _fill(reader, view)
    except zstandard.ZstdError as e:
        raise DeltaError(f"weight delta {header['from_version']}->{header['to_version']} is "
                         f"corrupt: {e}") from None
    if got != len(view):
        raise DeltaError(f"weight delta {header['from_version']}->{header['to_version']} ends "
                         f"early (truncated)")


def apply_deltas(base: IO[bytes], deltas: list[tuple[IO[bytes], int | None]], out: BinaryIO,
                 base_sha256: str | None = None, from_version: int | None = None) -> list[dict]:
    """Apply consecutive deltas to the file `base` in one pass, writing the last version to `out`
    -> the links' headers (the result's sha256 is the last one's). `deltas`: (file positioned at a
    delta, the end offset of its body or None). Checked: the links' headers chain (each one's
    base_sha256 is the previous one's sha256, the first's is `base_sha256` when given, else the
    base file's, hashed on the way), each link's body (zstd's frame checksum, its exact length)
    and the result's sha256 -- which a wrong base or a wrong link cannot match, so intermediate
    versions are not hashed (one sha256 pass per link). Raises DeltaError; `out` then holds
    garbage."""
    headers = [read_header(f) for f, _ in deltas]
    if not headers:
        raise DeltaError("no weight delta to apply")
    want_base, version, size = base_sha256 or headers[0]["base_sha256"], from_version, headers[0]["bytes"]
    for h in headers:
        if (version is not None and h["from_version"] != version) or h["base_sha256"] != want_base \
                or h["bytes"] != size:
            raise DeltaError(f"weight delta {h['from_version']}->{h['to_version']} does not apply to "
                             f"version {version} (another base)")
        want_base, version = h["sha256"], h["to_version"]
    readers = [_link_reader(f, h, end) for (f, end), h in zip(deltas, headers)]
    sha, base_hash = hashlib.sha256(), None if base_sha256 else hashlib.sha256()
    width = min(CHUNK, max(size, 1))
    bufs, link, done = [np.empty(width, np.uint8) for _ in range(2)], np.empty(width, np.uint8), 0

    def emit(view):  # on the helper thread, one chunk behind
        sha.update(view)
        out.write(view)
    with Behind() as behind:
        while done < size:
            n = min(CHUNK, size - done)
            cur = bufs[done // CHUNK % 2]  # the other buffer may still be hashed and written
            view = memoryview(cur)[:n]
            got = _fill(base, view)
            if got != n:
                raise DeltaError(f"the base file ends after {done + got} bytes, the delta is for "
                                 f"{size} (another base)")
            if base_hash is not None:
                base_hash.update(view)
            for (reader, _), h in zip(readers, headers):
                _read_link(reader, memoryview(link)[:n], h)
                np.bitwise_xor(cur[:n], link[:n], out=cur[:n])
            behind.submit(emit, view)
            done += n
    if base.read(1):
        raise DeltaError(f"the base file is longer than the delta's {size} bytes (another base)")
    if base_hash is not None and base_hash.hexdigest() != headers[0]["base_sha256"]:
        raise DeltaError(f"weight delta {headers[0]['from_version']}->{headers[0]['to_version']} "
                         f"was made against another base file (sha256 differs)")
    for (reader, window), h in zip(readers, headers):
        if _read_tail(reader, h) or window.left:
            raise DeltaError(f"weight delta {h['from_version']}->{h['to_version']} does not end "
                             f"where its header says (truncated or trailing bytes)")
    h = headers[-1]
    if sha.hexdigest() != h["sha256"]:
        raise DeltaError(f"weight deltas to version {h['to_version']} give sha256 "
                         f"{sha.hexdigest()[:16]}..., expected {h['sha256'][:16]}... (a corrupt "
                         f"delta or another base)")
    return headers


def _read_tail(reader, header: dict[str, Any]) -> bytes:
    try:
        return reader.read(1)
    except zstandard.ZstdError as e:
        raise DeltaError(f"weight delta {header['from_version']}->{header['to_version']} is "
                         f"corrupt: {e}") from None


def apply_delta(base: IO[bytes], delta: IO[bytes], out: BinaryIO, size: int | None = None) -> str:
    """Apply one delta (the file `delta` from its position, `size` bytes; None: to its end) to
    `base` into `out` -> the sha256 of the result (checked against the delta's header)."""
    start = delta.tell()
    end = delta.seek(0, os.SEEK_END) if size is None else start + size
    delta.seek(start)
    return apply_deltas(base, [(delta, end)], out)[-1]["sha256"]


class _At:
    """One end of a file opened once for both: reads (readinto, read) or writes (write) at its own
    offset with pread / pwrite, so the helper thread can write chunk i while chunk i + 1 is read."""

    def __init__(self, fd: int):
        self.fd, self.offset = fd, 0

    def readinto(self, view: memoryview) -> int:
        n = os.preadv(self.fd, [view], self.offset)
        self.offset += n
        return n

    def read(self, n: int) -> bytes:
        out = os.pread(self.fd, n, self.offset)
        self.offset += len(out)
        return out

    def write(self, view: memoryview) -> int:
        done = 0
        while done < len(view):
            done += os.pwrite(self.fd, view[done:], self.offset + done)
        self.offset += done
        return done


def apply_chain_file(base_path, chain_path, out_path=None, base_sha256: str | None = None,
                     from_version: int | None = None) -> list[dict]:
    """Apply a chain file (pack_chain + links) to the file at base_path, writing out_path (None:
    base_path itself, in place) -> the links' headers; see apply_deltas. In place, the file is
    rewritten chunk by chunk: after a DeltaError it holds neither version (download the full
    file); it saves writing a second file (BENCHMARKS.md "Weight deltas")."""
    size = os.path.getsize(chain_path)
    with open(chain_path, "rb") as f:
        chain, spans = read_chain(f, size)
    if from_version is not None and chain["from_version"] != from_version:
        raise DeltaError(f"the chain starts at version {chain['from_version']}, not {from_version}")
    handles = [open(chain_path, "rb") for _ in spans]
    try:
        for h, (offset, _) in zip(handles, spans):
            h.seek(offset)
        links = [(h, off + n) for h, (off, n) in zip(handles, spans)]
        if out_path is None:
            fd = os.open(base_path, os.O_RDWR)
            try:
                headers = apply_deltas(_At(fd), links, _At(fd), base_sha256=base_sha256,
                                       from_version=chain["from_version"])
            finally:
                os.close(fd)
        else:
            with open(base_path, "rb") as base, open(out_path, "wb") as out:
                headers = apply_deltas(base, links, out, base_sha256=base_sha256,
                                       from_version=chain["from_version"])
    finally:
        for h in handles:
            h.close()
    if headers[-1]["to_version"] != chain["to_version"]:
        raise DeltaError("the chain's links do not end at its to_version")
    return headers
