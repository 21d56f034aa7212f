"""Where the trainer's batches come from: the reference server's queue, fed by the trainer itself
(`exchange`: upload our batch, take the next ready one) and by generation workers (`next_batch`).

Every batch taken from the queue is checked before it is trained on:
  * staleness: generated more than `max_staleness` weight versions before the trainer's current
    one -> dropped, counted in `counts["stale_dropped"]`;
  * shape: a batch of another size than one rank's share of a step (a worker started with other
    --prompts_per_step / --num_generations / --trainer_ranks) -> dropped, counted in
    `counts["rejected_batches"]`, with a one-line warning naming the fix;
  * numbers: a NaN or an infinity in a floating field where the trainer reads it (codec
    `nonfinite_fields`: sampling or reference log-probs at completion tokens, rewards, advantages;
    padding may hold anything) -> dropped the same way, one warning line naming the fields;
  * contract: a batch made with other settings than the trainer's (its BatchContract,
    simple_grpo/wire/contract.py: advantage scale, rewards and weights, dynamic sampling and its
    filter metric, max/min new tokens, top-p, temperature, group size, overlong cache, base model,
    prompt rendering, task and fields, reward code and failure value), or carrying none ->
    dropped the same way, one warning line per differing field naming both values, the producer
    and the option to fix.
Each distinct warning is printed once.
The server hands each uploaded batch out at most once, and the trainer also remembers the ids it
took (a worker that re-sends a batch to a restarted server cannot make it train one twice).

Server outages: when the server stops answering, the trainer prints what it waits for and polls
/health for up to `timeout` seconds (then a clear error). When the server that comes back is a new
instance (restarted: its queue is gone), the trainer re-sends its own batch if that was still in
the lost queue (`counts["rollouts_resent"]`; `counts["server_restarts"]`); workers re-send theirs.
"""
from __future__ import annotations

import sys
import time
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable

import torch

from simple_grpo.errors import UserError
from simple_grpo.train import collectives
from simple_grpo.gen.batch_contract import FIXES
from simple_grpo.wire.codec import RolloutBatch, nonfinite_fields
from simple_grpo.wire.contract import BatchContract, contract_differences


class RefConnection:
    """The reference server as the trainer sees it; see the module docstring."""

    def __init__(self, url: str, token: str | None, timeout: float, process=None, *,
                 batch_rows: int | None = None, max_staleness: int = -1,
                 contract: BatchContract | None = None):
        from simple_grpo.wire.client import RefClient

        self.url, self.timeout, self.process = url, timeout, process
        self.batch_rows, self.max_staleness = batch_rows, max_staleness
        self.contract = contract  # None: batches made with any settings are taken (tests, tools)
        self.client = RefClient(url, token=token, retries=2, max_backoff_s=2.0)
        self.counts = {"stale_dropped": 0, "rejected_batches": 0, "duplicates_dropped": 0,
                       "server_restarts": 0, "rollouts_resent": 0, "queue_full_bypass": 0}
        self._warned: set[str] = set()
        self._taken: OrderedDict[str, None] = OrderedDict()  # ids of batches already trained on
        self._outstanding: RolloutBatch | None = None  # our upload, not yet back from the queue
        self._resend: RolloutBatch | None = None  # ... to upload again to a restarted server
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ref-exchange")
        self.health = self.client.wait_ready(timeout, dead=process.why_dead if process is not None else None)
        self.instance = self.health.get("instance")
        self.watch = False  # rank 0: say when a generation worker falls silent (`watch_workers`)
        self._silent: set[str] = set()
        self._watched_at = 0.0

    def _call(self, fn, is_get: bool = False):
        """fn() against the server; through an outage, wait (with messages) for it to return.
        After a /get, a changed server instance (a restart between calls) is noticed too."""
        from simple_grpo.wire.client import RefServerQueueFull, RefServerUnavailable

        while True:
            try:
                if self._resend is not None:
                    try:
                        self.client.upload(self._resend)  # idempotent: same batch id
                    except RefServerQueueFull:  # workers refilled the new queue: train theirs
                        self._outstanding = None
                    self._resend = None
                out = fn()
            except RefServerQueueFull:
                raise
            except RefServerUnavailable as e:
                if self.process is not None and not self.process.alive():
                    self.process.restart()
                    print(f"[trainer] the reference server exited; restarted it at {self.url}",
                          file=sys.stderr, flush=True)
                else:
                    print(f"[trainer] reference server at {self.url} unreachable ({str(e)[:120]}); "
                          f"waiting up to {self.timeout:.0f} s for it", file=sys.stderr, flush=True)
                health = self.client.wait_ready(self.timeout, poll_s=0.25)
                print(f"[trainer] reference server at {self.url} is back", file=sys.stderr, flush=True)
                self._check_instance(health.get("instance"))
                continue
            if is_get and self._check_instance(self.client.last_instance) and out is None:
                continue  # our batch died with the old instance's queue: send it again, get again
            return out

    def _check_instance(self, instance: str | None) -> bool:
        """Notice a restarted server (its queue is gone) -> True when our batch must be re-sent."""
        if instance is None or instance == self.instance:
            return False
        self.instance = instance
        self.counts["server_restarts"] += 1
        print(f"[trainer] the reference server at {self.url} restarted (its queue was lost)",
              file=sys.stderr, flush=True)
        if self._outstanding is None:
            return False
        self.counts["rollouts_resent"] += 1
        self._resend = self._outstanding
        return True

    def _usable(self, b: RolloutBatch, weight_version: int) -> bool:
        if b.batch_id in self._taken:
            self.counts["duplicates_dropped"] += 1
            return False
        self._taken[b.batch_id] = None
        while len(self._taken) > 100_000:
            self._taken.popitem(last=False)
        if (self.max_staleness >= 0 and weight_version - b.weight_version > self.max_staleness) or \
                b.weight_version > weight_version:  # newer than ours: another run's weights, or
            self.counts["stale_dropped"] += 1      # published after the checkpoint we resumed from
            return False
        if self.batch_rows and b.batch_size != self.batch_rows:
            self._reject(b, f"{b.batch_size} rows, this trainer takes {self.batch_rows}",
                         "--prompts_per_step, --num_generations and --trainer_ranks=<its ranks>")
            return False
        bad = nonfinite_fields(b)
        if bad:  # one NaN would make the loss NaN, or the gradient norm inf (a skipped step)
            self._reject(b, f"its {', '.join(bad)} hold NaN or inf at valid positions", None,
                         how="a numerical fault where it was made: check that producer's model and "
                             "dtype (ref_logprobs: the reference server's)")
            return False
        if self.contract is None:
            return True
        if b.contract is None:
            self._reject(b, "it carries no batch contract", None)
            return False
        fields = contract_differences(self.contract, b.contract)
        for name in fields:
            self._reject(b, f"its {name} is {getattr(b.contract, name)!r}, this trainer's is "
                            f"{getattr(self.contract, name)!r}", FIXES[name], count=False)
        if fields:
            self.counts["rejected_batches"] += 1
        return not fields

    def _reject(self, b: RolloutBatch, why: str, fix: str | None, count: bool = True,
                how: str | None = None) -> None:
        """Count a dropped batch (unless `count` is False) and warn once per distinct `why` (with
        `how` to fix it, by default: start workers with the trainer's `fix`)."""
        if count:
            self.counts["rejected_batches"] += 1
        if why in self._warned:
            return
        self._warned.add(why)
        how = how or (f"start workers with the trainer's {fix}" if fix else
                      "start workers with this version's grpo_ref_split.py --mode=generate")
        print(f"[trainer] dropping a batch from {b.meta.get('producer', '?')}: {why} ({how})",
              file=sys.stderr, flush=True)

    def watch_workers(self, every_s: float = 5.0) -> None:
        """With `watch` (rank 0), at most every `every_s`: one line when a generation worker that
        reported to the server has been silent for WORKER_SILENCE_S (a live worker reports every
        HEARTBEAT_S, generating or not: it stopped, or its box did), one when it is back.
        Training goes on with the batches that arrive."""
        from simple_grpo.gen.worker import WORKER_SILENCE_S
        from simple_grpo.wire.client import RefServerError, RefServerUnavailable

        if not self.watch or time.monotonic() - self._watched_at < every_s:
            return
        self._watched_at = time.monotonic()
        try:
            workers = self.client.stats().get("workers", {})
        except (RefServerUnavailable, RefServerError):
            return  # an outage is reported where the trainer waits for it
        for wid, w in workers.items():
            if wid.startswith("trainer"):  # the overlap sampler: its own line (sampler.Overlap)
                continue
            ago = float(w.get("last_seen_s_ago", 0.0))
            if ago > WORKER_SILENCE_S and wid not in self._silent:
                self._silent.add(wid)
                print(f"[trainer] generation worker {wid} has been silent for {ago:.0f} s (stopped, "
                      f"or its box did; its log says why): training goes on with the batches that "
                      f"arrive", file=sys.stderr, flush=True)
            elif ago <= WORKER_SILENCE_S and wid in self._silent:
                self._silent.discard(wid)
                print(f"[trainer] generation worker {wid} is back", file=sys.stderr, flush=True)

    def next_batch(self, weight_version: int, stop: Callable[[], bool] | None = None) -> RolloutBatch | None:
        """The next usable ready batch (ours or a worker's), reporting our version to the server;
        None when `stop()` turns true while waiting (the overlap sampler has died)."""
        deadline = time.monotonic() + self.timeout
        while True:
            self.watch_workers()
            if stop is not None and stop():
                return None
            mine = self._outstanding.batch_id if self._outstanding is not None else None
            got = self._call(lambda: self.client.get(wait_s=1.0, weight_version=weight_version,
                                                     prefer=mine), True)
            if got is not None:
                if self._outstanding is not None and got.batch_id == self._outstanding.batch_id:
                    self._outstanding = None
                if self._usable(got, weight_version):
                    return got
                deadline = time.monotonic() + self.timeout
                continue
            if time.monotonic() > deadline:
                raise UserError(f"no batch from the reference server at {self.url} within "
                                f"{self.timeout:.0f} s (are generation workers running? raise "
                                f"--ref_timeout?)")

    def ready_batch(self, weight_version: int) -> RolloutBatch | None:
        """A usable batch that is ready now (a worker's), or None at once: a trainer that also
        generates skips its own generation while workers keep the queue filled. (When the queue
        fills up while the trainer generates, `exchange` scores its batch through /logprobs
        instead of waiting for room that only its own training would make.)"""
        while True:
            got = self._call(lambda: self.client.get(wait_s=0.0, weight_version=weight_version), True)
            if got is None:
                return None
            if self._usable(got, weight_version):
                return got

    def exchange(self, batch: RolloutBatch | None, weight_version: int) -> RolloutBatch:
        """Upload our batch (if any), then take the next usable ready batch from the queue."""
        from simple_grpo.wire.client import RefServerQueueFull

        if batch is not None:
            self._outstanding = batch
            try:
                self._call(lambda: self.client.upload(batch))
            except RefServerQueueFull:  # workers filled the queue while we generated: don't wait
                self._outstanding = None  # for room we would only make by training; score ours
                self.counts["queue_full_bypass"] += 1  # directly (/logprobs has no queue)
                return self.score(batch)
        return self.next_batch(weight_version)

    def score(self, batch: RolloutBatch) -> RolloutBatch:
        """Our batch with its reference log-probs from /logprobs, past the queue (where another
        rank waiting for someone else's batch could take it)."""
        batch.ref_logprobs = self._call(lambda: self.client.logprobs(
            batch.prompt_ids, batch.prompt_lens, batch.completion_ids, batch.completion_lens,
            temperature=batch.temperature))
        return batch

    def score_async(self, batch: RolloutBatch) -> Future:
        return self._pool.submit(self.score, batch)

    def exchange_async(self, batch: RolloutBatch | None, weight_version: int) -> Future:
        """`exchange` in a background thread (HTTP waits release the GIL)."""
        return self._pool.submit(self.exchange, batch, weight_version)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        if self.process is not None:
            self.process.stop()


@dataclass
class RefTarget:
    """The reference server a run uses, known before any model loads."""
    url: str
    token: str | None
    process: object | None = None  # the RefProcess, on the rank that started it
    device: str | None = None  # where the trainer started it (the overlap sampler goes there too)


def start_ref(cfg, dist, overlap: bool = False) -> RefTarget | None:
    """Before the slow work: None when no server is needed (no --ref_url, generating locally, and
    beta == 0 or LoRA, whose reference is the trainer's own model with the adapter disabled; with
    `overlap` the server is needed as the sampler's queue whatever beta is). A
    named --ref_url must answer /health (waiting up to --ref_timeout, else one line). Otherwise
    global rank 0 starts a server child process (ref_process: placement, several nodes) while
    every rank loads its model, and all ranks get its URL and token."""
    if (cfg.beta == 0 or cfg.lora_r > 0) and not cfg.ref_url and cfg.generate_locally and not overlap:
        return None
    if cfg.ref_url:
        from simple_grpo.wire.client import RefClient

        RefClient(cfg.ref_url, token=cfg.ref_token).wait_ready(cfg.ref_timeout)
        return RefTarget(cfg.ref_url, cfg.ref_token)
    import secrets

    from simple_grpo.models import resolve_model_path
    from simple_grpo.train import ref_process

    process, where = None, {}
    if dist.rank == 0:
        gpus = torch.cuda.device_count() if dist.device.type == "cuda" else 0
        device = ref_process.place(cfg.ref_device, dist.local_world_size, gpus)
        host = ref_process.reachable_host(dist.world_size > dist.local_world_size)
        token = None if host == "127.0.0.1" else secrets.token_urlsafe(24)  # off this machine: auth
        threads = [] if device.startswith("cuda") else ["--torch_threads=1"]  # one core each
        inflight = max(8, dist.world_size + 2)  # every rank may upload at once (else 503 + retry)
        threads += [f"--max_inflight={inflight}", f"--threads={inflight + 8}"]
        process = ref_process.RefProcess(resolve_model_path(cfg.model), dtype=cfg.dtype, device=device,
                                         host=host, token=token, extra=threads + ref_process.model_args(cfg))
        where = {"url": process.url, "token": token, "device": device}
        print(f"[trainer] started a reference server at {process.url} on {device}", flush=True)
    where = collectives.all_gather_objects(where, dist.device)[0]
    return RefTarget(where["url"], where["token"], process, where.get("device"))


def connect_ref(cfg, dist, d, target: RefTarget | None, model,
                contract: BatchContract | None = None) -> RefConnection | None:
    """The connection to `target` (None: no server), once it serves the same model as `model`
    (the trainer's, before any checkpoint is loaded): else one line. Batches taken from its queue
    must carry `contract` (batch_contract.expected_contract; None: any)."""
    if target is None:
        return None
    from simple_grpo.models import fingerprint, fingerprint_difference

    conn = RefConnection(target.url, target.token, cfg.ref_timeout, target.process,
                         batch_rows=d.seqs_per_rank, max_staleness=cfg.max_staleness,
                         contract=contract)
    conn.watch = dist.rank == 0
    inflight = conn.health.get("max_inflight")
    if inflight is not None and inflight < d.world_size and dist.rank == 0:
        print(f"[trainer] the reference server admits {inflight} uploads at once, fewer than the "
              f"{d.world_size} ranks: restart it with --max_inflight={d.world_size + 2} "
              f"--threads={d.world_size + 10} (else ranks wait on 503 retries)", file=sys.stderr, flush=True)
    theirs = conn.health.get("fingerprint")
    why = theirs and fingerprint_difference(theirs, fingerprint(model))
    if why:
        conn.close()
        raise UserError(f"the reference server at {target.url} serves {conn.health.get('model')!r}, "
                        f"another model than --model={cfg.model} ({why}): start it with "
                        f"--model={cfg.model}")
    return conn


def begin_run(ref: RefConnection | None, run_id: str, dist) -> None:
    """Tell the server which run this is (rank 0), before any rank uses its queue: a new run
    drops an earlier run's queued batches and published weights, a resumed one keeps them."""
    if ref is None:
        return
    if dist.rank == 0:
        got = ref.client.start_run(run_id)
        if got.get("reset"):
            print(f"[trainer] new run {run_id}: the reference server dropped the previous run's "
                  f"weights and {got.get('dropped', 0)} queued batch(es)", flush=True)
    collectives.barrier(dist.device)
