"""BatchQueue: order, bound policies, staleness, duplicates and exact counters, also under threads;
over real HTTP, the trainer drops queued batches holding NaN or inf where it reads them."""
from __future__ import annotations

import threading
import time

import pytest
import torch

from simple_grpo.server.queue import BatchQueue, Busy, QueueFull


def push(q: BatchQueue, bid: str, version: int = 0) -> str:
    status = q.reserve(bid, version)
    if status == "ok":
        q.put(bid, f"item-{bid}", version)
    return status


def drain(q: BatchQueue) -> list[str]:
    out = []
    while (e := q.get()) is not None:
        out.append(e.batch_id)
    return out


def balanced(q: BatchQueue) -> bool:
    s = q.stats()
    return s["batches_in"] == s["batches_out"] + s["dropped_full"] + s["dropped_stale"] + s["queue_depth"]


def test_fifo_and_lifo_order():
    for order, want in [("fifo", ["a", "b", "c"]), ("lifo", ["c", "b", "a"])]:
        q = BatchQueue(order=order)
        for bid in "abc":
            push(q, bid)
        assert drain(q) == want
        assert q.get() is None and balanced(q)


def test_block_policy_refuses_when_full_counting_in_flight():
    q = BatchQueue(max_size=2, when_full="block")
    assert q.reserve("a", 0) == "ok"  # in flight, not yet put
    push(q, "b")
    with pytest.raises(QueueFull, match="queue full"):
        q.reserve("c", 0)
    q.release("a")  # a failed: its slot is free again, nothing was enqueued
    push(q, "c")
    assert drain(q) == ["b", "c"]
    assert q.stats()["refused_full"] == 1 and q.stats()["batches_in"] == 2 and balanced(q)


def test_drop_oldest_policy_counts_exactly():
    for order in ("fifo", "lifo"):
        q = BatchQueue(max_size=3, when_full="drop_oldest", order=order)
        for i in range(10):
            assert push(q, f"b{i}") == "ok"
        s = q.stats()
        assert s["dropped_full"] == 7 and s["queue_depth"] == 3
        got = drain(q)
        assert got == (["b7", "b8", "b9"] if order == "fifo" else ["b9", "b8", "b7"])
        assert balanced(q)


def test_staleness_relative_to_newest_upload_and_consumer_version():
    q = BatchQueue(max_staleness=1)
    push(q, "v0", 0)
    push(q, "v1", 1)
    assert q.stats()["dropped_stale"] == 0
    push(q, "v2", 2)  # now v0 is 2 versions behind: dropped from the ready queue
    assert q.stats()["dropped_stale"] == 1
    assert push(q, "late", 0) == "stale"  # refused before compute, counted
    assert q.stats()["dropped_stale"] == 2
    e = q.get(consumer_version=3)  # consumer is at 3: v1 is now stale too
    assert e.batch_id == "v2"
    assert q.stats()["dropped_stale"] == 3 and q.get() is None and balanced(q)


def test_batch_that_goes_stale_while_computing_is_dropped_at_put():
    q = BatchQueue(max_staleness=0)
    assert q.reserve("slow", 0) == "ok"
    push(q, "new", 1)
    q.put("slow", "x", 0)
    assert drain(q) == ["new"] and q.stats()["dropped_stale"] == 1 and balanced(q)


def test_duplicates_and_busy_ids():
    q = BatchQueue()
    assert q.reserve("x", 0) == "ok"
    with pytest.raises(Busy):
        q.reserve("x", 0)
    q.put("x", "item", 0)
    assert q.reserve("x", 0) == "duplicate"
    assert drain(q) == ["x"]
    assert q.reserve("x", 0) == "duplicate"  # still remembered after it was consumed
    assert q.stats()["duplicates"] == 2 and balanced(q)


def test_get_waits_for_a_batch():
    q = BatchQueue()
    t0 = time.monotonic()
    assert q.get(wait_s=0.1) is None and time.monotonic() - t0 >= 0.09
    threading.Timer(0.05, push, (q, "late")).start()
    e = q.get(wait_s=5)
    assert e is not None and e.batch_id == "late"


def test_concurrent_producers_and_consumer_exactly_once_in_order():
    q = BatchQueue(max_size=16, when_full="block")
    n_prod, n_each = 8, 50
    got: list = []

    def producer(p: int) -> None:
        for i in range(n_each):
            while True:
                try:
                    if q.reserve(f"{p}-{i}", 0) == "ok":
                        q.put(f"{p}-{i}", (p, i), 0)
                    break
                except QueueFull:
                    time.sleep(0.001)

    def consumer() -> None:
        while len(got) < n_prod * n_each:
            e = q.get(wait_s=5)
            assert e is not None, "consumer starved"
            got.append(e)

    threads = [threading.Thread(target=producer, args=(p,)) for p in range(n_prod)]
    c = threading.Thread(target=consumer)
    for t in threads + [c]:
        t.start()
    for t in threads + [c]:
        t.join(30)
    assert sorted(e.item for e in got) == [(p, i) for p in range(n_prod) for i in range(n_each)]
    assert [e.seq for e in got] == sorted(e.seq for e in got)  # FIFO: enqueue order
    for p in range(n_prod):
        assert [e.item[1] for e in got if e.item[0] == p] == list(range(n_each))
    s = q.stats()
    assert s["batches_in"] == s["batches_out"] == n_prod * n_each and balanced(q)


def test_a_rank_gets_its_own_batch_back():
    """Two trainer ranks upload; each asks for its own id and gets it (not the other's, which FIFO
    would hand out first); a preferred batch still being computed is waited for; one that is gone
    (taken, dropped) falls back to queue order."""
    import threading

    q = BatchQueue()
    for bid in ("rank1", "rank0"):
        assert q.reserve(bid, 0) == "ok"
        q.put(bid, bid, 0)
    assert q.get(prefer="rank0").batch_id == "rank0"
    assert q.get(prefer="rank1").batch_id == "rank1"
    assert q.reserve("late", 0) == "ok"  # uploaded, still being scored by the server
    q.reserve("worker", 0)
    q.put("worker", "worker", 0)
    threading.Timer(0.3, lambda: q.put("late", "late", 0)).start()
    assert q.get(wait_s=0.05, prefer="late") is None, "not the worker's batch while ours computes"
    assert q.get(wait_s=5.0, prefer="late").batch_id == "late"
    assert q.get(wait_s=0.0, prefer="late").batch_id == "worker", "ours is gone: queue order"


def test_a_new_run_forgets_the_versions_seen_under_max_staleness(ref_server):
    """--max_staleness=1 over real HTTP: run a reaches version 6 (a worker's upload at 5, the
    trainer's /get at 6); run b's trainer starts (POST /run, another id): the queue drops run a's
    batches and the versions it counted, so run b's batches of version 0 are queued, not stale."""
    from test_codec import make_batch  # tests/ is on sys.path

    from simple_grpo.wire.client import RefClient

    def batch(seed: int, version: int):
        b = make_batch(2, 3, 3, gen=False, ref=False, seed=seed, weight_version=version)
        b.prompt_ids %= 320  # the tiny model's vocabulary
        b.completion_ids %= 320
        return b

    client = RefClient(ref_server(max_staleness=1).url)
    client.start_run("a")
    client.upload(batch(0, 5))
    client.upload(batch(1, 5))
    assert client.get(weight_version=6) is not None and client.stats()["current_version"] == 6
    assert client.start_run("b") == {"run_id": "b", "reset": True, "dropped": 1}
    assert client.stats()["current_version"] == 0
    ids = [client.upload(batch(2 + i, 0)) for i in range(2)]
    assert client.last_upload["status"] == "queued"
    assert [client.get(weight_version=0).batch_id for _ in ids] == ids
    s = client.stats()
    assert s["dropped_stale"] == 0 and s["dropped_run"] == 1 and s["batches_out"] == 3


def _poison(t: torch.Tensor, value: float, col: int) -> None:
    """`value` into row 0 of `t`, at completion column `col` of a [B, C] field."""
    if t.dim() == 1:
        t[0] = value
    else:
        t[0, col] = value


NAN, INF = float("nan"), float("inf")


@pytest.mark.parametrize("field, value, col, at_upload, rejected", [
    ("gen_logprobs", NAN, 1, True, True),    # a worker's NaN sampling log-prob at a completion token
    ("gen_logprobs", NAN, 3, False, False),  # ... in the padding (past completion_lens = 3): unread
    ("gen_logprobs", INF, 3, False, False),  # ... an infinity there: unread too
    ("gen_logprobs", -INF, 0, True, True),   # -inf at the first completion token
    ("advantages", INF, 0, True, True),      # an infinite advantage ([B]: every entry is read)
    ("rewards", NAN, 0, True, True),         # a NaN reward
    ("ref_logprobs", NAN, 2, False, True),   # the reference server scored a NaN (its own fault)
    ("ref_logprobs", NAN, 3, False, False),  # ... in the padding: unread
    ("gen_logprobs_full", NAN, 2, True, True),  # the whole-softmax sampling log-probs (optional) too
])
def test_batches_with_nonfinite_values_where_read_are_rejected(ref_server, monkeypatch, capsys, field,
                                                               value, col, at_upload, rejected):
    """Over real HTTP: a poisoned batch is uploaded, then a clean one; the trainer's RefConnection
    takes the first usable one. The server already refuses (400) some poisons at upload
    (`at_upload`); those are then put in past its check (in its scoring hook, as a server of another
    version, or a fault after the check, would queue them), so the trainer's own check is tested
    for every field. A NaN or inf where the trainer reads it drops the batch, counted in
    rejected_batches, with one warning line naming the field; one in the padding does not."""
    from test_codec import make_batch  # tests/ is on sys.path

    from simple_grpo.train.rollout_source import RefConnection
    from simple_grpo.wire.client import RefClient, RefServerError

    srv = ref_server()
    compute = srv.state.compute

    def scored(obj):  # the server's scoring, poisoning the batch that asks for it
        lp, dt = compute(obj)
        if getattr(obj, "meta", {}).get("poison"):
            if field == "ref_logprobs":
                lp = lp.clone()  # not the inference-mode tensor itself
            _poison(lp if field == "ref_logprobs" else getattr(obj, field), value, col)
        return lp, dt

    monkeypatch.setattr(srv.state, "compute", scored)

    def batch(seed: int, poison: bool = False):
        b = make_batch(2, 3, 4, ref=False, seed=seed, completion_lens=torch.tensor([3, 3]),
                       meta={"poison": poison, "producer": f"w{seed}"})
        b.prompt_ids %= 320  # the tiny model's vocabulary
        b.completion_ids %= 320
        if field == "gen_logprobs_full":
            b.gen_logprobs_full = b.gen_logprobs.clone()
        return b

    client = RefClient(srv.url)
    b, refused = batch(1, poison=field == "ref_logprobs"), False
    if field != "ref_logprobs":
        _poison(getattr(b, field), value, col)
    try:
        bad = client.upload(b)
    except RefServerError as e:
        assert e.status == 400 and "NaN or inf" in str(e), e
        refused, bad = True, client.upload(batch(1, poison=True))
    assert refused == at_upload
    good = client.upload(batch(2))
    conn = RefConnection(srv.url, None, timeout=10, batch_rows=2)
    got = conn.next_batch(weight_version=0)
    assert got.batch_id == (good if rejected else bad)
    assert conn.counts["rejected_batches"] == int(rejected)
    lines = [x for x in capsys.readouterr().err.splitlines() if "dropping a batch" in x]
    assert len(lines) == int(rejected), lines
    if rejected:
        assert f"from w1: its {field} hold NaN or inf" in lines[0], lines
    else:
        assert int(torch.isfinite(getattr(got, field)).sum()) == getattr(got, field).numel() - 1
    conn.close()
