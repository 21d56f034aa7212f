"""Weight deltas, format 2 (simple_grpo/wire/delta.py, delta_apply.py): the trainer's tensors ->
per-tensor same/sparse/dense bodies -> applied into a box's tensors (published or wider dtype) or
into the server's file gives the new version bit for bit; a version's digest is its file's; every
damaged delta or chain, or a link applied to another base, raises DeltaError."""
from __future__ import annotations

import io
import json
import struct
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import xxhash
import zstandard

from simple_grpo.wire import delta, delta_apply
from simple_grpo.wire.delta import DeltaError
from simple_grpo.wire.weights import iter_state_dict_safetensors
from conftest import file_version_digest

META = {"step": "7"}
SHAPES = {"emb": (64, 16), "w": (40, 30), "b": (30,), "s": (), "e": (0, 4)}  # 1024, 1200, 30, 1, 0
WIDER = {torch.bfloat16: torch.float32, torch.float32: torch.float64}


def ints(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(-1).view(delta.BITS[t.element_size()])


def assert_bits(got: dict, want: dict) -> None:
    """Each tensor of `got` holds `want`'s values exactly, in its own (same or wider) dtype."""
    assert got.keys() == want.keys()
    for k, v in want.items():
        assert got[k].shape == v.shape and torch.equal(ints(got[k]), ints(v.to(got[k].dtype))), k


def st_file(sd: dict, metadata=META) -> bytes:
    return b"".join(iter_state_dict_safetensors(sd, metadata=metadata))


def version0(dtype, shapes=SHAPES, seed=0) -> tuple[dict, dict]:
    """Random fp32 live tensors and their copy in the publish dtype (the trainer's base)."""
    g = torch.Generator().manual_seed(seed)
    live = {k: torch.randn(s, generator=g) for k, s in shapes.items()}
    return live, clone(live, dtype)


def stepped(live: dict, changes: dict, seed=1) -> dict:
    """`live` with changes[name] elements doubled (any int: those positions; every bit pattern of
    a nonzero value changes in any float dtype)."""
    g, out = torch.Generator().manual_seed(seed), {k: t.clone() for k, t in live.items()}
    for k, t in out.items():
        c = changes.get(k, 0)
        t.view(-1)[torch.randperm(t.numel(), generator=g)[:c] if isinstance(c, int) else torch.tensor(c)] *= 2
    return out


def clone(sd: dict, dtype=None) -> dict:
    return {k: v.to(dtype or v.dtype).clone() for k, v in sd.items()}


def encode_link(base: dict, live: dict, v: int, base_digest: str, **kw):
    """Link v -> v + 1 (`base` is brought to v + 1 in place) -> (header, framed bytes, version
    digest, tensor digests); header and bytes are None past max_body_bytes."""
    head = next(iter_state_dict_safetensors(base, metadata=META))
    size = len(head) + sum(t.numel() * t.element_size() for t in base.values())
    enc, digest, digests = delta.encode(base, live, head, from_version=v, to_version=v + 1,
                                        base_digest=base_digest, file_bytes=size, **kw)
    if enc is None:
        return None, None, digest, digests
    with enc:
        return enc.header, b"".join(enc.chunks(chunk_bytes=777)), digest, digests


def chain(*blobs: bytes, first: int = 0) -> bytes:
    """A chain file of links first -> first + 1 -> ... (their headers are not read)."""
    return delta.pack_chain([{"from_version": first + i, "to_version": first + i + 1, "bytes": len(b)}
                             for i, b in enumerate(blobs)]) + b"".join(blobs)


def apply(tmp_path, raw: bytes, box: dict, from_version: int, base_digest: str) -> list[dict]:
    path = tmp_path / "chain"
    path.write_bytes(raw)
    return delta_apply.apply_chain_file(path, box, from_version, base_digest)


def step_and_apply(tmp_path, dtype, changes: dict, shapes=SHAPES):
    """Version 0 -> 1 with `changes`, encoded, then applied to a box in the published dtype and
    one in a wider dtype: both hold version 1 bit for bit -> (link header, v1's file, d0, d1)."""
    live0, base = version0(dtype, shapes)
    boxes = [clone(base), clone(base, WIDER[dtype])]
    d0 = file_version_digest(st_file(base))
    live1 = stepped(live0, changes)
    head, blob, d1, _ = encode_link(base, live1, 0, d0)
    assert_bits(base, clone(live1, dtype))  # the base is version 1 now
    for box in boxes:
        got = apply(tmp_path, chain(blob), box, 0, d0)
        assert [(h["from_version"], h["to_version"], h["digest"]) for h in got] == [(0, 1, d1)]
        assert_bits(box, base)
    return head, st_file(base), d0, d1


ROUND = {  # name -> (publish dtype, elements changed (count), enc of emb, w, b, s, e)
    # bf16: a few changes go sparse, all of them dense, none (and the empty tensor) stay same
    "bf16": (torch.bfloat16, {"emb": 3, "w": 1200, "s": 1}, ["sparse", "dense", "same", "dense", "same"]),
    # fp32 publish dtype (the base is full precision): the same mix, 4-byte elements
    "fp32": (torch.float32, {"emb": 3, "w": 1200, "s": 1}, ["sparse", "dense", "same", "dense", "same"]),
    # at the limit, n/8, a tensor stays sparse: 128 of 1024, 150 of 1200, 3 of 30
    "at the sparse limit": (torch.bfloat16, {"emb": 128, "w": 150, "b": 3},
                            ["sparse", "sparse", "sparse", "same", "same"]),
    # one past it goes dense: 129 of 1024, 151 of 1200, 4 of 30
    "past the limit": (torch.bfloat16, {"emb": 129, "w": 151, "b": 4},
                       ["dense", "dense", "dense", "same", "same"]),
}


@pytest.mark.parametrize("case", list(ROUND))
def test_round_trip_is_bit_exact(tmp_path, case):
    dtype, changes, encs = ROUND[case]
    head, v1, d0, d1 = step_and_apply(tmp_path, dtype, changes)
    assert [(e["name"], e["enc"], e["count"]) for e in head["tensors"]] == \
        [(k, enc, changes.get(k, 0)) for k, enc in zip(SHAPES, encs)]
    assert (head["from_version"], head["to_version"], head["base_digest"], head["digest"], head["bytes"]) \
        == (0, 1, d0, d1, len(v1)) and d1 == file_version_digest(v1)


MID = [*range(300), *range(1000, 1300), 3000, 4499]
CHUNKED = [  # (publish dtype, changed positions of a 4500-element tensor, enc), in chunks of 1000
    # changes in chunks 0, 2 and 4 (1 and 3 unchanged): sparse across chunks
    pytest.param(torch.bfloat16, [0, 999, 2000, 2500, 4499], "sparse", id="sparse across chunks"),
    # every 8th element: 562 changes reach the limit (562.5) without passing it
    pytest.param(torch.bfloat16, list(range(0, 4496, 8)), "sparse", id="at the limit across chunks"),
    # the limit passed in the first chunk; the later ones unchanged
    pytest.param(torch.bfloat16, list(range(1000)), "dense", id="dense from the first chunk"),
    # 300 + 300 changes pass the limit in the second chunk; chunk 2 unchanged, 3 and 4 changed
    pytest.param(torch.bfloat16, MID, "dense", id="dense from mid-tensor"),
    # the same with 4-byte elements
    pytest.param(torch.float32, MID, "dense", id="dense from mid-tensor, fp32"),
    # an unchanged first chunk, then the limit passed in the second
    pytest.param(torch.bfloat16, list(range(1000, 2000)), "dense", id="dense after an unchanged chunk"),
]


@pytest.mark.parametrize("dtype, positions, enc", CHUNKED)
def test_tensors_past_a_chunk_round_trip(tmp_path, monkeypatch, dtype, positions, enc):
    monkeypatch.setattr(delta, "CHUNK_ELEMS", 1000)
    head, *_ = step_and_apply(tmp_path, dtype, {"big": positions}, {"big": (4500,), "b": (30,)})
    assert [(e["enc"], e["count"]) for e in head["tensors"]] == [(enc, len(positions)), ("same", 0)]


def test_version_digest_is_the_files(tmp_path):
    live0, base = version0(torch.bfloat16)
    head, _, d1, digests = encode_link(base, stepped(live0, {"emb": 5, "w": 1200}), 0, "0" * 32)
    path = tmp_path / "v1.safetensors"
    path.write_bytes(st_file(base))
    got, per_tensor = delta_apply.file_digest(path)
    assert got == d1 == file_version_digest(path.read_bytes())
    assert list(per_tensor) == list(SHAPES)
    assert list(per_tensor.values()) == digests == [e["digest"] for e in head["tensors"]] == \
        [xxhash.xxh3_128(ints(t).numpy().tobytes()).hexdigest() for t in base.values()]
    assert file_version_digest(st_file(base, {"step": "8"})) != d1  # the header is part of it


def test_a_chain_applies_link_by_link_and_rebuilds_the_file(tmp_path):
    live, base = version0(torch.bfloat16)
    (tmp_path / "v5").write_bytes(st_file(base))
    digests, links = [file_version_digest(st_file(base))], [tmp_path / f"link{v}" for v in (5, 6, 7)]
    step_box, box = clone(base), clone(base, torch.float32)
    for v, path in zip((5, 6, 7), links):
        live = stepped(live, {"emb": 5, "w": 1200, "s": 1}, seed=v)
        _, blob, d, _ = encode_link(base, live, v, digests[-1])
        path.write_bytes(blob)
        digests.append(d)
        apply(tmp_path, chain(blob, first=v), step_box, v, digests[-2])  # one link at a time
        assert_bits(step_box, base)
    got = apply(tmp_path, chain(*map(Path.read_bytes, links), first=5), box, 5, digests[0])  # all in one
    assert [(h["from_version"], h["to_version"], h["digest"]) for h in got] == \
        [(5, 6, digests[1]), (6, 7, digests[2]), (7, 8, digests[3])]
    assert_bits(box, base)
    last = delta_apply.rebuild_file(tmp_path / "v5", links, tmp_path / "v8", 5, digests[0])  # the server's
    assert (tmp_path / "v8").read_bytes() == st_file(base) and last["digest"] == digests[-1]


def _scenario() -> SimpleNamespace:
    """One bf16 link 0 -> 1: emb sparse (5 changes), w and s dense, b and e same."""
    live0, base0 = version0(torch.bfloat16)
    d0 = file_version_digest(st_file(base0))
    head, blob, d1, _ = encode_link(clone(base0), stepped(live0, {"emb": 5, "w": 1200, "s": 1}), 0, d0)
    other = clone(base0)
    other["emb"].view(-1)[0] *= 2  # another base: one value differs
    at, spans = 12 + struct.unpack("<I", blob[8:12])[0], {}  # where each tensor's body lies
    for e in head["tensors"]:
        spans[e["name"]], at = slice(at, at + e["body_bytes"]), at + e["body_bytes"]
    return SimpleNamespace(base0=base0, d0=d0, d1=d1, head=head, blob=blob, other=other, body=spans)


D = _scenario()


def flip(data: bytes, i: int) -> bytes:
    return data[:i] + bytes([data[i] ^ 0x5A]) + data[i + 1:]


def edit(bodies: dict | None = None, drop: tuple = (), entry: dict | None = None, **fields) -> bytes:
    """D.blob re-framed: bodies replaced (sizes fixed up), then header fields set or dropped and
    tensor entries changed (entry: name -> fields)."""
    h = json.loads(json.dumps(D.head))
    h["tensors"] = [e | (entry or {}).get(e["name"], {}) for e in h["tensors"]]
    raw = {k: D.blob[span] for k, span in D.body.items()} | (bodies or {})
    for e in h["tensors"]:
        e["body_bytes"] = len(raw.get(e["name"], b""))
    h["body_bytes"] = sum(map(len, raw.values()))
    h = {k: v for k, v in (h | fields).items() if k not in drop}
    return delta.pack(delta.MAGIC, h) + b"".join(raw.values())


def recompressed(name: str, i: int, change) -> bytes:
    """Tensor `name`'s body decompressed, its i-th int32 changed, compressed again (valid zstd)."""
    raw = zstandard.ZstdDecompressor().decompress(D.blob[D.body[name]], 1 << 20)
    x = np.frombuffer(raw, np.int32, len(raw) // 4).copy()
    x[i] = change(x[i])
    return zstandard.ZstdCompressor(write_checksum=True).compress(x.tobytes() + raw[len(raw) // 4 * 4:])


BAD = {  # name -> (chain file bytes, apply arguments changed, what the message says)
    # a flipped byte mid-body of the dense tensor, of the sparse one, and in a frame's checksum
    "dense body byte": (lambda: chain(flip(D.blob, D.body["w"].start + 100)), {}, "tensor w "),
    "sparse body byte": (lambda: chain(flip(D.blob, D.body["emb"].start + 20)), {}, "tensor emb "),
    "checksum byte": (lambda: chain(flip(D.blob, D.body["w"].stop - 1)), {}, "tensor w "),
    # valid zstd frames that hold the wrong bytes: one XOR bit off, positions past the end
    "wrong values, valid frame": (lambda: chain(edit({"w": recompressed("w", 7, lambda v: v ^ 1)})), {},
                                  "tensor w differs"),
    "positions outside": (lambda: chain(edit({"emb": recompressed("emb", 0, lambda v: 2000)})), {},
                          "outside its 1024 elements"),
    # the link one byte short or long, its chain entry agreeing; the chain file short or long
    "truncated body": (lambda: chain(D.blob[:-1]), {}, "body is .* bytes, its header says"),
    "trailing bytes in a link": (lambda: chain(D.blob + b"\0"), {}, "body is .* bytes, its header says"),
    "truncated chain": (lambda: chain(D.blob)[:-1], {}, "chain is .* bytes, its header describes"),
    "trailing after the chain": (lambda: chain(D.blob) + b"\0", {}, "chain is .* its header describes"),
    # applied to another version: by digest, by number, or a link that says it starts elsewhere
    "wrong base digest": (lambda: chain(D.blob), {"base_digest": D.d1}, "another base"),
    "wrong from_version": (lambda: chain(D.blob), {"from_version": 1}, "starts at version 0, not 1"),
    "link from_version": (lambda: chain(edit(from_version=3)), {}, "another base"),
    # the box holds other values than the base digest says: the tensor check names it
    "box from another base": (lambda: chain(D.blob), {"box": D.other}, "tensor emb differs"),
    # framing: bad magic (link, chain), header not JSON, another format
    "bad magic": (lambda: chain(b"SGWDELTX" + D.blob[8:]), {}, "bad magic"),
    "bad chain magic": (lambda: b"SGWCHAIX" + chain(D.blob)[8:], {}, "bad magic"),
    "header not JSON": (lambda: chain(D.blob[:12] + b"\xff" * (D.body["emb"].start - 12)
                                      + D.blob[D.body["emb"].start:]), {}, "not JSON"),
    "format 1": (lambda: chain(edit(format=1)), {}, "format 1, this reader knows 2"),
    # header fields: missing, negative, a negative count, bodies that do not add up
    "missing digest": (lambda: chain(edit(drop=("digest",))), {}, "bad fields"),
    "negative to_version": (lambda: chain(edit(to_version=-1)), {}, "bad fields"),
    "negative count": (lambda: chain(edit(entry={"emb": {"count": -1}})), {}, "bad fields"),
    "body_bytes off by one": (lambda: chain(edit(body_bytes=D.head["body_bytes"] + 1)), {}, "bad fields"),
    # digests in the header that the bytes do not match
    "tensor digest": (lambda: chain(edit(entry={"w": {"digest": "0" * 32}})), {}, "tensor w differs"),
    "version digest": (lambda: chain(edit(digest="0" * 32)), {}, "version digest differs"),
    "safetensors header": (lambda: chain(edit(st_header=D.head["st_header"].replace('"7"', '"8"'))), {},
                           "version digest differs"),
    # a link for other tensor names
    "other tensors": (lambda: chain(edit(entry={"b": {"name": "c"}})), {}, r"missing \['b'\]"),
    # a chain whose links skip a version
    "not contiguous": (lambda: delta.pack_chain([{"from_version": 0, "to_version": 1, "bytes": len(D.blob)},
                                                 {"from_version": 2, "to_version": 3, "bytes": 0}]) + D.blob,
                       {}, "not contiguous at version 1"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_every_damaged_delta_is_detected(tmp_path, case):
    make, changed, says = BAD[case]
    kw = {"box": clone(D.base0), "from_version": 0, "base_digest": D.d0} | changed
    with pytest.raises(DeltaError, match=says) as e:
        apply(tmp_path, make(), clone(kw["box"]), kw["from_version"], kw["base_digest"])
    assert "\n" not in str(e.value)


def test_the_undamaged_link_applies(tmp_path):
    box = clone(D.base0)  # the link the table above spoils, as it is
    assert [e["enc"] for e in apply(tmp_path, chain(D.blob), box, 0, D.d0)[0]["tensors"]] == \
        ["sparse", "dense", "same", "dense", "same"] and file_version_digest(st_file(box)) == D.d1


def test_no_delta_past_max_body_bytes():
    live0, base = version0(torch.bfloat16)
    live1 = stepped(live0, {"emb": 5, "w": 1200})
    head, _, d1, digests = encode_link(clone(base), live1, 0, "0" * 32)
    total = head["body_bytes"]
    for limit, framed in [(total - 1, False), (total, True)]:  # the bodies' bytes decide, exactly
        b = clone(base)
        got, _, d, ds = encode_link(b, live1, 0, "0" * 32, max_body_bytes=limit)
        assert (got is not None, d, ds) == (framed, d1, digests)
        assert_bits(b, clone(live1, torch.bfloat16))  # the base is the new version either way


def test_chain_header_round_trip():
    links = [{"from_version": 4, "to_version": 5, "bytes": 10},
             {"from_version": 5, "to_version": 7, "bytes": 3}]
    raw = delta.pack_chain(links) + b"x" * 13
    head, spans = delta.read_chain(io.BytesIO(raw), len(raw))
    assert head == {"format": 2, "from_version": 4, "to_version": 7, "links": links}
    assert spans == [(len(raw) - 13, 10), (len(raw) - 3, 3)]
    assert raw[:8] == b"SGWCHAIN" and json.loads(raw[12:12 + struct.unpack("<I", raw[8:12])[0]]) == head
