"""Building blocks of the ref-server fuzzer (test_fuzz.py): valid and invalid request bodies."""
from __future__ import annotations

import json
import math
import random
import struct

import torch
from safetensors.torch import save as st_save

from simple_grpo.wire import codec


VOCAB = 320  # save_tiny_model's vocabulary


def tiny_ids(rng: random.Random, B: int, P: int, C: int) -> codec.LogprobRequest:
    g = torch.Generator().manual_seed(rng.randrange(1 << 30))
    return codec.LogprobRequest(
        prompt_ids=torch.randint(0, VOCAB, (B, P), generator=g),
        prompt_lens=torch.randint(1, P + 1, (B,), generator=g),
        completion_ids=torch.randint(0, VOCAB, (B, C), generator=g),
        completion_lens=torch.randint(0, C + 1, (B,), generator=g),
        temperature=rng.choice([1.0, 0.7, 1.3]))  # scored at each (schema 2)


def tiny_batch(rng: random.Random, B: int, P: int, C: int, **kw) -> codec.RolloutBatch:
    r = tiny_ids(rng, B, P, C)
    g = torch.Generator().manual_seed(rng.randrange(1 << 30))
    fields = dict(r.__dict__, rewards=torch.randn(B, generator=g),
                  advantages=torch.randn(B, generator=g),
                  gen_logprobs=-torch.rand(B, C, generator=g) if rng.random() < 0.5 else None,
                  weight_version=rng.randrange(4), batch_id=f"fz-{rng.randrange(1 << 40):x}")
    return codec.RolloutBatch(**{**fields, **kw})


# ---------------------------------------------------------------------------- case generators
def st_file(header, data: bytes = b"") -> bytes:
    """A safetensors-shaped body with an arbitrary (possibly invalid) header."""
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data


def ours(kind: str = "rollout", **fields) -> dict:
    return {"schema_version": codec.SCHEMA_VERSION, "kind": kind, **fields}


def st_with(tensors: dict, **header) -> bytes:
    """safetensors.save of `tensors` with our header (overridable) - bypasses encode's checks."""
    hdr = {**ours(), "weight_version": 0, "meta": {}, "batch_id": None, "temperature": 1.0, **header}
    return st_save({k: v.contiguous() for k, v in tensors.items()},
                   metadata={"simple_grpo": json.dumps(hdr)})


def random_json(rng: random.Random, depth: int = 0):
    r = rng.random()
    if depth > 3 or r < 0.45:
        return rng.choice([None, True, False, 0, -1, 1, 2 ** 63, -2 ** 64, 10 ** 30, 1.5, -0.0,
                           1e308, "", "rollout", "logprob_request", "logprob_response", "\u00e9\u0000",
                           "x" * rng.randrange(300), rng.randrange(-5, 5), rng.random()])
    if r < 0.7:
        return [random_json(rng, depth + 1) for _ in range(rng.randrange(4))]
    keys = ["schema_version", "kind", "weight_version", "meta", "batch_id", "temperature", "prompt_ids",
            "__metadata__", "simple_grpo", "dtype", "shape", "data_offsets", "x"]
    return {rng.choice(keys): random_json(rng, depth + 1) for _ in range(rng.randrange(5))}


def mutate(rng: random.Random, data: bytes) -> bytes:
    """A truncation, bit flips, byte edits, a splice or a header-length change of `data`."""
    b = bytearray(data)
    op = rng.randrange(7)
    if op == 0 or not b:
        return bytes(b[:rng.randrange(len(b) + 1)])
    if op == 1:
        for _ in range(rng.randrange(1, 9)):
            i = rng.randrange(len(b))
            b[i] ^= 1 << rng.randrange(8)
    elif op == 2:  # flips inside the JSON header only
        n = min(int.from_bytes(b[:8], "little"), len(b) - 8)
        for _ in range(rng.randrange(1, 4)):
            i = 8 + rng.randrange(max(1, n))
            if i < len(b):
                b[i] = rng.randrange(256)
    elif op == 3:
        i = rng.randrange(len(b))
        del b[i:i + rng.randrange(1, 16)]
    elif op == 4:
        i = rng.randrange(len(b) + 1)
        b[i:i] = rng.randbytes(rng.randrange(1, 32))
    elif op == 5:
        near = max(0, int.from_bytes(b[:8], "little") + rng.choice([-8, -1, 1, 8]))
        b[:8] = rng.choice([0, 1, 7, len(b), 2 ** 63, 2 ** 64 - 1, 16 << 20, near]).to_bytes(8, "little")
    else:  # swap the data of two valid messages behind this header
        return bytes(b[:len(b) // 2]) + rng.randbytes(len(b) - len(b) // 2)
    return bytes(b)


def invalid_tensors(rng: random.Random, max_len: int) -> tuple[str, bytes]:
    """Valid safetensors encodings of invalid batches / requests."""
    B, P, C = rng.randrange(1, 4), rng.randrange(1, 6), rng.randrange(1, 6)
    b = tiny_batch(rng, B, P, C)
    t = {k: getattr(b, k) for k in ("prompt_ids", "prompt_lens", "completion_ids",
                                    "completion_lens", "rewards", "advantages")}
    if b.gen_logprobs is not None:
        t["gen_logprobs"] = b.gen_logprobs
    kind, hdr = rng.choice(["rollout", "logprob_request"]), {}
    what = rng.randrange(16)
    big = [-1, -2 ** 63, P + 1, 2 ** 62, 2 ** 63 - 1]
    if what == 0:
        t["prompt_lens"] = t["prompt_lens"].clone()
        t["prompt_lens"][rng.randrange(B)] = rng.choice(big + [0])
    elif what == 1:
        t["completion_lens"] = t["completion_lens"].clone()
        t["completion_lens"][rng.randrange(B)] = rng.choice([-1, C + 1, -2 ** 63, 2 ** 63 - 1])
    elif what == 2:  # out-of-vocabulary ids at real positions
        t["prompt_ids"] = t["prompt_ids"].clone()
        t["prompt_ids"][:, -1] = rng.choice([VOCAB, -1, 2 ** 63 - 1, -2 ** 63, 10 ** 6])
    elif what == 3:
        t["completion_ids"] = torch.full((B, C), rng.choice([VOCAB, -5, 2 ** 63 - 1]))
        t["completion_lens"] = torch.full((B,), C)
    elif what in (4, 5):  # NaN / inf in the floats
        name = rng.choice(["rewards", "advantages", "gen_logprobs"])
        v = torch.full_like(t.get(name, torch.zeros(B, C)), rng.choice([math.nan, math.inf, -math.inf]))
        t[name] = v
        if name == "gen_logprobs":
            t["completion_lens"] = torch.full((B,), C)
    elif what == 6:  # wrong dtype
        name = rng.choice(sorted(t))
        t[name] = t[name].to(rng.choice([torch.int32, torch.float16, torch.bfloat16, torch.uint8,
                                          torch.bool, torch.float64, torch.int8, torch.int16]))
    elif what == 7:  # wrong shapes
        name = rng.choice(sorted(t))
        t[name] = rng.choice([t[name].reshape(-1), t[name][None], t[name][..., :0],
                              torch.zeros(()), t[name][:0], torch.zeros(B + 1, P + C)]).to(t[name].dtype)
    elif what == 8:  # empty or degenerate dims
        z = rng.choice(["B", "P", "C"])
        Bz, Pz, Cz = (0 if z == "B" else B), (0 if z == "P" else P), (0 if z == "C" else C)
        t = {"prompt_ids": torch.zeros(Bz, Pz, dtype=torch.long), "prompt_lens": torch.full((Bz,), Pz),
             "completion_ids": torch.zeros(Bz, Cz, dtype=torch.long), "completion_lens": torch.zeros(Bz, dtype=torch.long),
             "rewards": torch.zeros(Bz), "advantages": torch.zeros(Bz)}
    elif what == 9:  # longer than max_len
        W = max_len + rng.choice([0, 1, 100])
        t["prompt_ids"] = torch.ones(B, W, dtype=torch.long)
        t["prompt_lens"] = torch.ones(B, dtype=torch.long)
    elif what == 10:  # missing or extra tensors
        if rng.random() < 0.5:
            t.pop(rng.choice(sorted(t)))
        else:
            t[rng.choice(["ref_logprobs", "logprobs", "extra", "gen_logprobs"])] = torch.zeros(B, C)
    elif what == 11:  # bad weight versions and temperatures
        hdr[rng.choice(["weight_version", "temperature"])] = rng.choice(
            [-1, 1.5, "3", True, None, 2 ** 70, 2 ** 1100, [1], {"v": 1}, 1e400, 0, 0.0, -0.5, 1e-300])
    elif what == 12:  # bad batch ids and meta
        hdr[rng.choice(["batch_id", "meta"])] = rng.choice(
            ["", "x" * 129, "a/b", "\u00e9", 5, [], {"a": 1}, None, {"1": [None] * 3}, "ok-id"])
    elif what == 13:  # bad schema / kind
        hdr[rng.choice(["schema_version", "kind"])] = rng.choice(
            [0, 1, 3, "2", 2.0, True, None, [1], {"k": "rollout"}, ["rollout"], "rollout ",
             "logprob_response", "nope"])
    elif what == 14:  # unknown header fields
        hdr[rng.choice(["extra", "ref_logprobs", "schema", "__class__"])] = random_json(rng)
    else:  # a response message where a request is expected
        t = {"logprobs": torch.zeros(B, C)}
        kind = "logprob_response"
    if kind == "logprob_request":
        for k in ("rewards", "advantages", "gen_logprobs"):
            if what not in (10,) and k in t and rng.random() < 0.9:
                t.pop(k)
        hdr = {k: v for k, v in hdr.items() if k not in ("weight_version", "meta", "batch_id")
               } if what not in (11, 12) else hdr
        body = st_save({k: v.contiguous() for k, v in t.items()},
                       metadata={"simple_grpo": json.dumps({**ours("logprob_request"), **hdr})})
    else:
        body = st_with(t, **{"kind": kind, **hdr}) if kind != "logprob_response" else st_save(
            t, metadata={"simple_grpo": json.dumps(ours("logprob_response"))})
    return f"invalid_tensors/{what}", body


class Case:
    __slots__ = ("cat", "method", "path", "headers", "body", "raw")

    def __init__(self, cat, method="GET", path="/health", headers=None, body=None, raw=None):
        self.cat, self.method, self.path = cat, method, path
        self.headers, self.body, self.raw = headers or {}, body, raw

    def __repr__(self):
        what = self.raw[:200] if self.raw is not None else (self.method, self.path, self.headers,
                                                             (self.body or b"")[:120])
        return f"<{self.cat} {what!r}>"
