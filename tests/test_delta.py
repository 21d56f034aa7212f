"""Weight deltas on the wire (simple_grpo/wire/delta.py): encode -> frame -> apply gives back the
new file byte for byte, for a table of file pairs; chains of links apply in one pass; a corrupted
byte, a truncated body, a wrong base and a wrong sha256 are each detected (DeltaError), never a
silently wrong file."""
from __future__ import annotations

import hashlib
import io
import json
import struct

import pytest
import torch

from simple_grpo.wire import delta, delta_apply
from simple_grpo.wire.delta import DeltaError
from simple_grpo.wire.weights import state_dict_safetensors_bytes


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def flip(data: bytes, positions) -> bytes:
    out = bytearray(data)
    for i in positions:
        out[i] ^= 0x5A
    return bytes(out)


def weights_pair(dtype) -> tuple[bytes, bytes]:
    """Two published files of one model, a small optimizer-like step apart."""
    g = torch.Generator().manual_seed(0)
    sd = {f"w{i}": torch.randn(64, 96, generator=g) * 0.02 for i in range(4)}
    old = state_dict_safetensors_bytes(sd, dtype)
    new = state_dict_safetensors_bytes({k: v + torch.randn(v.shape, generator=g).sign() * 1e-5
                                        for k, v in sd.items()}, dtype)
    return old, new


def framed(old: bytes, new: bytes, **kw) -> bytes:
    enc = delta.encode_delta([old[:1000], old[1000:]], [new], from_version=3, to_version=4, **kw)
    with enc:
        return b"".join(enc.chunks(chunk_bytes=777))


def apply(base: bytes, blob: bytes) -> tuple[bytes, str]:
    out = io.BytesIO()
    got = delta_apply.apply_delta(io.BytesIO(base), io.BytesIO(blob), out, size=None)
    return out.getvalue(), got


RANDOM = torch.randint(0, 256, (3 * delta.CHUNK + 11,), generator=torch.Generator().manual_seed(1),
                       dtype=torch.uint8).numpy().tobytes()
CASES = {  # name -> (old, new)
    "bf16 weights, a small step": weights_pair(torch.bfloat16),
    "fp32 weights, a small step": weights_pair(None),
    "identical files": (RANDOM[:5000], RANDOM[:5000]),
    "every byte differs": (RANDOM[:4096], bytes(b ^ 0xFF for b in RANDOM[:4096])),
    "unrelated files": (RANDOM[:4096], RANDOM[4096:8192]),
    "over three chunks, odd length": (RANDOM, flip(RANDOM, [0, delta.CHUNK, 3 * delta.CHUNK + 10])),
    "empty files": (b"", b""),
}


@pytest.mark.parametrize("name", list(CASES))
def test_round_trip(name):
    old, new = CASES[name]
    blob = framed(old, new)
    header = delta.read_header(io.BytesIO(blob))
    assert header == {"format": 1, "codec": "zstd", "from_version": 3, "to_version": 4,
                      "bytes": len(new), "base_sha256": sha(old), "sha256": sha(new),
                      "body_bytes": header["body_bytes"]}
    (n,) = struct.unpack("<I", blob[8:12])
    assert len(blob) == 12 + n + header["body_bytes"]
    result, got = apply(old, blob)
    assert result == new and got == sha(new)
    if name == "identical files":
        assert len(blob) < 600  # the XOR is all zeros
    if name == "bf16 weights, a small step":
        assert len(blob) < 0.5 * len(new), (len(blob), len(new))


def test_no_delta_for_different_lengths_or_a_body_past_the_limit():
    old, new = RANDOM[:4096], RANDOM[4096:8192]  # unrelated: the XOR is as random as they are
    assert delta.encode_delta([old], [new + b"x"], from_version=1, to_version=2) is None
    assert delta.encode_delta([old], [new], from_version=1, to_version=2, max_body_bytes=len(new) // 2) is None
    enc = delta.encode_delta([old], [old], from_version=1, to_version=2, max_body_bytes=len(old) // 2)
    assert enc is not None and enc.header["body_bytes"] < 100
    enc.close()


def _body_start(blob: bytes) -> int:
    return 12 + struct.unpack("<I", blob[8:12])[0]


def _reheader(blob: bytes, **fields) -> bytes:
    h = delta.read_header(io.BytesIO(blob))
    return delta.pack(delta.MAGIC, {**h, **fields}) + blob[_body_start(blob):]


OLD, NEW = weights_pair(torch.bfloat16)
BLOB = framed(OLD, NEW)
BAD = {  # name -> (base, delta bytes, what the message says)
    "a corrupted byte at the body's start": (OLD, flip(BLOB, [_body_start(BLOB) + 5]), "corrupt"),
    "a corrupted byte mid-body": (OLD, flip(BLOB, [(_body_start(BLOB) + len(BLOB)) // 2]), "corrupt"),
    "a corrupted checksum (last byte)": (OLD, flip(BLOB, [len(BLOB) - 1]), "corrupt"),
    "a corrupted header byte": (OLD, flip(BLOB, [20]), "weight delta"),
    "truncated by one byte": (OLD, BLOB[:-1], "truncated"),
    "truncated by its checksum": (OLD, BLOB[:-4], "truncated"),
    "truncated mid-body": (OLD, BLOB[:(_body_start(BLOB) + len(BLOB)) // 2], "truncated"),
    "truncated in the header": (OLD, BLOB[:30], "truncated"),
    "trailing bytes": (OLD, BLOB + b"\0" * 9, "trailing"),
    "junk after the frame, inside the declared body": (
        OLD, _reheader(BLOB + b"\0" * 9, body_bytes=len(BLOB) - _body_start(BLOB) + 9), "corrupt|trailing"),
    "a wrong base (another file)": (NEW, BLOB, "another base"),
    "a wrong base (another length)": (OLD + b"\0" * 8, BLOB, "another base"),
    "a wrong sha256 declared": (OLD, _reheader(BLOB, sha256=sha(b"x")), "expected"),
    "a wrong base sha256 declared": (OLD, _reheader(BLOB, base_sha256=sha(b"x")), "another base"),
    "a wrong length declared": (OLD, _reheader(BLOB, bytes=len(NEW) - 2), "another base"),
    "another format version": (OLD, _reheader(BLOB, format=2), "format 2"),
    "bad magic": (OLD, b"SGWDELTX" + BLOB[8:], "bad magic"),
}


@pytest.mark.parametrize("name", list(BAD))
def test_every_damaged_delta_is_detected(name):
    base, blob, says = BAD[name]
    with pytest.raises(DeltaError, match=says) as e:
        apply(base, blob)
    assert "\n" not in str(e.value)


def chain_file(tmp_path, files: list[bytes], first: int = 10, damage=None) -> tuple:
    """A chain of len(files) - 1 links; `damage(link_index, bytes) -> bytes` spoils one."""
    links, bodies = [], []
    for i in range(len(files) - 1):
        blob = framed(files[i], files[i + 1])
        blob = _reheader(blob, from_version=first + i, to_version=first + i + 1)
        blob = damage(i, blob) if damage else blob
        links.append({"from_version": first + i, "to_version": first + i + 1, "bytes": len(blob)})
        bodies.append(blob)
    path = tmp_path / "chain"
    path.write_bytes(delta.pack_chain(links) + b"".join(bodies))
    (tmp_path / "base").write_bytes(files[0])
    return tmp_path / "base", path, tmp_path / "out"


def versions(n: int) -> list[bytes]:
    g = torch.Generator().manual_seed(2)
    sd = {"a": torch.randn(300, 70, generator=g), "b": torch.randn(999, generator=g)}
    out = []
    for _ in range(n):
        out.append(state_dict_safetensors_bytes(sd, torch.bfloat16))
        sd = {k: v + torch.randn(v.shape, generator=g) * 3e-3 for k, v in sd.items()}
    return out


def test_a_chain_applies_link_by_link_in_one_pass(tmp_path):
    files = versions(5)
    base, chain, out = chain_file(tmp_path, files)
    headers = delta_apply.apply_chain_file(base, chain, out, base_sha256=sha(files[0]), from_version=10)
    assert [(h["from_version"], h["to_version"]) for h in headers] == [(10, 11), (11, 12), (12, 13), (13, 14)]
    assert [h["sha256"] for h in headers] == [sha(f) for f in files[1:]]
    assert out.read_bytes() == files[-1]
    with open(chain, "rb") as f:
        head, spans = delta.read_chain(f, chain.stat().st_size)
    assert (head["from_version"], head["to_version"], len(spans)) == (10, 14, 4)


def test_a_chain_applies_in_place(tmp_path):
    """The worker's way: its own file rewritten; a damaged chain never leaves the target's bytes
    (the worker then downloads the full file)."""
    files = versions(4)
    base, chain, _ = chain_file(tmp_path, files)
    headers = delta_apply.apply_chain_file(base, chain, base_sha256=sha(files[0]), from_version=10)
    assert base.read_bytes() == files[-1] and headers[-1]["sha256"] == sha(files[-1])
    base, chain, _ = chain_file(tmp_path, files, damage=lambda i, b: flip(b, [len(b) - 20]) if i == 2 else b)
    with pytest.raises(DeltaError, match="corrupt"):
        delta_apply.apply_chain_file(base, chain, base_sha256=sha(files[0]), from_version=10)
    assert base.read_bytes() != files[-1]


@pytest.mark.parametrize("what, says", [
    ("a corrupted second link", "corrupt"),
    ("a link from another base", "another base"),
    ("a truncated chain", "truncated"),
    ("bytes after the last link", "trailing"),
    ("a gap between links", "not contiguous"),
    ("another start", "starts at version"),
    ("our file is another base", "does not apply"),
])
def test_a_damaged_chain_is_detected(tmp_path, what, says):
    files = versions(4)
    damage = None
    if what == "a corrupted second link":
        damage = lambda i, b: flip(b, [len(b) - 20]) if i == 1 else b  # noqa: E731
    elif what == "a link from another base":
        other = flip(files[1], [100])  # not version 11's file
        damage = lambda i, b: _reheader(framed(other, files[2]), from_version=11, to_version=12) \
            if i == 1 else b  # noqa: E731
    base, chain, out = chain_file(tmp_path, files, damage=damage)
    kw = {"base_sha256": sha(files[0]), "from_version": 10}
    if what == "a truncated chain":
        chain.write_bytes(chain.read_bytes()[:-3])
    elif what == "bytes after the last link":
        chain.write_bytes(chain.read_bytes() + b"\0" * 5)
    elif what == "a gap between links":
        raw = chain.read_bytes()
        with open(chain, "rb") as f:
            head, spans = delta.read_chain(f, len(raw))
        head["links"][1]["from_version"] = 99
        chain.write_bytes(delta.pack(delta.CHAIN_MAGIC, head) + raw[spans[0][0]:])
    elif what == "another start":
        kw["from_version"] = 9
    elif what == "our file is another base":
        kw["base_sha256"] = sha(files[1])
    with pytest.raises(DeltaError, match=says):
        delta_apply.apply_chain_file(base, chain, out, **kw)


def test_chain_header_round_trip():
    links = [{"from_version": 4, "to_version": 5, "bytes": 10}, {"from_version": 5, "to_version": 7, "bytes": 3}]
    raw = delta.pack_chain(links) + b"x" * 13
    head, spans = delta.read_chain(io.BytesIO(raw), len(raw))
    assert head == {"format": 1, "from_version": 4, "to_version": 7, "links": links}
    assert spans == [(len(raw) - 13, 10), (len(raw) - 3, 3)]
    assert json.loads(raw[12:12 + struct.unpack("<I", raw[8:12])[0]]) == head
