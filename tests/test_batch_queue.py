"""BatchQueue: order, bound policies, staleness, duplicates and exact counters, also under threads."""
from __future__ import annotations

import threading
import time

import pytest

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
