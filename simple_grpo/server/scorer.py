"""The reference server's scorer: one thread owns the model and answers concurrent scoring requests
(uploads and /logprobs) with shared forward passes.

A handler calls `Scorer.score(rows)`, which queues (rows, future) and waits on the future. The
scorer thread waits for the model (`lock`), then takes the oldest waiting request and every other
waiting one at the same temperature, in arrival order, while the padded batch stays within
`batch_tokens` (rows x (widest prompt + widest completion)); a request alone above the budget runs
alone. While fewer requests are gathered than are admitted (`admitted()`: requests between
admission and their answer, so more are on their way) it waits up to `batch_wait_s` for them. The
gathered rows are padded to common widths in the codec's layout (prompts left-padded, completions
right-padded, padding ids 0), scored by one `completion_logprobs` call, and split back: each
request gets its own rows and width. Attention masks and position ids come from the lengths, so a
row's log-probs do not depend on the rows or the padding it shares a pass with (up to float
rounding, tests/test_ref_server.py). Requests at other temperatures wait for the next pass.

A failed pass (e.g. out of memory) that held several requests is retried one request at a time,
so only a request that fails alone gets the error. The thread starts with the first request and
ends after `idle_exit_s` without one (the next request starts another).
"""
from __future__ import annotations

import threading
import time
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F

from simple_grpo.algo.logprobs import completion_logprobs


@dataclass
class Rows:
    """One request's rows on the model's device, ids at padding positions already 0."""
    prompt_ids: torch.Tensor       # [B, P] left-padded
    prompt_lens: torch.Tensor      # [B]
    completion_ids: torch.Tensor   # [B, C] right-padded
    completion_lens: torch.Tensor  # [B]
    temperature: float

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.prompt_ids.shape[0], self.prompt_ids.shape[1], self.completion_ids.shape[1])


@dataclass(eq=False)  # compared by identity
class _Job:
    rows: Rows
    future: Future = field(default_factory=Future)


def pad_cat(rows: list[Rows]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The rows of several requests as one batch: prompts left-padded and completions right-padded
    with 0 to the widest of each -> (prompt_ids, prompt_lens, completion_ids, completion_lens)."""
    P = max(r.prompt_ids.shape[1] for r in rows)
    C = max(r.completion_ids.shape[1] for r in rows)
    return (torch.cat([F.pad(r.prompt_ids, (P - r.prompt_ids.shape[1], 0)) for r in rows]),
            torch.cat([r.prompt_lens for r in rows]),
            torch.cat([F.pad(r.completion_ids, (0, C - r.completion_ids.shape[1])) for r in rows]),
            torch.cat([r.completion_lens for r in rows]))


class Scorer:
    """Batches scoring requests into shared forward passes of `model` (see the module docstring)."""

    def __init__(self, model, lock: threading.Lock, *, batch_tokens: int, batch_wait_s: float,
                 max_logits_bytes: int, admitted: Callable[[], int] = lambda: 0,
                 torch_threads: int = 0, idle_exit_s: float = 30.0):
        self.model, self.lock = model, lock
        self.batch_tokens, self.batch_wait_s = batch_tokens, batch_wait_s
        self.max_logits_bytes, self.admitted = max_logits_bytes, admitted
        self.torch_threads, self.idle_exit_s = torch_threads, idle_exit_s
        self._cv = threading.Condition()
        self._pending: deque[_Job] = deque()
        self._thread: threading.Thread | None = None
        self._stats_lock = threading.Lock()
        self._forwards = {"forwards": 0, "compute_s": 0.0, "rows_per_forward_max": 0,
                          "padded_tokens_per_forward_max": 0, "retried_alone": 0}
        self._hist: dict[int, int] = {}  # requests per forward -> forwards

    def score(self, rows: Rows) -> tuple[torch.Tensor, float]:
        """[B, C] float32 log-probs on CPU and the seconds of the forward pass that scored them."""
        job = _Job(rows)
        with self._cv:
            self._pending.append(job)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="ref-scorer", daemon=True)
                self._thread.start()
            self._cv.notify_all()
        return job.future.result()

    def stats(self) -> dict:
        with self._stats_lock:
            out, hist = dict(self._forwards), dict(sorted(self._hist.items()))
        n = sum(k * v for k, v in hist.items())
        out.update(requests_per_forward={str(k): v for k, v in hist.items()},
                   requests_per_forward_mean=n / out["forwards"] if out["forwards"] else 0.0)
        return out

    def _run(self) -> None:
        if self.torch_threads:
            torch.set_num_threads(self.torch_threads)
        while True:
            with self._cv:
                if not self._cv.wait_for(lambda: self._pending, self.idle_exit_s):
                    self._thread = None  # under the condition: a new request starts another
                    return
            jobs: list[_Job] = []
            try:
                with self.lock:
                    jobs = self._gather()
                    self._forward(jobs)
            except BaseException as e:  # noqa: BLE001 - a bug here must not hang the requests
                if not jobs:  # the gathering failed: fail the oldest request, not all
                    with self._cv:
                        jobs = [self._pending.popleft()] if self._pending else []
                for job in jobs:
                    if not job.future.done():
                        job.future.set_exception(e)

    def _gather(self) -> list[_Job]:
        """The oldest waiting request and the waiting ones at its temperature within the budget."""
        deadline = time.monotonic() + self.batch_wait_s
        jobs: list[_Job] = []
        B = P = C = 0
        with self._cv:
            temp = self._pending[0].rows.temperature
            while True:
                full, rest = False, deque()
                while self._pending:
                    job = self._pending.popleft()
                    b, p, c = job.rows.shape
                    if full or job.rows.temperature != temp:
                        rest.append(job)
                    elif jobs and (B + b) * (max(P, p) + max(C, c)) > self.batch_tokens:
                        full = True
                        rest.append(job)
                    else:
                        jobs.append(job)
                        B, P, C = B + b, max(P, p), max(C, c)
                self._pending = rest
                left = deadline - time.monotonic()
                if full or left <= 0 or len(jobs) + len(self._pending) >= self.admitted():
                    return jobs
                # woken by a new request; the timeout notices requests that left without one
                self._cv.wait(min(left, 0.001))

    def _forward(self, jobs: list[_Job]) -> None:
        """One pass over `jobs`' rows, setting each job's future (retried alone on failure)."""
        t0 = time.perf_counter()
        try:
            with torch.inference_mode():
                args = pad_cat([j.rows for j in jobs]) if len(jobs) > 1 else (
                    jobs[0].rows.prompt_ids, jobs[0].rows.prompt_lens,
                    jobs[0].rows.completion_ids, jobs[0].rows.completion_lens)
                logp = completion_logprobs(self.model, *args, temperature=jobs[0].rows.temperature,
                                           max_logits_bytes=self.max_logits_bytes).float().cpu()
                results, s = [], 0
                for job in jobs:
                    b, _, c = job.rows.shape
                    results.append(logp if len(jobs) == 1 else logp[s:s + b, :c].clone())
                    s += b
            dt = time.perf_counter() - t0
        except BaseException as e:  # noqa: BLE001 - handed to the requests; the thread lives on
            if len(jobs) > 1:
                with self._stats_lock:
                    self._forwards["retried_alone"] += len(jobs)
                for job in jobs:
                    self._forward([job])
            else:
                jobs[0].future.set_exception(e)
            return
        with self._stats_lock:
            f = self._forwards
            f["forwards"] += 1
            f["compute_s"] += dt
            f["rows_per_forward_max"] = max(f["rows_per_forward_max"], int(args[0].shape[0]))
            f["padded_tokens_per_forward_max"] = max(f["padded_tokens_per_forward_max"],
                                                     int(args[0].shape[0]) * (args[0].shape[1] + args[2].shape[1]))
            self._hist[len(jobs)] = self._hist.get(len(jobs), 0) + 1
        for job, lp in zip(jobs, results):
            job.future.set_result((lp, dt))
