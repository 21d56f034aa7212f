"""The reference server over real HTTP on 127.0.0.1 (in-process waitress, tiny model): numbers equal
the in-process forward pass, bad input gets a one-line JSON 4xx and the server keeps serving,
concurrent producers lose nothing, queue policies count exactly, auth, busy and retries."""
from __future__ import annotations

import json
import socket
import threading
import time

import pytest
import requests
import torch

from simple_grpo.algo.logprobs import completion_logprobs
from simple_grpo.wire import codec
from simple_grpo.wire.client import RefClient, RefServerAuthError, RefServerError, RefServerUnavailable
from simple_grpo.wire.codec import LogprobRequest, RolloutBatch
from conftest import free_port
from test_codec import make_batch, raw, schema1_body, with_header

VOCAB = 320  # save_tiny_model's vocabulary


def ragged(seed: int = 0, B: int = 4, P: int = 9, C: int = 7, **kw) -> RolloutBatch:
    """Ragged prompt and completion lengths, in-vocab ids, and junk ids in the padding."""
    b = make_batch(B, P, C, ref=False, seed=seed, **kw)
    b.prompt_ids %= VOCAB
    b.completion_ids %= VOCAB
    b.prompt_lens = torch.tensor([P, 1, 5, 3][:B] + [2] * max(0, B - 4)).clamp(max=P)
    b.completion_lens = torch.tensor([C, 0, 3, 1][:B] + [2] * max(0, B - 4)).clamp(max=C)
    b.prompt_ids[1, :-1] = -100  # padding may hold anything: the server ignores it
    b.completion_ids[2, 3:] = 10 ** 6
    return b


def naive_logprobs(model, b: RolloutBatch) -> torch.Tensor:
    """log_softmax(logits)[token] for each row's unpadded sequence, fp32 -> [B, C]."""
    out = torch.zeros(b.completion_ids.shape)
    P = b.prompt_ids.shape[1]
    for i in range(b.batch_size):
        p, c = int(b.prompt_lens[i]), int(b.completion_lens[i])
        seq = torch.cat([b.prompt_ids[i, P - p:], b.completion_ids[i, :c]])[None]
        with torch.no_grad():
            logp = torch.log_softmax(model(seq).logits.float()[0], -1)
        for t in range(c):
            out[i, t] = logp[p - 1 + t, b.completion_ids[i, t]]
    return out


def test_logprobs_and_upload_get_match_in_process_forward(ref_server, tiny_model):
    srv = ref_server()
    client = RefClient(srv.url)
    assert client.wait_ready(10)["vocab_size"] == VOCAB
    for seed, (B, P, C) in enumerate([(4, 9, 7), (3, 4, 12), (6, 16, 5)]):
        b = ragged(seed, B, P, C)
        want = naive_logprobs(tiny_model, b)
        clean = [torch.where(torch.arange(P) >= P - b.prompt_lens[:, None], b.prompt_ids, 2),
                 b.prompt_lens, torch.where(torch.arange(C) < b.completion_lens[:, None],
                                            b.completion_ids, 2), b.completion_lens]
        with torch.inference_mode():
            in_process = completion_logprobs(tiny_model, *clean)
        got = client.logprobs(b.prompt_ids, b.prompt_lens, b.completion_ids, b.completion_lens)
        assert got.dtype == torch.float32 and got.shape == (B, C)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
        torch.testing.assert_close(got, in_process, atol=1e-5, rtol=0)
        b.meta = {"seed": seed}
        bid = client.upload(b)
        out = client.get()
        assert out is not None and out.batch_id == bid and out.meta == {"seed": seed}
        torch.testing.assert_close(out.ref_logprobs, want, atol=1e-5, rtol=0)
        for f in ("prompt_ids", "prompt_lens", "completion_ids", "completion_lens", "rewards",
                  "advantages", "gen_logprobs"):
            assert torch.equal(getattr(out, f), getattr(b, f)), f"{f} changed in transit"
        assert out.weight_version == b.weight_version
    assert client.get() is None
    s = client.stats()
    assert s["batches_in"] == s["batches_out"] == 3 and s["logprob_requests"] == 3
    assert s["compute_calls"] == 6 and s["tokens_per_s"] > 0 and s["compute_ms_mean"] > 0


def test_logprobs_and_upload_get_score_at_the_sampling_temperature(ref_server, tiny_model):
    """log_softmax(logits / T) as the trainer computes its policy's, not log_softmax(logits)."""
    client = RefClient(ref_server().url)
    b = ragged(5, temperature=0.7)
    P, C = b.prompt_ids.shape[1], b.completion_ids.shape[1]
    clean = [torch.where(torch.arange(P) >= P - b.prompt_lens[:, None], b.prompt_ids, 2),
             b.prompt_lens, torch.where(torch.arange(C) < b.completion_lens[:, None],
                                        b.completion_ids, 2), b.completion_lens]
    with torch.inference_mode():
        want = completion_logprobs(tiny_model, *clean, temperature=0.7)
        at_1 = completion_logprobs(tiny_model, *clean)
    assert (want - at_1).abs().max() > 1e-2  # the temperature matters for this model
    got = client.logprobs(*_ids4(b), temperature=0.7)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    torch.testing.assert_close(client.logprobs(*_ids4(b)), at_1, atol=1e-5, rtol=0)  # default 1
    bid = client.upload(b)
    out = client.get()
    assert out.batch_id == bid and out.temperature == 0.7
    torch.testing.assert_close(out.ref_logprobs, want, atol=1e-5, rtol=0)


def test_health_fields(ref_server):
    h = requests.get(ref_server().url + "/health", timeout=10).json()
    assert {"model", "dtype", "device", "vocab_size", "protocol_version", "queue_depth"} <= set(h)
    assert h["protocol_version"] == codec.SCHEMA_VERSION and h["dtype"] == "float32"


LIMIT = 40_000  # bytes; max_body_mb below


def _good() -> bytes:
    return codec.encode(ragged())


def _with(**change) -> bytes:
    b = ragged()
    for k, v in change.items():
        setattr(b, k, v)
    return codec.encode(b)


def _tensors(**change) -> bytes:
    b = ragged()
    t = {k: getattr(b, k) for k in ("prompt_ids", "prompt_lens", "completion_ids",
                                    "completion_lens", "rewards", "advantages")}
    t.update(change)
    return raw(t)


def _req(**change) -> bytes:
    b = ragged()
    kw = {k: getattr(b, k) for k in ("prompt_ids", "prompt_lens", "completion_ids", "completion_lens")}
    kw.update(change)
    return codec.encode(LogprobRequest(**kw))


def _ids(row: int, col: int, value: int, which: str = "completion_ids") -> torch.Tensor:
    t = getattr(ragged(), which).clone()
    t[row, col] = value
    return t


def _ids4(b: RolloutBatch | None = None) -> list[torch.Tensor]:
    b = b or ragged()
    return [getattr(b, f) for f in ("prompt_ids", "prompt_lens", "completion_ids", "completion_lens")]


SCHEMA_1 = r"schema version 1 is not supported \(this side speaks 4; schema 2 carries the sampling temperature"

BAD = [  # (name, method, path, body, expected status, message regex)
    ("truncated", "POST", "/upload", lambda: _good()[:-9], 400, "corrupt|truncated"),
    ("garbage", "POST", "/upload", lambda: b"\x13garbage" * 50, 400, "not a simple_grpo|truncated"),
    ("empty body", "POST", "/upload", lambda: b"", 400, "too short"),
    ("schema version", "POST", "/upload", lambda: raw({}, schema_version=99), 400, "schema version 99"),
    ("dtype", "POST", "/upload", lambda: _tensors(prompt_ids=ragged().prompt_ids.int()), 400, "dtype int32"),
    ("float ids", "POST", "/upload", lambda: _tensors(completion_ids=ragged().completion_ids.float()), 400, "dtype float32"),
    ("shapes", "POST", "/upload", lambda: _tensors(rewards=torch.zeros(5)), 400, "mismatched shapes"),
    ("negative id", "POST", "/upload", lambda: _with(completion_ids=_ids(0, 0, -1)), 400, "completion_ids out of range"),
    ("oov id", "POST", "/upload", lambda: _with(prompt_ids=_ids(0, 8, VOCAB, "prompt_ids")), 400, "prompt_ids out of range"),
    ("prompt beyond sequence", "POST", "/upload", lambda: _tensors(prompt_lens=torch.tensor([10, 1, 1, 1])), 400, "prompt_lens must lie"),
    ("empty prompt", "POST", "/upload", lambda: _with(prompt_lens=torch.tensor([0, 1, 1, 1])), 400, "prompt_lens must be >= 1"),
    ("too long", "POST", "/upload", lambda: codec.encode(ragged(P=40, C=30)), 400, "sequence too long"),
    ("nan reward", "POST", "/upload", lambda: _with(rewards=torch.tensor([0.0, float("nan"), 1, 1])), 400, "rewards contain NaN"),
    ("inf advantage", "POST", "/upload", lambda: _with(advantages=torch.tensor([0.0, float("inf"), 1, 1])), 400, "advantages contain"),
    ("nan gen logprob", "POST", "/upload", lambda: _with(gen_logprobs=torch.full((4, 7), float("nan"))), 400, "gen_logprobs"),
    ("empty batch", "POST", "/upload", lambda: codec.encode(make_batch(0, 3, 2)), 400, "empty batch"),
    ("bad batch id", "POST", "/upload", lambda: _with(batch_id="../../etc"), 400, "batch_id"),
    ("schema 1 upload", "POST", "/upload", lambda: schema1_body(ragged()), 400, SCHEMA_1),
    ("schema 1 logprobs", "POST", "/logprobs", lambda: schema1_body(LogprobRequest(*_ids4())), 400, SCHEMA_1),
    ("zero temperature", "POST", "/logprobs", lambda: with_header(_req(), temperature=0), 400, "temperature must be a finite number > 0"),
    ("string temperature", "POST", "/upload", lambda: with_header(_good(), temperature="0.7"), 400, "temperature must be"),
    ("wrong kind", "POST", "/upload", lambda: _req(), 400, "expected a 'rollout' message"),
    ("logprobs wrong kind", "POST", "/logprobs", _good, 400, "expected a 'logprob_request'"),
    ("logprobs oov", "POST", "/logprobs", lambda: _req(completion_ids=_ids(0, 0, 10 ** 9)), 400, "out of range"),
    ("body over limit", "POST", "/upload", lambda: b"x" * (LIMIT + 10), 413, "body too large"),
    ("body far over limit", "POST", "/upload", lambda: b"x" * (LIMIT + 300_000), 413, "body too large"),
    ("chunked over limit", "POST", "/upload", lambda: iter([b"x" * 10_000] * 5), 413, "body too large"),
    ("chunked far over limit", "POST", "/logprobs", lambda: iter([b"x" * 50_000] * 8), 413, "body too large"),
    ("wrong method", "GET", "/upload", None, 405, r"method GET not allowed on /upload \(allowed: POST\)"),
    ("wrong method get", "DELETE", "/get", None, 405, "method DELETE not allowed on /get"),
    ("wrong method health", "POST", "/health", lambda: b"{}", 405, "not allowed on /health"),
    ("unknown path", "GET", "/nope", None, 404, "no such endpoint GET /nope .*/upload"),
    ("bad wait", "GET", "/get?wait=soon", None, 400, "wait must be a number"),
    ("negative version", "GET", "/get?weight_version=-3", None, 400, ">= 0"),
]


@pytest.fixture
def strict_server(ref_server):
    return ref_server(max_body_mb=LIMIT / (1 << 20), max_len=64)


@pytest.mark.parametrize("name,method,path,body,status,match", BAD, ids=[c[0] for c in BAD])
def test_bad_input_gets_json_4xx_and_server_keeps_serving(strict_server, name, method, path,
                                                          body, status, match):
    url = strict_server.url
    try:
        r = requests.request(method, url + path, data=body() if body else None, timeout=10)
    except requests.ConnectionError:  # a client still sending after a 413 may see a reset
        assert status == 413, f"{name}: connection dropped"
    else:
        assert r.status_code == status, f"{name}: {r.status_code} {r.text}"
        assert r.headers["Content-Type"].startswith("application/json")
        assert "\n" not in r.text.strip()
        import re
        assert re.search(match, r.json()["error"]), r.json()["error"]
    assert requests.get(url + "/health", timeout=10).status_code == 200
    client = RefClient(url, retries=0)
    s = client.stats()
    assert s["batches_in"] == s["queue_depth"] == s["in_flight"] == 0, "something was enqueued"
    bid = client.upload(ragged())  # the next valid request succeeds
    assert client.get().batch_id == bid


def test_compute_failure_is_a_json_500_and_releases_everything(ref_server, monkeypatch):
    srv = ref_server(max_inflight=1, threads=3)

    def boom(obj):
        raise RuntimeError("CUDA out of memory (simulated)")

    monkeypatch.setattr(srv.state, "compute", boom)
    r = requests.post(srv.url + "/upload", data=_good(), timeout=10)
    assert r.status_code == 500 and "RuntimeError: CUDA out of memory" in r.json()["error"]
    s = srv.state.stats()
    assert s["in_flight"] == s["queue_depth"] == s["batches_in"] == 0
    monkeypatch.undo()
    client = RefClient(srv.url, retries=0)  # the compute slot was given back: no 503
    assert client.get() is None and client.get() is None
    bid = client.upload(ragged())
    assert client.get().batch_id == bid


def test_client_disconnecting_mid_request_loses_nothing(ref_server):
    srv = ref_server()
    client = RefClient(srv.url)
    first = client.upload(ragged(1))
    host, port = srv.url.removeprefix("http://").split(":")
    for cut in (10, 500):
        data = _good()
        with socket.create_connection((host, int(port)), timeout=5) as s:
            s.sendall(f"POST /upload HTTP/1.1\r\nHost: x\r\nContent-Length: {len(data)}\r\n\r\n"
                      .encode() + data[:cut])
    second = client.upload(ragged(2))
    assert [client.get().batch_id, client.get().batch_id, client.get()] == [first, second, None]
    assert client.stats()["batches_in"] == 2


def _producer_batch(p: int, i: int) -> RolloutBatch:
    b = make_batch(2, 3, 3, gen=False, ref=False, seed=p * 1000 + i, meta={"p": p, "i": i})
    b.prompt_ids %= VOCAB
    b.completion_ids %= VOCAB
    return b


def test_concurrent_producers_one_consumer_exactly_once_fifo(ref_server):
    srv = ref_server(queue_size=0)
    n_prod, n_each, got, errors = 8, 25, [], []

    def produce(p: int) -> None:
        try:
            with RefClient(srv.url) as c:
                for i in range(n_each):
                    c.upload(_producer_batch(p, i))
        except Exception as e:  # surfaced by the assert below
            errors.append(e)

    def consume() -> None:
        try:
            with requests.Session() as s:
                deadline = time.monotonic() + 60
                while len(got) < n_prod * n_each and time.monotonic() < deadline:
                    r = s.get(srv.url + "/get", params={"wait": 1}, timeout=30)
                    if r.status_code == 200:
                        got.append((int(r.headers["X-Batch-Seq"]), codec.decode(r.content)))
        except Exception as e:  # surfaced by the assert below
            errors.append(e)

    threads = [threading.Thread(target=produce, args=(p,)) for p in range(n_prod)]
    threads.append(threading.Thread(target=consume))
    for t in threads:
        t.start()
    for t in threads:
        t.join(90)
    assert not errors, errors
    keys = [(b.meta["p"], b.meta["i"]) for _, b in got]
    assert sorted(keys) == [(p, i) for p in range(n_prod) for i in range(n_each)]  # exactly once
    seqs = [s for s, _ in got]
    assert seqs == sorted(seqs), "not handed out in FIFO (enqueue) order"
    for p in range(n_prod):
        assert [i for q, i in keys if q == p] == list(range(n_each))
    assert all(b.ref_logprobs is not None for _, b in got)
    s = RefClient(srv.url).stats()
    assert s["batches_in"] == s["batches_out"] == n_prod * n_each
    assert s["dropped_full"] == s["dropped_stale"] == s["duplicates"] == 0


def test_concurrent_producers_drop_oldest_counted_exactly(ref_server):
    srv = ref_server(queue_size=10, when_full="drop_oldest")

    def produce(p: int) -> None:
        with RefClient(srv.url) as c:
            for i in range(25):
                c.upload(_producer_batch(p, i))

    threads = [threading.Thread(target=produce, args=(p,)) for p in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    client = RefClient(srv.url)
    s = client.stats()
    assert s["batches_in"] == 200 and s["dropped_full"] == 190 and s["queue_depth"] == 10
    assert len([b for b in iter(client.get, None)]) == 10


def test_block_policy_429_then_lifo_order(ref_server):
    srv = ref_server(queue_size=3, when_full="block", queue_order="lifo")
    client = RefClient(srv.url, retries=0)
    ids = [client.upload(ragged(i)) for i in range(3)]
    r = requests.post(srv.url + "/upload", data=_good(), timeout=10)
    assert r.status_code == 429 and r.headers["Retry-After"] == "1" and "queue full" in r.json()["error"]
    with pytest.raises(RefServerUnavailable, match="429"):
        client.upload(ragged(5))
    assert [client.get().batch_id for _ in range(3)] == ids[::-1]
    assert client.stats()["refused_full"] == 2


def test_staleness_drops_counted_exactly(ref_server):
    srv = ref_server(max_staleness=1)
    client = RefClient(srv.url)
    ids = {v: client.upload(ragged(v, weight_version=v)) for v in (0, 1, 2)}
    assert client.stats()["dropped_stale"] == 1  # v0 is 2 versions behind v2
    client.upload(ragged(9, weight_version=0))
    assert client.last_upload["status"] == "stale"
    out = client.get(weight_version=3)  # the consumer is at version 3: v1 is stale too
    assert out.batch_id == ids[2] and client.get() is None
    s = client.stats()
    assert s["dropped_stale"] == 3 and s["batches_in"] == 4 and s["batches_out"] == 1


def test_retried_upload_is_not_enqueued_twice(ref_server):
    client = RefClient(ref_server().url)
    b = ragged(batch_id="fixed-id-1")
    assert client.upload(b) == client.upload(b) == "fixed-id-1"
    assert client.last_upload["status"] == "duplicate"
    assert client.get().batch_id == "fixed-id-1" and client.get() is None


def test_auth(ref_server):
    srv = ref_server(token="s3cret")
    for method, path in [("GET", "/health"), ("POST", "/upload"), ("GET", "/get"),
                         ("GET", "/nope"), ("POST", "/logprobs"), ("GET", "/stats")]:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}):
            r = requests.request(method, srv.url + path, headers=headers, timeout=10)
            assert r.status_code == 401 and "token" in r.json()["error"], (path, headers)
    good = RefClient(srv.url, token="s3cret")
    assert good.wait_ready(5)["auth"] is True
    bid = good.upload(ragged())
    assert good.get().batch_id == bid
    assert good.logprobs(*[getattr(ragged(), f) for f in ("prompt_ids", "prompt_lens",
                                                          "completion_ids", "completion_lens")]).shape == (4, 7)
    bad = RefClient(srv.url, token="nope", retries=3)
    with pytest.raises(RefServerAuthError, match="401"):
        bad.health()
    with pytest.raises(RefServerAuthError):
        bad.wait_ready(5)
    open_srv = ref_server()  # no token: no header needed
    assert requests.get(open_srv.url + "/health", timeout=10).status_code == 200


def test_busy_compute_does_not_block_health_or_get(ref_server):
    srv = ref_server(max_inflight=1, threads=3)
    b = ragged()
    args = (b.prompt_ids, b.prompt_lens, b.completion_ids, b.completion_lens)
    with srv.state.model_lock:  # the model is "computing" for as long as we hold this
        t = threading.Thread(target=RefClient(srv.url).logprobs, args=args)
        t.start()
        deadline = time.monotonic() + 10
        while srv.state.inflight._value > 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        t0 = time.monotonic()
        assert requests.get(srv.url + "/health", timeout=5).status_code == 200
        assert requests.get(srv.url + "/get", timeout=5).status_code == 204
        r = requests.post(srv.url + "/logprobs", data=_req(), timeout=5)
        assert r.status_code == 503 and r.headers["Retry-After"] == "1"
        assert time.monotonic() - t0 < 3
    t.join(10)
    assert not t.is_alive() and srv.state.stats()["busy"] == 1


def test_client_does_not_retry_4xx_but_retries_connection_errors(ref_server):
    srv = ref_server()
    client = RefClient(srv.url, retries=3, backoff_s=0.01)
    with pytest.raises(RefServerError, match="400: rewards contain NaN") as e:
        client.upload(ragged(rewards=torch.tensor([float("nan")] * 4)))
    assert e.value.status == 400 and client.stats()["rejected"] == 1  # one attempt only
    port = free_port()
    late = RefClient(f"http://127.0.0.1:{port}", retries=8, backoff_s=0.1)
    threading.Timer(0.3, ref_server, kwargs={"port": port}).start()
    assert late.health()["status"] == "ok"


def test_wait_ready_times_out_with_a_clear_message():
    url = f"http://127.0.0.1:{free_port()}"
    said: list[str] = []
    t0 = time.monotonic()
    with pytest.raises(RefServerUnavailable, match="not ready after"):
        RefClient(url).wait_ready(timeout_s=1.0, poll_s=0.1, log=said.append)
    assert time.monotonic() - t0 < 5
    assert said and said[0].startswith(f"waiting for ref server at {url}")


def test_error_bodies_are_json_lines(ref_server):
    r = requests.post(ref_server().url + "/upload", data=b"x" * 100, timeout=10)
    assert json.loads(r.text)["error"] and r.text.count("\n") == 0
