"""The thread-safe queue of scored batches between producers and the trainer.

Semantics (documented contract; the reference server exposes them as options):
  * Order: "fifo" (default) hands out the oldest ready batch first, "lifo" the newest.
  * Bound: `max_size` ready + in-flight batches (0 = unbounded). When full:
      - "block": `reserve` raises QueueFull; the server answers 429 + Retry-After and the
        producer retries later (nothing is computed or enqueued for it);
      - "drop_oldest": the upload is accepted and, when it is enqueued, the oldest *ready*
        batch (earliest enqueued, whatever the order) is discarded and counted in `dropped_full`.
  * Staleness: with `max_staleness >= 0`, the current version is
        max(newest weight_version of any upload, newest version a consumer reported via get()),
    and a batch is stale when `current - batch.weight_version > max_staleness`. A stale upload
    is refused before any compute; ready batches that become stale are discarded when the
    version advances. Both are counted in `dropped_stale`.
  * Exactly once: every batch id is remembered (the last `remember_ids` of them). An upload whose
    id was already accepted or dropped is answered "duplicate" and not enqueued again, so
    producers can retry uploads safely; one whose id is still being computed raises Busy.
Counters: batches_in == batches_out + dropped_full + dropped_stale + queue_depth at any quiet
moment; duplicates and refused_full (429s) are not batches_in.
The queue stores opaque items (the server stores RolloutBatch objects); it never copies them.
"""
from __future__ import annotations

import threading
import time
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from typing import Any

ORDERS = ("fifo", "lifo")
WHEN_FULL = ("block", "drop_oldest")


class QueueFull(Exception):
    """The bounded queue is full and the policy is "block"."""


class Busy(Exception):
    """A batch with this id is still being processed; retry later."""


@dataclass
class Entry:
    batch_id: str
    item: Any
    weight_version: int
    seq: int  # enqueue order, 0, 1, 2, ...
    enqueued_at: float = field(default_factory=time.monotonic)


class BatchQueue:
    """Bounded FIFO/LIFO queue with reservation, staleness and duplicate detection."""

    def __init__(self, max_size: int = 0, order: str = "fifo", when_full: str = "block",
                 max_staleness: int = -1, remember_ids: int = 100_000):
        assert order in ORDERS, f"order must be one of {ORDERS}, got {order!r}"
        assert when_full in WHEN_FULL, f"when_full must be one of {WHEN_FULL}, got {when_full!r}"
        assert max_size >= 0, f"max_size must be >= 0 (0 = unbounded), got {max_size}"
        self.max_size, self.order, self.when_full = max_size, order, when_full
        self.max_staleness, self.remember_ids = max_staleness, remember_ids
        self._cond = threading.Condition()
        self._ready: deque[Entry] = deque()
        self._pending: set[str] = set()
        self._seen: OrderedDict[str, None] = OrderedDict()
        self._seq = 0
        self.newest_version = 0  # newest weight_version of any upload
        self.consumer_version = 0  # newest version reported by a consumer
        self.counters = {"batches_in": 0, "batches_out": 0, "dropped_full": 0,
                         "dropped_stale": 0, "duplicates": 0, "refused_full": 0, "dropped_run": 0}
        self._wait_s_total = 0.0

    # ------------------------------------------------------------------ producer side
    @property
    def current_version(self) -> int:
        return max(self.newest_version, self.consumer_version)

    def _is_stale(self, version: int) -> bool:
        return self.max_staleness >= 0 and self.current_version - version > self.max_staleness

    def _purge_stale(self) -> None:
        if self.max_staleness < 0:
            return
        keep = deque(e for e in self._ready if not self._is_stale(e.weight_version))
        self.counters["dropped_stale"] += len(self._ready) - len(keep)
        self._ready = keep

    def _remember(self, batch_id: str) -> None:
        self._seen[batch_id] = None
        while len(self._seen) > self.remember_ids:
            self._seen.popitem(last=False)

    def reserve(self, batch_id: str, weight_version: int) -> str:
        """Admit an upload before computing it -> "ok", "duplicate" or "stale".

        "ok" holds a slot until `put` or `release`; raises QueueFull or Busy."""
        with self._cond:
            if batch_id in self._seen:
                self.counters["duplicates"] += 1
                return "duplicate"
            if batch_id in self._pending:
                raise Busy(f"batch {batch_id} is still being processed")
            if weight_version > self.newest_version:
                self.newest_version = weight_version
                self._purge_stale()
            if self._is_stale(weight_version):
                self.counters["batches_in"] += 1
                self.counters["dropped_stale"] += 1
                self._remember(batch_id)
                return "stale"
            if (self.when_full == "block" and self.max_size
                    and len(self._ready) + len(self._pending) >= self.max_size):
                self.counters["refused_full"] += 1
                raise QueueFull(f"queue full ({self.max_size} batches, policy block)")
            self._pending.add(batch_id)
            return "ok"

    def release(self, batch_id: str) -> None:
        """Give back a reservation whose batch failed: nothing was enqueued."""
        with self._cond:
            self._pending.discard(batch_id)

    def put(self, batch_id: str, item: Any, weight_version: int) -> Entry:
        """Enqueue a reserved batch (drops the oldest ready one when full and drop_oldest)."""
        with self._cond:
            assert batch_id in self._pending, f"batch {batch_id} was not reserved"
            self._pending.discard(batch_id)
            self._remember(batch_id)
            self.counters["batches_in"] += 1
            while self.max_size and len(self._ready) >= self.max_size:
                self._ready.popleft()  # only reachable with drop_oldest (block reserved a slot)
                self.counters["dropped_full"] += 1
            entry = Entry(batch_id, item, weight_version, self._seq)
            self._seq += 1
            if self._is_stale(weight_version):  # the version moved on while it was computed
                self.counters["dropped_stale"] += 1
            else:
                self._ready.append(entry)
                self._cond.notify()
            return entry

    def reset(self) -> int:
        """A new training run: drop the ready batches (counted in dropped_run) and forget the
        versions seen, which counted the previous run's steps -> batches dropped."""
        with self._cond:
            dropped = len(self._ready)
            self._ready.clear()
            self.counters["dropped_run"] += dropped
            self.newest_version = self.consumer_version = 0
            return dropped

    # ------------------------------------------------------------------ consumer side
    def _take(self, prefer: str | None) -> Entry | None:
        """The `prefer`red batch when it is ready; None while it is still being computed; else (no
        preference, or it is gone: stale, dropped, taken) the next one in queue order, if any."""
        if prefer is not None:
            for i, e in enumerate(self._ready):
                if e.batch_id == prefer:
                    del self._ready[i]
                    return e
            if prefer in self._pending:
                return None
        if not self._ready:
            return None
        return self._ready.popleft() if self.order == "fifo" else self._ready.pop()

    def get(self, wait_s: float = 0.0, consumer_version: int | None = None,
            prefer: str | None = None) -> Entry | None:
        """The next ready batch in queue order, waiting up to `wait_s` seconds; None if none.
        `prefer`: a trainer rank's own batch id. It gets that batch back (waiting while it is
        computed) instead of another rank's, so its forward passes done meanwhile are not wasted;
        workers' batches go to whoever asks without a preference."""
        deadline = time.monotonic() + max(0.0, wait_s)
        with self._cond:
            if consumer_version is not None and consumer_version > self.consumer_version:
                self.consumer_version = consumer_version
                self._purge_stale()
            while (entry := self._take(prefer)) is None:
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                self._cond.wait(left)
            self.counters["batches_out"] += 1
            self._wait_s_total += time.monotonic() - entry.enqueued_at
            return entry

    def __len__(self) -> int:
        with self._cond:
            return len(self._ready)

    def stats(self) -> dict[str, Any]:
        with self._cond:
            out = dict(self.counters)
            out.update(queue_depth=len(self._ready), in_flight=len(self._pending),
                       current_version=self.current_version,
                       queue_wait_ms_mean=1000 * self._wait_s_total / max(1, out["batches_out"]))
            return out
