"""Fuzzing a real `python ref_server.py` process (tiny model, loopback): >= 10,000 generated requests
over every endpoint and method - truncations and bit flips of valid encodings, valid encodings of
invalid tensors, random JSON and bytes, wrong headers and query parameters, broken HTTP framing
and huge declared sizes over a raw socket. No answer is ever a 5xx, the process stays alive, its
resident memory returns near the baseline, and a valid /logprobs afterwards is still exact.

The cases come from one seeded generator (deterministic, no hypothesis database), so a failure
names its case number and replays."""
from __future__ import annotations

import http.client
import json
import math
import os
import random
import socket
import struct
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from urllib.parse import quote

import torch
from safetensors.torch import save as st_save

from simple_grpo import codec
from simple_grpo.client import RefClient
from simple_grpo.engine import free_port, standalone_env
from simple_grpo.logprobs import completion_logprobs
from simple_grpo.weight_store import state_dict_safetensors_bytes

ROOT = Path(__file__).resolve().parents[2]
VOCAB = 320  # save_tiny_model's vocabulary
SEED = 20261122
RSS_MARGIN_MIB = 64  # python + torch allocator slack; a per-request leak of 10 KiB would exceed it


# ---------------------------------------------------------------------------- the server process
class ServerProcess:
    """`python ref_server.py ...` on a free loopback port, its output in `log`."""

    def __init__(self, model_dir, log: Path, *args: str):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        self.proc = subprocess.Popen(
            [sys.executable, "ref_server.py", f"--model={model_dir}", f"--port={self.port}",
             "--torch_threads=1", *args], cwd=ROOT, stdout=open(log, "w"),
            stderr=subprocess.STDOUT, env=standalone_env(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1"))
        try:
            self.health = RefClient(self.url, token=self._token(args)).wait_ready(120, poll_s=0.1)
        except BaseException:
            self.stop()
            raise

    @staticmethod
    def _token(args) -> str | None:
        return next((a.split("=", 1)[1] for a in args if a.startswith("--token=")), None)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def rss_mib(self) -> float:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        raise AssertionError("no VmRSS")

    def output(self) -> str:
        return self.log.read_text(errors="replace")[-4000:]

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def tiny_ids(rng: random.Random, B: int, P: int, C: int) -> codec.LogprobRequest:
    g = torch.Generator().manual_seed(rng.randrange(1 << 30))
    return codec.LogprobRequest(
        prompt_ids=torch.randint(0, VOCAB, (B, P), generator=g),
        prompt_lens=torch.randint(1, P + 1, (B,), generator=g),
        completion_ids=torch.randint(0, VOCAB, (B, C), generator=g),
        completion_lens=torch.randint(0, C + 1, (B,), generator=g))


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
    hdr = {**ours(), "weight_version": 0, "meta": {}, "batch_id": None, **header}
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
    keys = ["schema_version", "kind", "weight_version", "meta", "batch_id", "prompt_ids",
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
    elif what == 11:  # bad weight versions
        hdr["weight_version"] = rng.choice([-1, 1.5, "3", True, None, 2 ** 70, [1], {"v": 1}, 1e400])
    elif what == 12:  # bad batch ids and meta
        hdr[rng.choice(["batch_id", "meta"])] = rng.choice(
            ["", "x" * 129, "a/b", "\u00e9", 5, [], {"a": 1}, None, {"1": [None] * 3}, "ok-id"])
    elif what == 13:  # bad schema / kind
        hdr[rng.choice(["schema_version", "kind"])] = rng.choice(
            [0, 2, "1", 1.0, True, None, [1], {"k": "rollout"}, ["rollout"], "rollout ",
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


ENDPOINTS = [("GET", "/health"), ("GET", "/stats"), ("POST", "/upload"), ("GET", "/get"),
             ("POST", "/logprobs"), ("POST", "/weights"), ("GET", "/weights/version"),
             ("GET", "/weights")]
METHODS = ["GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS"]
CTYPES = [None, "application/octet-stream", "application/json", "text/plain",
          "multipart/form-data; boundary=x", "application/x-www-form-urlencoded", "\u00ff/\u00fe", ""]


class Generator:
    def __init__(self, seed: int, max_len: int):
        self.rng = random.Random(seed)
        rng = self.rng
        self.max_len = max_len
        self.batches = [codec.encode(tiny_batch(rng, rng.randrange(1, 4), rng.randrange(1, 7),
                                                rng.randrange(1, 7))) for _ in range(24)]
        self.requests = [codec.encode(tiny_ids(rng, rng.randrange(1, 4), rng.randrange(1, 7),
                                               rng.randrange(1, 7))) for _ in range(24)]
        self.responses = [codec.encode(codec.LogprobResponse(-torch.rand(2, 3)))]
        self.weights = [state_dict_safetensors_bytes({"w": torch.randn(4, 3), "b": torch.arange(5)}),
                        state_dict_safetensors_bytes({"e": torch.zeros(0, 3)})]
        self.version = 10

    def valid_body(self, path: str) -> bytes:
        rng = self.rng
        if path == "/upload":
            return rng.choice(self.batches)
        if path == "/logprobs":
            return rng.choice(self.requests)
        if path == "/weights":
            return rng.choice(self.weights)
        return rng.choice(self.batches + self.requests + self.responses)

    def post_path(self) -> str:
        p = self.rng.choice(["/upload", "/logprobs", "/weights"])
        return p + (f"?version={self.next_version()}" if p == "/weights" else "")

    def next_version(self) -> int:
        self.version += self.rng.choice([1, 1, 1, 0, -1, 1000])
        return self.version

    # -- categories: each returns a Case
    def mutated(self) -> Case:
        path = self.post_path()
        body = mutate(self.rng, self.valid_body(path.split("?")[0]))
        return Case("mutated_encoding", "POST", path, {"Content-Type": "application/octet-stream"}, body)

    def invalid(self) -> Case:
        cat, body = invalid_tensors(self.rng, self.max_len)
        path = "/logprobs" if b"logprob_request" in body[:2000] and self.rng.random() < 0.8 else (
            self.rng.choice(["/upload", "/logprobs"]))
        return Case(cat, "POST", path, {"Content-Type": "application/octet-stream"}, body)

    def rand_json(self) -> Case:
        rng = self.rng
        where = rng.randrange(4)
        if where == 0:  # JSON as the whole body
            body = json.dumps(random_json(rng)).encode()
        elif where == 1:  # as the safetensors header
            body = st_file(random_json(rng), rng.randbytes(rng.randrange(64)))
        elif where == 2:  # as our header inside a valid safetensors header
            body = st_file({"__metadata__": {"simple_grpo": json.dumps(random_json(rng))}})
        else:  # as our header beside real tensors, with plausible keys
            h = ours(rng.choice(["rollout", "logprob_request"]))
            h.update({k: random_json(rng) for k in rng.sample(
                ["weight_version", "meta", "batch_id", "kind", "schema_version"], rng.randrange(1, 4))})
            b = tiny_batch(rng, 2, 3, 2)
            body = st_save({k: getattr(b, k) for k in ("prompt_ids", "prompt_lens", "completion_ids",
                                                       "completion_lens", "rewards", "advantages")},
                           metadata={"simple_grpo": json.dumps(h)})
        return Case(f"random_json/{where}", "POST", self.post_path(),
                    {"Content-Type": rng.choice(["application/json", "application/octet-stream"])},
                    body)

    def crafted(self) -> Case:
        """Hand-made safetensors headers: odd dtypes, shapes, offsets, deep nesting."""
        rng = self.rng
        name = rng.choice(["prompt_ids", "prompt_lens", "rewards", "w", "__metadata__"])
        info = {"dtype": rng.choice(["I64", "F32", "BF16", "U64", "F8_E4M3", "C64", "", 5, ["I64"],
                                     {"a": 1}, None]),
                "shape": rng.choice([[2, 3], [], [0], [-1], [2 ** 62, 2 ** 62], [2 ** 64], "2",
                                     [1.5], [[1]], None]),
                "data_offsets": rng.choice([[0, 48], [0, 0], [8, 0], [-8, 0], [0, 2 ** 64],
                                            [0], "0-8", None, [0, 10 ** 30]])}
        for k in rng.sample(sorted(info), rng.randrange(2)):
            info.pop(k)
        header = {name: info}
        if rng.random() < 0.7:
            header["__metadata__"] = {"simple_grpo": json.dumps(ours(rng.choice(
                ["rollout", "logprob_request"]), weight_version=0, meta={}, batch_id=None))}
        depth = rng.choice([10, 1000, 100_000])
        nest = rng.randrange(4)
        if nest == 1:  # nested arrays as the whole safetensors header
            raw = b"[" * depth + b"]" * depth
            return Case("crafted/deep", "POST", self.post_path(), {}, st_file(raw))
        if nest == 2:  # ... or as our header inside a valid one
            body = st_file({"__metadata__": {"simple_grpo": "[" * depth + "]" * depth}})
            return Case("crafted/deep", "POST", self.post_path(), {}, body)
        data = rng.randbytes(rng.choice([0, 8, 48, 100]))
        return Case("crafted/header", "POST", self.post_path(), {}, st_file(header, data))

    def rand_bytes(self) -> Case:
        rng = self.rng
        method = rng.choice(METHODS)
        path = rng.choice(ENDPOINTS)[1]
        n = rng.choice([0, 1, 7, 8, 9, 64, rng.randrange(4096)])
        return Case("random_bytes", method, path, {"Content-Type": rng.choice(CTYPES[1:4])},
                    rng.randbytes(n) if method != "HEAD" else None)

    def headers(self) -> Case:
        rng = self.rng
        method, path = rng.choice(ENDPOINTS)
        h: dict[str, str] = {}
        if rng.random() < 0.5:
            ct = rng.choice(CTYPES)
            if ct is not None:
                h["Content-Type"] = ct
        junk = ["", "0", "-1", "1.5", "abc", "9" * 5000, "\u00e9\u00e8", " 3 ", "0x10", "1e3",
                "\u00b2", "99999999999999999999999", "1,2", "null"]
        extra = rng.choice(["Authorization", "X-Worker-Id", "X-Weight-Version", "Range", "If-Range",
                            "Accept", "Expect", "Accept-Encoding", "Connection", "X-Batch-Id"])
        if extra == "Authorization":
            h[extra] = rng.choice(["Bearer", "Bearer ", "Basic abc", "Bearer x" * 100, "\u00ff"])
        elif extra == "X-Worker-Id":
            path, method = "/weights/version", "GET"
            h[extra] = rng.choice(["w-1", "", "a b", "x" * 129, "\u00e9", "w/1", "ok"])
            if rng.random() < 0.7:
                h["X-Weight-Version"] = rng.choice(junk + ["3", "0"])
        elif extra == "X-Weight-Version":
            path, method = "/weights/version", "GET"
            h[extra] = rng.choice(junk)
        elif extra in ("Range", "If-Range"):
            path, method = "/weights", "GET"
            h["Range"] = rng.choice(["bytes=0-", "bytes=5-2", "bytes=-5", "bytes=0-0,2-3",
                                     "bytes=99999999999999999999-", "bytes=1-99999999999",
                                     "items=0-1", "bytes=", "bytes=\u00b2-", "bytes=3-"])
            if extra == "If-Range":
                h["If-Range"] = rng.choice(['"abc"', "", "W/\"x\"", "Mon, 01 Jan 2024 00:00:00 GMT"])
        elif extra == "Expect":
            h[extra] = rng.choice(["100-continue", "nonsense"])
        else:
            h[extra] = rng.choice(junk + ["gzip", "close", "keep-alive", "*/*"])
        body = None
        if method == "POST":
            path = path + (f"?version={self.next_version()}" if path == "/weights" else "")
            body = self.valid_body(path.split("?")[0]) if rng.random() < 0.7 else rng.randbytes(32)
        return Case(f"headers/{extra}", method, path, h, body)

    def query(self) -> Case:
        rng = self.rng
        vals = ["", "0", "-1", "1.5", "nan", "inf", "-inf", "1e400", "abc", "9" * 5000, "%ff",
                "%00", "\u00e9", "0.001", "1_0", " 1", "0x1", "3", "None", "[]"]
        which = rng.randrange(5)
        if which == 0:
            params = {k: rng.choice(vals) for k in rng.sample(["wait", "weight_version", "request_id"],
                                                              rng.randrange(1, 4))}
            if "wait" in params and params["wait"] not in ("", "0", "-1", "nan", "abc", "None", "[]"):
                params["wait"] = "0"  # no long polls: keep the run short
            if "request_id" in params and rng.random() < 0.5:
                params["request_id"] = rng.choice(["r-1", "x" * 65, "a.b", "ok_1", "\u00e9"])
            method, path = "GET", "/get"
        elif which == 1:
            params = {"version": rng.choice(vals + [str(self.next_version())])}
            method, path = "POST", "/weights"
        elif which == 2:
            params = {rng.choice(["x", "version", "wait", "%zz"]): rng.choice(vals)}
            method, path = rng.choice(ENDPOINTS)
        elif which == 3:  # unknown and odd paths
            params = {}
            method = rng.choice(METHODS)
            path = rng.choice(["/", "//health", "/health/", "/weights/", "/weights/version/x",
                               "/%2e%2e/etc/passwd", "/upload%00", "/%C3%A9", "/get;x", "/stats?",
                               "/" + "a" * 3000, "/weights/../health", "/%ff", "*"])
        else:  # repeated parameters
            method, path = rng.choice([("GET", "/get"), ("POST", "/weights")])
            key = "wait" if path == "/get" else "version"
            return Case("query/repeated", method, f"{path}?{key}=0&{key}=1&{key}=x",
                        {}, self.valid_body(path) if method == "POST" else None)
        q = "&".join(f"{quote(k, safe='%')}={quote(v, safe='%')}" for k, v in params.items())
        body = self.valid_body(path) if method == "POST" and rng.random() < 0.8 else None
        return Case(f"query/{which}", method, path + ("?" + q if q else ""), {}, body)

    def framing(self) -> Case:
        """Raw bytes on a fresh socket: wrong lengths, huge declared sizes, bad chunking."""
        rng = self.rng
        method, path = rng.choice(ENDPOINTS)
        if method == "POST" and path == "/weights":
            path += f"?version={self.next_version()}"
        body = self.valid_body(path.split("?")[0])
        head = f"{rng.choice([method, 'POST'])} {path} HTTP/1.1\r\nHost: x\r\n"
        which = rng.randrange(11)
        if which == 10:  # no Content-Length at all: the body reads as the next request
            raw = head.encode() + b"\r\n" + body
        elif which == 0:  # declared length shorter than the body (the rest is a garbage request)
            raw = f"{head}Content-Length: {rng.randrange(len(body))}\r\n\r\n".encode() + body
        elif which == 1:  # huge declared length, tiny body
            n = rng.choice([2 ** 31, 2 ** 40, 2 ** 63 - 1, 10 ** 30, (64 << 20) + 1])
            raw = f"{head}Content-Length: {n}\r\n\r\n".encode() + body[:16]
        elif which == 2:  # not a number
            cl = rng.choice(["-1", "abc", "1.5", "", "0x10", "1, 2", "+5", "\u00b2"])
            raw = f"{head}Content-Length: {cl}\r\n\r\n".encode("latin-1", "replace") + body
        elif which == 3:  # two lengths
            raw = f"{head}Content-Length: {len(body)}\r\nContent-Length: 3\r\n\r\n".encode() + body
        elif which == 4:  # chunked with a bad or huge chunk size
            size = rng.choice(["zz", "-1", "ffffffffffffffff", "1" * 40, f"{len(body):x};ext=1", "0"])
            raw = f"{head}Transfer-Encoding: chunked\r\n\r\n{size}\r\n".encode() + body + b"\r\n0\r\n\r\n"
        elif which == 5:  # chunked and Content-Length together
            raw = (f"{head}Transfer-Encoding: chunked\r\nContent-Length: {len(body)}\r\n\r\n"
                   f"{len(body):x}\r\n").encode() + body + b"\r\n0\r\n\r\n"
        elif which == 6:  # a garbage request line
            raw = rng.choice([b"\r\n\r\n", b"GET\r\n\r\n", b"GET / HTTP/9.9\r\n\r\n",
                              b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03" + rng.randbytes(40),
                              b"GET /health HTTP/1.1\r\n" + b"X: " + b"a" * 300_000 + b"\r\n\r\n",
                              rng.randbytes(rng.randrange(1, 200)) + b"\r\n\r\n",
                              b"GET /health HTTP/1.0\r\n\r\n", b"GET /health\r\n\r\n"])
        elif which == 7:  # header bytes that are not ASCII / a bad header line
            raw = head.encode() + rng.choice([b"X-Worker-Id: \xff\xfe\r\n", b"NoColon\r\n",
                                              b" folded: x\r\n", b"Authorization: \x00\r\n"]
                                             ) + f"Content-Length: {len(body)}\r\n\r\n".encode() + body
        elif which == 8:  # chunked, valid framing, then an unterminated body closed early
            raw = f"{head}Transfer-Encoding: chunked\r\n\r\n".encode() + b"".join(
                f"{len(c):x}\r\n".encode() + c + b"\r\n" for c in (body[:7], body[7:])) + b"0\r\n\r\n"
            if rng.random() < 0.5:
                raw = raw[:rng.randrange(len(raw))]
        else:  # the body cut short, connection then closed
            raw = f"{head}Content-Length: {len(body)}\r\n\r\n".encode() + body[:rng.randrange(len(body))]
        return Case(f"framing/{which}", raw=raw)

    def valid(self) -> Case:
        rng = self.rng
        r = rng.randrange(6)
        if r in (0, 1):
            return Case("valid", "POST", "/upload", {"Content-Type": "application/octet-stream"},
                        codec.encode(tiny_batch(rng, rng.randrange(1, 4), rng.randrange(1, 7),
                                                rng.randrange(1, 7))))
        if r == 2:
            return Case("valid", "POST", "/logprobs", {}, rng.choice(self.requests))
        if r == 3:
            return Case("valid", "GET", f"/get?request_id=r{rng.randrange(40)}", {})
        if r == 4:
            return Case("valid", "POST", f"/weights?version={self.next_version()}", {},
                        rng.choice(self.weights))
        return Case("valid", "GET", rng.choice(["/weights", "/weights/version", "/stats", "/get"]),
                    {"X-Worker-Id": f"w{rng.randrange(9)}", "X-Weight-Version": "1"})

    MIX = [("mutated", 28), ("invalid", 20), ("rand_json", 10), ("crafted", 5), ("rand_bytes", 7),
           ("headers", 10), ("query", 9), ("framing", 5), ("valid", 6)]

    def next(self) -> Case:
        name = self.rng.choices([n for n, _ in self.MIX], [w for _, w in self.MIX])[0]
        return getattr(self, name)()


# ---------------------------------------------------------------------------- sending
class Sender:
    def __init__(self, port: int):
        self.port, self.conn = port, None

    def http(self, c: Case) -> int | None:
        for attempt in range(2):
            if self.conn is None:
                self.conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
            try:
                self.conn.putrequest(c.method, c.path, skip_accept_encoding=True)
                for k, v in c.headers.items():
                    self.conn.putheader(k, v.encode("latin-1", "replace"))
                if c.body is not None and "Content-Length" not in c.headers:
                    self.conn.putheader("Content-Length", str(len(c.body)))
                self.conn.endheaders(c.body)
                r = self.conn.getresponse()
                r.read()
                if r.will_close:
                    self.close()
                return r.status
            except (ConnectionError, http.client.RemoteDisconnected, http.client.BadStatusLine):
                self.close()  # the server closed a kept-alive connection: retry once on a new one
        return None

    def raw(self, c: Case) -> int | None:
        # an answer comes within milliseconds; silence means the request is unfinished (a chunk
        # size or trailer still awaited): the server closes such connections after its timeout
        with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as s:
            try:
                s.sendall(c.raw)
            except ConnectionError:
                return None
            if c.cat in ("framing/9",) or (c.cat == "framing/8" and not c.raw.endswith(b"0\r\n\r\n")):
                return None  # an unfinished request: the client goes away
            try:
                r = http.client.HTTPResponse(s, method="GET")
                r.begin()
                return r.status
            except (ConnectionError, http.client.HTTPException, socket.timeout):
                return None

    def send(self, c: Case) -> int | None:
        return self.raw(c) if c.raw is not None else self.http(c)

    def close(self):
        if self.conn is not None:
            self.conn.close()
            self.conn = None


def regressions() -> list[tuple[Case, int]]:
    """Inputs that once got a 500 (bugs this fuzzer found), with the answer they must get now."""
    deep = "[" * 100_000 + "]" * 100_000
    meta = {"simple_grpo": json.dumps(ours(["rollout"]))}  # unhashable kind
    weights_list_dtype = st_file({"w": {"dtype": ["F32"], "shape": [1], "data_offsets": [0, 4]}},
                                 b"\0" * 4)
    cases = [(Case("regression", "POST", path, {}, body), 400) for path in ("/upload", "/logprobs")
             for body in (st_file(deep.encode()), st_file({"__metadata__": {"simple_grpo": deep}}),
                          st_file({"__metadata__": meta}))]
    cases += [(Case("regression", "POST", "/weights?version=1", {}, body), 400)
              for body in (st_file(deep.encode()), weights_list_dtype)]
    # a header that is not UTF-8 (bottle's get_header raised UnicodeDecodeError)
    cases += [(Case("regression", "GET", "/weights/version", {"X-Worker-Id": "w\u00e9"}), 400),
              (Case("regression", "GET", "/weights/version", {"X-Worker-Id": "w",
                                                              "X-Weight-Version": "\u00e9"}), 400)]
    # Expect: 100-continue without a body: waitress never answered it
    cases += [(Case("regression", "GET", "/health", {"Expect": "100-continue"}), 200)]
    return cases


def status_class(status: int | None) -> str:
    return "no answer" if status is None else f"{status // 100}xx"


def test_fuzz_ref_server(tiny_model_dir, tiny_model, tmp_path):
    n_cases = int(os.environ.get("FUZZ_CASES", 10_000))
    srv = ServerProcess(tiny_model_dir, tmp_path / "server.log", "--queue_size=8",
                        "--when_full=drop_oldest", "--max_body_mb=1", "--max_weights_mb=4",
                        f"--weights_dir={tmp_path / 'weights'}", "--request_timeout_s=5")
    try:
        gen = Generator(SEED, srv.health["max_len"])
        sender = Sender(srv.port)
        for c, want in regressions():
            assert sender.send(c) == want, c
        # warm-up: every endpoint's good path and a few errors, the queue filled to its bound
        warm = [gen.valid() for _ in range(300)] + [gen.mutated() for _ in range(100)]
        warm += [Case("valid", "POST", "/upload", {}, b) for b in gen.batches]
        for c in warm:
            assert status_class(sender.send(c)) in ("2xx", "4xx"), c
        baseline = srv.rss_mib()

        by_class: Counter = Counter()
        by_cat: Counter = Counter()
        statuses: Counter = Counter()
        seconds: Counter = Counter()
        silent: Counter = Counter()  # raw-socket cases the server did not answer (unfinished)
        bad: list[tuple[int, Case, int | None]] = []
        t0 = time.monotonic()
        for i in range(n_cases):
            c = gen.next()
            t1 = time.monotonic()
            status = sender.send(c)
            cat = c.cat.split("/")[0]
            seconds[cat] += time.monotonic() - t1
            by_cat[cat] += 1
            if status is None:
                silent[c.cat] += 1
            by_class[status_class(status)] += 1
            statuses[status] += 1
            if status is not None and status >= 500:
                bad.append((i, c, status))
            if status is None and c.raw is None:
                bad.append((i, c, status))  # an ordinary request must always get an answer
            if i % 1000 == 999:
                assert srv.alive(), f"server died at case {i}: {srv.output()}"
        elapsed = time.monotonic() - t0
        sender.close()
        after = srv.rss_mib()
        print(f"\nfuzz: {n_cases} cases in {elapsed:.1f} s; by category {dict(by_cat)}; "
              f"answers {dict(by_class)}; statuses {dict(statuses)}; unanswered {dict(silent)}; "
              f"RSS baseline {baseline:.1f} MiB, after {after:.1f} MiB; seconds by category "
              f"{ {k: round(v, 1) for k, v in seconds.items()} }")
        assert not bad, f"{len(bad)} bad answers, first: {bad[:5]}\n{srv.output()}"
        assert srv.alive()
        assert by_class["2xx"] > 500 and by_class["4xx"] > 5000
        assert after - baseline < RSS_MARGIN_MIB, (baseline, after)

        # a valid request afterwards is answered exactly
        client = RefClient(srv.url)
        req = tiny_ids(random.Random(1), 3, 6, 5)
        ids = (req.prompt_ids, req.prompt_lens, req.completion_ids, req.completion_lens)
        with torch.inference_mode():
            want = completion_logprobs(tiny_model, *ids)
        torch.testing.assert_close(client.logprobs(*ids), want, atol=1e-5, rtol=0)
        s = client.stats()
        assert s["queue_depth"] <= 8 and s["in_flight"] == 0
        assert "Traceback" not in srv.output(), srv.output()
    finally:
        srv.stop()
