"""The ref-server fuzzer's case generator, raw-socket sender and regression cases (test_fuzz.py)."""
from __future__ import annotations

import http.client
import json
import random
import socket
from urllib.parse import quote

import torch
from safetensors.torch import save as st_save

from simple_grpo.wire import codec
from simple_grpo.wire.weights import state_dict_safetensors_bytes

from fuzz_bodies import Case, invalid_tensors, mutate, ours, random_json, st_file, tiny_batch, tiny_ids


ENDPOINTS = [("GET", "/health"), ("GET", "/stats"), ("POST", "/upload"), ("GET", "/get"),
             ("POST", "/logprobs"), ("POST", "/weights"), ("GET", "/weights/version"),
             ("GET", "/weights"), ("POST", "/weights/delta"), ("GET", "/weights/delta")]
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
                ["weight_version", "meta", "batch_id", "kind", "schema_version", "temperature"],
                rng.randrange(1, 4))})
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
