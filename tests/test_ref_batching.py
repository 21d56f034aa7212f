"""The reference server batches concurrent scoring requests (simple_grpo/server/scorer.py): requests
waiting together share one forward pass per temperature, within --batch_tokens, and each gets the
same log-probs as when scored alone; a lone request does not wait for company."""
from __future__ import annotations

import threading
import time

import torch

import simple_grpo.server.scorer as scorer_mod
from simple_grpo.wire.client import RefClient
from test_ref_server import ragged


def _requests():
    """(kind, batch): several shapes, one with repeated prompts (the shared-prompt path), two
    temperatures, uploads and /logprobs."""
    grouped = ragged(7, 4, 6, 5)
    grouped.prompt_ids[1], grouped.prompt_lens[1] = grouped.prompt_ids[0], grouped.prompt_lens[0]
    grouped.prompt_ids[3], grouped.prompt_lens[3] = grouped.prompt_ids[2], grouped.prompt_lens[2]
    return [("logprobs", ragged(0, 4, 9, 7)), ("logprobs", ragged(1, 3, 4, 12)),
            ("upload", ragged(2, 6, 16, 5)), ("logprobs", grouped),
            ("logprobs", ragged(3, 3, 5, 3, temperature=0.7)),
            ("upload", ragged(4, 4, 6, 6, temperature=0.7))]


def _ids4(b):
    return b.prompt_ids, b.prompt_lens, b.completion_ids, b.completion_lens


def _send(client: RefClient, kind: str, b):
    if kind == "logprobs":
        return client.logprobs(*_ids4(b), temperature=b.temperature)
    return client.upload(b)


def _concurrently(srv, reqs) -> list:
    """Send `reqs` from one thread each while the model is held, so that they all wait together,
    then let the scorer go; -> each request's answer."""
    out: list = [None] * len(reqs)

    def one(i, kind, b):
        out[i] = _send(RefClient(srv.url), kind, b)

    threads = [threading.Thread(target=one, args=(i, *r)) for i, r in enumerate(reqs)]
    with srv.state.model_lock:
        for t in threads:
            t.start()
        deadline = time.monotonic() + 20
        while len(srv.state.scorer._pending) < len(reqs) and time.monotonic() < deadline:
            time.sleep(0.005)
    for t in threads:
        t.join(30)
    return out


def test_concurrent_requests_share_forwards_and_match_each_scored_alone(ref_server):
    srv = ref_server(batch_wait_ms=5000)  # a pass starts once every admitted request has arrived
    client = RefClient(srv.url)
    reqs = _requests()
    alone = [client.logprobs(*_ids4(b), temperature=b.temperature) for _, b in reqs]
    s = client.stats()
    assert s["forwards"] == len(reqs) and s["requests_per_forward"] == {"1": len(reqs)}
    got = _concurrently(srv, reqs)
    by_id = {}
    while (b := client.get()) is not None:
        by_id[b.batch_id] = b.ref_logprobs
    s = client.stats()
    # one pass per temperature: 4 requests at 1.0, 2 at 0.7
    assert s["forwards"] == len(reqs) + 2 and s["requests_per_forward"] == {"1": 6, "2": 1, "4": 1}
    assert s["rows_per_forward_max"] == 4 + 3 + 6 + 4 and s["compute_calls"] == 2 * len(reqs)
    assert s["padded_tokens_per_forward_max"] == 17 * (16 + 12)
    assert abs(s["requests_per_forward_mean"] - 12 / 8) < 1e-9 and s["batches_in"] == 2
    for (kind, b), want, answer in zip(reqs, alone, got):
        lp = by_id[answer] if kind == "upload" else answer
        assert lp.shape == want.shape == b.completion_ids.shape and lp.dtype == torch.float32
        torch.testing.assert_close(lp, want, atol=1e-6, rtol=0)  # fp32: padding changes nothing
        assert bool((lp[torch.arange(lp.shape[1]) >= b.completion_lens[:, None]] == 0).all())


def test_token_budget_splits_the_passes(ref_server):
    reqs = [("logprobs", ragged(i, 4, 6, 4)) for i in range(4)]  # 40 padded tokens each
    srv = ref_server(batch_wait_ms=5000, batch_tokens=80)
    client = RefClient(srv.url)
    alone = [client.logprobs(*_ids4(b)) for _, b in reqs]
    got = _concurrently(srv, reqs)
    s = client.stats()
    assert s["requests_per_forward"] == {"1": 4, "2": 2} and s["padded_tokens_per_forward_max"] == 80
    for want, lp in zip(alone, got):
        torch.testing.assert_close(lp, want, atol=1e-6, rtol=0)


def test_a_lone_request_does_not_wait_for_company(ref_server):
    client = RefClient(ref_server(batch_wait_ms=60_000).url)
    t0 = time.monotonic()
    client.logprobs(*_ids4(ragged()))
    assert time.monotonic() - t0 < 20 and client.stats()["forwards"] == 1


def test_a_failed_shared_pass_is_retried_alone(ref_server, monkeypatch):
    real = scorer_mod.completion_logprobs

    def small_only(model, prompt_ids, *a, **kw):  # "out of memory" above 4 rows
        if prompt_ids.shape[0] > 4:
            raise RuntimeError("out of memory (simulated)")
        return real(model, prompt_ids, *a, **kw)

    monkeypatch.setattr(scorer_mod, "completion_logprobs", small_only)
    srv = ref_server(batch_wait_ms=5000)
    reqs = [("logprobs", ragged(1, 3, 5, 4)), ("logprobs", ragged(2, 3, 5, 4))]
    got = _concurrently(srv, reqs)
    s = RefClient(srv.url).stats()
    assert s["retried_alone"] == 2 and s["requests_per_forward"] == {"1": 2}
    assert all(lp.shape == (3, 4) for lp in got)
