"""The trainer's side of weight sync: publish the policy to the reference server in the background,
and only when a generation worker is there to take it.

    publisher = WeightPublisher(RefClient(url, token), dtype=torch.bfloat16)
    publisher.step_end(engine.module, version, step, every=1)  # publishes if a worker asked
    publisher.publish(engine.module, version=step)   # returns at once (after a CPU snapshot)
    publisher.metrics()                               # publish_seconds, published_version, ...
    publisher.close()                                 # waits for the last one

Workers announce themselves when they poll GET /weights/version (the server lists them in /stats
"workers"). Until one has, `step_end` only asks the server (one small request a step) and uploads
nothing; the step a worker is first seen, the current weights go out at once, then every `every`
steps. Before that first upload the weights' size in the publish dtype is checked against the
server's --max_weights_mb: too big is one line and no publishing (not a 413 every step).

`publish` copies the parameters to one CPU snapshot (the optimizer changes them in place while the
upload runs), then a background thread streams that snapshot as safetensors
(`wire.weights.iter_state_dict_safetensors`, one tensor at a time) with POST /weights?version=N.
A publish that is due while the previous one is still uploading waits for it (one pending
snapshot at most: a newer one replaces it, counted in publish_skipped), so the newest version
always reaches the server; a failed one is reported and the next one is tried as usual. Training
never waits on an upload, only on the CPU copy.
"""
from __future__ import annotations

import json
import sys
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor

import torch

from simple_grpo.train import lora
from simple_grpo.wire.client import RefClient, RefServerError, RefServerUnavailable
from simple_grpo.wire.weights import iter_state_dict_safetensors


def published_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """What a publish sends: the state dict, or a LoRA model's (PEFT) adapter tensors only."""
    return lora.adapter_state_dict(module) if lora.is_peft(module) else module.state_dict()


def cpu_snapshot(module: torch.nn.Module, dtype: torch.dtype | None):
    """-> (a detached CPU copy of the state dict in `dtype` for floats, aliases): a tensor that
    shares storage with an earlier one (tied embeddings) is not copied or sent again; aliases maps
    its name to the name that holds it. A LoRA model (PEFT): its adapter's tensors only."""
    seen: dict[tuple, str] = {}
    out, aliases = {}, {}
    for name, t in published_state(module).items():
        key = (t.data_ptr(), t.dtype, tuple(t.shape), t.stride())
        if key in seen:
            aliases[name] = seen[key]
            continue
        seen[key] = name
        out[name] = t.detach().to("cpu", dtype=dtype if dtype is not None and t.is_floating_point()
                                  else t.dtype, copy=True)
    return out, aliases


def publish_bytes(state: dict[str, torch.Tensor], dtype: torch.dtype | None) -> int:
    """Bytes of `state`'s tensors as published: floats in `dtype` (None: their own), tied
    tensors once (as cpu_snapshot sends them)."""
    seen, total = set(), 0
    for t in state.values():
        key = (t.data_ptr(), t.dtype, tuple(t.shape), t.stride())
        if key in seen:
            continue
        seen.add(key)
        as_dtype = dtype if dtype is not None and t.is_floating_point() else t.dtype
        total += t.numel() * as_dtype.itemsize
    return total


class WeightPublisher:
    """Publishes snapshots of a module's weights in a background thread; see the module doc."""

    def __init__(self, client: RefClient, dtype: torch.dtype | None = None,
                 log=lambda msg: print(msg, file=sys.stderr, flush=True)):
        self.client, self.dtype, self.log = client, dtype, log
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="publish-weights")
        self._pending: Future | None = None
        self._next: tuple[dict, int] | None = None  # the snapshot waiting for the upload in flight
        self._draining = False
        self._lock = threading.Lock()
        self.stats = {"published_version": -1.0, "publish_seconds": 0.0, "snapshot_seconds": 0.0,
                      "publish_mb": 0.0, "publishes": 0.0, "publish_skipped": 0.0,
                      "publish_failures": 0.0, "workers_seen": 0.0}
        self.disabled: str | None = None  # why publishing is off (the weights exceed the server's limit)

    def step_end(self, module: torch.nn.Module, version: int, step: int, every: int,
                 wait: bool = False) -> bool:
        """After a step (or, with the run's starting step, before the first): publish `version`
        if a generation worker has asked for weights: at once when the first one is seen, then
        when `step % every == 0` -> whether a publish started. See the module docstring."""
        if self.disabled is not None:
            return False
        first = not self.stats["workers_seen"]
        if first:
            try:
                workers = len(self.client.stats().get("workers") or {})
            except (RefServerError, RefServerUnavailable):
                return False  # the server is away: the step's own requests report and wait
            if not workers:
                return False
            self.stats["workers_seen"] = float(workers)
            if not self._fits(module):
                return False
        if not (first or step % every == 0):
            return False
        self.publish(module, version, wait=wait)
        return True

    def _fits(self, module: torch.nn.Module) -> bool:
        """Whether the weights, in the publish dtype, fit the server's --max_weights_mb; if not,
        say so in one line and publish nothing from now on."""
        limit = self.client.health().get("max_weights_bytes")
        size = publish_bytes(published_state(module), self.dtype)
        if limit is None or size <= limit:
            return True
        self.disabled = (f"the policy's weights are {size / 2**20:,.0f} MB in the publish dtype, more "
                         f"than the reference server's --max_weights_mb={limit / 2**20:,.0f}: generation "
                         f"workers keep their weights (restart ref_server.py with --max_weights_mb="
                         f"{-(-size // 2**20) + 1}, or --publish_dtype=bfloat16)")
        self.log(f"[trainer] not publishing weights: {self.disabled}")
        return False

    def publish(self, module: torch.nn.Module, version: int, wait: bool = False) -> None:
        """Snapshot `module` and upload it as `version` in the background (after the upload in
        flight, if any). `wait` blocks until it is on the server (or failed)."""
        t0 = time.perf_counter()
        snapshot = (*cpu_snapshot(module, self.dtype), lora.publish_metadata(module))  # + marker
        with self._lock:
            self.stats["snapshot_seconds"] = time.perf_counter() - t0
            if self._next is not None:
                self.stats["publish_skipped"] += 1  # superseded before its turn came
            self._next = (snapshot, version)
            if not self._draining:
                self._draining = True
                self._pending = self._pool.submit(self._drain)
            pending = self._pending
        if wait:
            pending.result()

    def _drain(self) -> None:
        while True:
            with self._lock:
                if self._next is None:
                    self._draining = False
                    return
                (snapshot, version), self._next = self._next, None
            self._send(snapshot, version)

    def _send(self, snapshot: tuple[dict[str, torch.Tensor], dict[str, str], dict[str, str]],
              version: int) -> None:
        t0 = time.perf_counter()
        tensors, aliases, extra = snapshot  # extra: the LoRA adapter marker (simple_grpo/train/lora.py)
        try:
            meta = self.client.publish_weights(iter_state_dict_safetensors(
                tensors, metadata={"version": str(version), "aliases": json.dumps(aliases), **extra}),
                version=version)
        except RefServerError as e:
            if e.status == 409:  # the server already has this version (a resumed run): fine
                return
            self._failed(version, e)
            return
        except RefServerUnavailable as e:
            self._failed(version, e)
            return
        with self._lock:
            self.stats.update(published_version=float(version), publishes=self.stats["publishes"] + 1,
                              publish_seconds=time.perf_counter() - t0,
                              publish_mb=meta.get("bytes", 0) / 2**20)

    def _failed(self, version: int, e: Exception) -> None:
        with self._lock:
            self.stats["publish_failures"] += 1
        self.log(f"[trainer] publishing weight version {version} failed (will retry at the next "
                 f"publish): {e}")

    def metrics(self) -> dict[str, float]:
        with self._lock:
            return dict(self.stats)

    def close(self) -> None:
        """Wait for the upload in flight, then stop the thread."""
        if self._pending is not None:
            self._pending.result()
        self._pool.shutdown(wait=True)


def publisher_for(cfg, dist, ref, version: int) -> WeightPublisher | None:
    """Rank 0's publisher when generation workers can exist (a named --ref_url, or a trainer
    that does not generate) and --publish_every > 0; else None. Fails fast when the server
    already holds a version newer than this run's `version` (another run's weights: workers
    would never update)."""
    if dist.rank != 0 or ref is None or cfg.publish_every == 0 or \
            (cfg.ref_url is None and cfg.generate_locally):
        return None
    from simple_grpo.errors import UserError

    dtype = {"auto": None, "float32": torch.float32, "bfloat16": torch.bfloat16}[cfg.publish_dtype]
    client = RefClient(ref.url, token=cfg.ref_token, timeout=max(cfg.ref_timeout, 600))
    held = client.weights_version().get("version")
    if held is not None and held > version:
        raise UserError(f"the reference server at {client.url} holds weight version {held}, newer "
                        f"than this run's {version} (weights of another run?): restart it, or give "
                        f"it another --weights_dir")
    return WeightPublisher(client, dtype=dtype)
