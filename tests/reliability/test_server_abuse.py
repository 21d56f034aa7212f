"""Abusive clients against a real `python ref_server.py` process (tiny model, loopback, --token):
slowloris connections and oversized / never-ending bodies do not keep a normal client waiting and
are closed within a timeout; requests with no or a wrong token get 401 on every endpoint and leave
nothing behind (no batch, no compute, no weights, no worker record)."""
from __future__ import annotations

import random
import select
import socket
import threading
import time

import pytest
import requests
import torch

from simple_grpo.wire import codec
from simple_grpo.wire.client import RefClient
from simple_grpo.wire.weights import state_dict_safetensors_bytes
from fuzz_bodies import tiny_batch, tiny_ids
from test_fuzz import ServerProcess

TOKEN = "s3cret-token"
TIMEOUT_S = 2  # the server's --request_timeout_s
CLOSE_BOUND_S = TIMEOUT_S + 3  # + waitress's 1 s maintenance interval, its 1 s loop, slack
NORMAL_BOUND_S = 2.0  # a normal request while abusers are connected
CONNECTION_LIMIT = 200  # the server's --connection_limit (waitress's own default is 100)


@pytest.fixture(scope="module")
def server(tiny_model_dir, tmp_path_factory):
    srv = ServerProcess(tiny_model_dir, tmp_path_factory.mktemp("abuse") / "server.log",
                        f"--token={TOKEN}", f"--request_timeout_s={TIMEOUT_S}", "--max_body_mb=1",
                        "--max_weights_mb=16", f"--connection_limit={CONNECTION_LIMIT}")
    yield srv
    srv.stop()


def normal_requests(srv) -> float:
    """Seconds for a /health and a small /logprobs of a normal client (fresh connection)."""
    t0 = time.monotonic()
    with RefClient(srv.url, token=TOKEN, timeout=30, retries=0) as client:
        assert client.health()["status"] == "ok"
        r = tiny_ids(random.Random(0), 2, 4, 3)
        out = client.logprobs(r.prompt_ids, r.prompt_lens, r.completion_ids, r.completion_lens)
        assert out.shape == (2, 3) and bool(torch.isfinite(out).all())
    return time.monotonic() - t0


def read_answer(s: socket.socket) -> str:
    """Everything the server sends until it closes the connection (or 5 s of silence)."""
    data = b""
    try:
        while chunk := s.recv(65536):
            data += chunk
    except OSError:
        pass
    return data.decode("latin-1")


def connect(srv) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", srv.port), timeout=5)
    s.setblocking(False)
    return s


def closed_by_server(s: socket.socket) -> bool:
    """True once the server closed its side (EOF or reset); drains any answer it sent."""
    try:
        while select.select([s], [], [], 0)[0]:
            if not s.recv(65536):
                return True
    except (ConnectionError, OSError):
        return True
    return False


class Trickle:
    """Sockets each sending `payload` a few bytes at a time, on one background thread; records
    when the server closed each of them (seconds after its first byte)."""

    def __init__(self, socks: list[socket.socket], payload: bytes, step: int = 1,
                 interval: float = 0.1, repeat: bool = False):
        self.socks, self.payload, self.step, self.interval = socks, payload, step, interval
        self.repeat, self.sent = repeat, [0] * len(socks)
        self.started = time.monotonic()
        self.closed_after: list[float | None] = [None] * len(socks)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        while not self.stop.is_set() and None in self.closed_after:
            for i, s in enumerate(self.socks):
                if self.closed_after[i] is not None:
                    continue
                if closed_by_server(s):
                    self.closed_after[i] = time.monotonic() - self.started
                    continue
                pos = self.sent[i] % len(self.payload) if self.repeat else self.sent[i]
                chunk = self.payload[pos:pos + self.step]
                try:
                    if chunk:
                        self.sent[i] += s.send(chunk)
                except BlockingIOError:
                    pass
                except OSError:
                    self.closed_after[i] = time.monotonic() - self.started
            time.sleep(self.interval)

    def close(self):
        self.stop.set()
        self.thread.join(10)
        for s in self.socks:
            s.close()


def test_slowloris_does_not_block_others_and_is_closed(server):
    assert normal_requests(server) < 30  # warm (first compute)
    # headers one byte every 0.1 s: 150 connections (under --connection_limit, above waitress's
    # default 100, so the option is in effect)
    head = (b"POST /upload HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + TOKEN.encode() +
            b"\r\nX-Pad: " + b"a" * 4000 + b"\r\n\r\n")
    slow = Trickle([connect(server) for _ in range(150)], head)
    try:
        took = [normal_requests(server) for _ in range(5)]
        time.sleep(0.5)
        took.append(normal_requests(server))
        deadline = time.monotonic() + CLOSE_BOUND_S + 2
        while None in slow.closed_after and time.monotonic() < deadline:
            time.sleep(0.1)
        closed = slow.closed_after
    finally:
        slow.close()
    print(f"\nslowloris x150: normal /health + /logprobs took max {max(took):.3f} s "
          f"(mean {sum(took) / len(took):.3f} s); slow connections closed after "
          f"{min(c or 99 for c in closed):.1f}..{max(c or 99 for c in closed):.1f} s, "
          f"{max(slow.sent)} header bytes sent")
    assert max(took) < NORMAL_BOUND_S, took
    assert None not in closed and max(closed) < CLOSE_BOUND_S, closed

    # more slow connections than the server accepts: new clients wait in the backlog, but only
    # until the server closes the slow ones
    slow = Trickle([connect(server) for _ in range(CONNECTION_LIMIT + 50)], head)
    try:
        time.sleep(0.5)
        took_over = normal_requests(server)
    finally:
        slow.close()
    print(f"slowloris x{CONNECTION_LIMIT + 50}: normal requests took {took_over:.3f} s")
    assert took_over < 2 * CLOSE_BOUND_S
    assert normal_requests(server) < NORMAL_BOUND_S


def test_oversized_and_endless_bodies(server):
    auth = f"Authorization: Bearer {TOKEN}\r\n"
    # a huge declared length: 413 right after the headers, connection closed
    for path in ("/upload", "/logprobs", "/weights?version=1", "/health"):
        s = socket.create_connection(("127.0.0.1", server.port), timeout=5)
        t0 = time.monotonic()
        s.sendall(f"POST {path} HTTP/1.1\r\nHost: x\r\n{auth}Content-Length: {2 ** 40}\r\n\r\n"
                  .encode())
        answer = read_answer(s)
        assert answer.startswith("HTTP/1.1 413") and '"error"' in answer, (path, answer[:300])
        assert time.monotonic() - t0 < 2
        s.close()

    # a chunked /upload that never ends, sent as fast as possible: 413 at the 1 MiB cap
    s = socket.create_connection(("127.0.0.1", server.port), timeout=10)
    s.sendall(f"POST /upload HTTP/1.1\r\nHost: x\r\n{auth}Transfer-Encoding: chunked\r\n\r\n".encode())
    chunk, sent, answer = b"%x\r\n" % 65536 + b"z" * 65536 + b"\r\n", 0, b""
    t0 = time.monotonic()
    try:
        while sent < (64 << 20) and not answer:
            s.sendall(chunk)
            sent += len(chunk)
            if select.select([s], [], [], 0)[0]:
                answer = s.recv(4096)
    except ConnectionError:
        pass
    if not answer:
        try:
            answer = s.recv(4096)
        except OSError:
            pass
    s.close()
    print(f"\nendless chunked /upload: answered {answer[:12]!r} after {sent >> 10} KiB, "
          f"{time.monotonic() - t0:.2f} s")
    assert answer.startswith(b"HTTP/1.1 413") and sent < (16 << 20), (answer[:200], sent)

    # abusers that stay active but never finish, and one that goes silent mid-body
    trickle_head = (f"POST /upload HTTP/1.1\r\nHost: x\r\n{auth}Transfer-Encoding: chunked\r\n\r\n"
                    .encode())
    stalled_weights = (f"POST /weights?version=7 HTTP/1.1\r\nHost: x\r\n{auth}"
                       f"Content-Length: {8 << 20}\r\n\r\n").encode() + b"\x00" * 1000
    socks = {"trickled chunked /upload": connect(server), "stalled /weights body": connect(server),
             "silent connection": connect(server)}
    socks["trickled chunked /upload"].sendall(trickle_head)
    socks["stalled /weights body"].sendall(stalled_weights)
    trickle = Trickle([socks["trickled chunked /upload"]], b"1\r\nz\r\n", step=6, interval=0.2,
                      repeat=True)
    t0 = time.monotonic()
    closed: dict[str, float] = {}
    try:
        took = normal_requests(server)
        while len(closed) < len(socks) and time.monotonic() - t0 < CLOSE_BOUND_S + 3:
            for name, s in socks.items():
                if name not in closed and (trickle.closed_after[0] is not None if s is
                                           trickle.socks[0] else closed_by_server(s)):
                    closed[name] = time.monotonic() - t0
            time.sleep(0.05)
    finally:
        trickle.close()
        for s in socks.values():
            s.close()
    print(f"normal requests took {took:.3f} s; abusive connections closed after "
          f"{ {k: round(v, 1) for k, v in closed.items()} }")
    assert took < NORMAL_BOUND_S
    assert set(closed) == set(socks) and max(closed.values()) < CLOSE_BOUND_S, closed
    assert RefClient(server.url, token=TOKEN).weights_version()["version"] is None


def test_unauthenticated_large_upload_is_refused_before_its_body(server):
    """Regression: without the token, POST /weights gets only the small body cap, so a client
    without the token cannot make the server spool gigabytes to disk before its 401."""
    for auth, expect_answer in (("", True), ("Authorization: Bearer wrong\r\n", True),
                                (f"Authorization: Bearer {TOKEN}\r\n", False)):
        s = socket.create_connection(("127.0.0.1", server.port), timeout=1.5)
        s.sendall(f"POST /weights?version=9 HTTP/1.1\r\nHost: x\r\n{auth}"
                  f"Content-Length: {8 << 20}\r\n\r\n".encode() + b"\x00" * 100)
        try:
            answer = s.recv(4096)
        except socket.timeout:
            answer = b""  # the server waits for the authorized body
        s.close()
        assert answer.startswith(b"HTTP/1.1 413") if expect_answer else answer == b"", (auth, answer)


def test_wrong_or_missing_token_is_401_everywhere_and_leaves_nothing(server):
    good = RefClient(server.url, token=TOKEN)
    before = good.stats()
    rng = random.Random(3)
    bodies = {"/upload": codec.encode(tiny_batch(rng, 2, 3, 2)),
              "/logprobs": codec.encode(tiny_ids(rng, 2, 3, 2)),
              "/weights?version=5": state_dict_safetensors_bytes({"w": torch.ones(3)})}
    routes = [("GET", "/health"), ("GET", "/stats"), ("GET", "/get"), ("GET", "/get?wait=1"),
              ("GET", "/weights/version"), ("GET", "/weights"), ("POST", "/upload"),
              ("POST", "/logprobs"), ("POST", "/weights?version=5"), ("GET", "/nope"),
              ("PUT", "/upload"), ("DELETE", "/weights")]
    # (trailing spaces are not part of an HTTP header value: "Bearer <token> " is the token)
    auths = [None, "Bearer wrong", "Bearer", f"Bearer {TOKEN[:-1]}", f"bearer {TOKEN}",
             f"Bearer  {TOKEN}", TOKEN, f"Basic {TOKEN}",
             f"Bearer {TOKEN}x", "Bearer \u00e9"]
    n = 0
    for method, path in routes:
        for auth in auths:
            headers = {"X-Worker-Id": "intruder", "X-Weight-Version": "3"}
            if auth is not None:
                headers["Authorization"] = auth
            r = requests.request(method, server.url + path, data=bodies.get(path),
                                 headers={k: v.encode("latin-1") for k, v in headers.items()},
                                 timeout=10)
            assert r.status_code == 401, (method, path, auth, r.status_code, r.text[:200])
            assert "token" in r.json()["error"] and r.headers["WWW-Authenticate"] == "Bearer"
            n += 1
    after = good.stats()
    print(f"\n{n} requests with no or a wrong token: all 401")
    for key in ("batches_in", "batches_out", "queue_depth", "in_flight", "logprob_requests",
                "compute_calls", "tokens", "duplicates"):
        assert after[key] == before[key], key
    assert after["weights"] == before["weights"] and "intruder" not in after["workers"]
    assert after["rejected"] - before["rejected"] >= n
    assert good.get() is None
    # the right token still works
    assert good.upload(tiny_batch(rng, 2, 3, 2))
    # regression: HEAD /get (routed to GET by bottle) consumed a batch and dropped its body
    r = requests.head(server.url + "/get", headers={"Authorization": f"Bearer {TOKEN}"}, timeout=10)
    assert r.status_code == 405 and good.stats()["queue_depth"] == 1
    assert good.get() is not None
    assert good.publish_weights(bodies["/weights?version=5"], version=5)["version"] == 5
