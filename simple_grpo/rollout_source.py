"""Where the trainer's batches come from: the reference server's queue, fed by the trainer itself
(`exchange`: upload our batch, take the next ready one) and by generation workers (`next_batch`).

Every batch taken from the queue is checked before it is trained on:
  * staleness: generated more than `max_staleness` weight versions before the trainer's current
    one -> dropped, counted in `counts["stale_dropped"]`;
  * shape: a batch of another size than one rank's share of a step (a worker started with other
    --prompts_per_step / --num_generations / --trainer_ranks) -> dropped, counted in
    `counts["rejected_batches"]`, with a one-line warning naming the fix.
The server hands each uploaded batch out at most once, so no batch is trained twice.
"""
from __future__ import annotations

import sys
import time
from concurrent.futures import Future, ThreadPoolExecutor

import torch

from simple_grpo.codec import RolloutBatch
from simple_grpo.errors import UserError


class RefConnection:
    """The reference server as the trainer sees it; see the module docstring."""

    def __init__(self, url: str, token: str | None, timeout: float, process=None, *,
                 batch_rows: int | None = None, group_size: int | None = None,
                 max_staleness: int = -1):
        from simple_grpo.client import RefClient

        self.url, self.timeout, self.process = url, timeout, process
        self.batch_rows, self.group_size, self.max_staleness = batch_rows, group_size, max_staleness
        self.client = RefClient(url, token=token)
        self.counts = {"stale_dropped": 0, "rejected_batches": 0}
        self._warned: set[str] = set()
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ref-exchange")
        self.client.wait_ready(timeout)

    def _usable(self, b: RolloutBatch, weight_version: int) -> bool:
        if self.max_staleness >= 0 and weight_version - b.weight_version > self.max_staleness:
            self.counts["stale_dropped"] += 1
            return False
        G = b.meta.get("group_size")
        if (self.batch_rows and b.batch_size != self.batch_rows) or \
                (self.group_size and G is not None and G != self.group_size):
            self.counts["rejected_batches"] += 1
            why = (f"{b.batch_size} rows in groups of {G}, this trainer takes {self.batch_rows} "
                   f"in groups of {self.group_size}")
            if why not in self._warned:
                self._warned.add(why)
                print(f"[trainer] dropping a batch from {b.meta.get('producer', '?')}: {why} (start "
                      f"workers with the trainer's --prompts_per_step, --num_generations and "
                      f"--trainer_ranks=<its ranks>)", file=sys.stderr, flush=True)
            return False
        return True

    def next_batch(self, weight_version: int) -> RolloutBatch:
        """The next usable ready batch (ours or a worker's), reporting our version to the server."""
        deadline = time.monotonic() + self.timeout
        while True:
            got = self.client.get(wait_s=1.0, weight_version=weight_version)  # held until ready
            if got is not None:
                if self._usable(got, weight_version):
                    return got
                deadline = time.monotonic() + self.timeout
                continue
            if self.process is not None and not self.process.alive():
                raise UserError(f"the reference server at {self.url} exited")
            if time.monotonic() > deadline:
                raise UserError(f"no batch from the reference server at {self.url} within "
                                f"{self.timeout:.0f} s (are generation workers running? raise "
                                f"--ref_timeout?)")

    def exchange(self, batch: RolloutBatch | None, weight_version: int) -> RolloutBatch:
        """Upload our batch (if any), then take the next usable ready batch from the queue."""
        if batch is not None:
            self.client.upload(batch)
        return self.next_batch(weight_version)

    def exchange_async(self, batch: RolloutBatch | None, weight_version: int) -> Future:
        """`exchange` in a background thread (HTTP waits release the GIL)."""
        return self._pool.submit(self.exchange, batch, weight_version)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        if self.process is not None:
            self.process.stop()


def connect_ref(cfg, dist, d) -> RefConnection | None:
    """None when no server is needed (beta == 0, no --ref_url, generating locally); else a
    connection, starting a server child process on a free loopback port when none was named."""
    if cfg.beta == 0 and not cfg.ref_url and cfg.generate_locally:
        return None
    checks = dict(batch_rows=d.seqs_per_rank, group_size=cfg.num_generations,
                  max_staleness=cfg.max_staleness)
    if cfg.ref_url:
        return RefConnection(cfg.ref_url, cfg.ref_token, cfg.ref_timeout, **checks)
    from simple_grpo.models import resolve_model_path
    from simple_grpo.ref_process import RefProcess

    port = torch.zeros(1, dtype=torch.long)
    process = None
    if dist.rank == 0:
        threads = [] if dist.device.type == "cuda" else ["--torch_threads=1"]  # one core each
        process = RefProcess(resolve_model_path(cfg.model), dtype=cfg.dtype, extra=threads)
        port[0] = process.port
        print(f"[trainer] started a reference server at {process.url}", flush=True)
    if dist.world_size > 1:
        torch.distributed.broadcast(port, src=0)
    return RefConnection(f"http://127.0.0.1:{int(port)}", None, cfg.ref_timeout, process, **checks)
