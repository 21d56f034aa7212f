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
steps. The weights' size in the publish dtype is checked against the server's --max_weights_mb
before training (`publisher_for`: one line either way) and again before the first upload: too big
is one line and no publishing (not a 413 every step).

`publish` returns at once: a background thread reads the live parameters (`wire.delta.
read_changes`: on their device, in the publish dtype) against the one copy kept of the last
version (CPU, publish dtype) and brings that copy up to date in place; the optimizer's next step
waits for that read only (`before_update`, a pre-hook on the torch optimizer: `hook`), so the
weights it reads are the version's. Then, still in the background, the changes are compressed and
hashed on threads and go up as a delta (`wire.delta`: per tensor sparse or dense XOR, zstd; POST
/weights/delta), or the kept copy goes up as the full file (POST /weights): for the first publish,
every `full_every` versions (0: only when needed), when the delta is not smaller than half the
file, and when the server does not hold the delta's base (412, or the last upload failed). A
publish that is due while the previous one is still uploading waits for the next step end (counted
in publish_skipped), so the newest version always follows. Host memory: the kept copy, plus the
changed values of one version (a dense tensor's XOR goes to a temporary file). `publish_delta`
(1 delta, 0 full) and `publish_bytes` (bytes sent) describe the last upload;
`publish_blocked_seconds` what the last optimizer step waited.
"""
from __future__ import annotations

import json
import sys
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor

import torch

from simple_grpo.common import lora
from simple_grpo.wire import delta
from simple_grpo.wire.client import RefClient, RefServerError, RefServerUnavailable
from simple_grpo.wire.weights import iter_state_dict_safetensors, publish_bytes

def published_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """What a publish sends: the state dict, or a LoRA model's (PEFT) adapter tensors only."""
    return lora.adapter_state_dict(module) if lora.is_peft(module) else module.state_dict()


def unique_tensors(module: torch.nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """-> (the published tensors, aliases), no copy: a tensor that shares storage with an earlier
    one (tied embeddings) is not sent again; aliases maps its name to the name that holds it. A
    LoRA model (PEFT): its adapter's tensors only."""
    seen: dict[tuple, str] = {}
    out, aliases = {}, {}
    for name, t in published_state(module).items():
        key = (t.data_ptr(), t.dtype, tuple(t.shape), t.stride())
        if key in seen:
            aliases[name] = seen[key]
            continue
        seen[key] = name
        out[name] = t
    return out, aliases


def cpu_copy(tensors: dict[str, torch.Tensor], dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    """A detached CPU copy of `tensors`, floats in `dtype` (None: their own)."""
    return {name: t.detach().to("cpu", dtype=dtype if dtype is not None and t.is_floating_point()
                                else t.dtype, copy=True) for name, t in tensors.items()}


def cpu_snapshot(module: torch.nn.Module, dtype: torch.dtype | None):
    """-> (a CPU copy of `unique_tensors` in `dtype` for floats, aliases)."""
    tensors, aliases = unique_tensors(module)
    return cpu_copy(tensors, dtype), aliases


class WeightPublisher:
    """Publishes a module's weights from a background thread; see the module doc."""

    def __init__(self, client: RefClient, dtype: torch.dtype | None = None,
                 log=lambda msg: print(msg, file=sys.stderr, flush=True), full_every: int = 0):
        self.client, self.dtype, self.log, self.full_every = client, dtype, log, full_every
        self._base: dict[str, torch.Tensor] | None = None  # the last version read, CPU, publish dtype
        self._held: dict | None = None  # what the server holds of ours: {"version", "digest"}
        self._deltas_in_row = 0  # deltas since the last full upload
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="publish-weights")
        self._job: Future | None = None
        self._read = threading.Event()  # set while no read pass is running
        self._read.set()
        self._wanted = False  # a publish came due while the last one was still uploading
        self._lock = threading.Lock()
        self.stats = {"published_version": -1.0, "publish_seconds": 0.0, "snapshot_seconds": 0.0,
                      "publish_blocked_seconds": 0.0, "publish_mb": 0.0, "publishes": 0.0,
                      "publish_skipped": 0.0, "publish_failures": 0.0, "workers_seen": 0.0,
                      "publish_bytes": 0.0, "publish_delta": 0.0, "publish_deltas": 0.0,
                      "publish_fulls": 0.0, "publish_bytes_total": 0.0}
        self.disabled: str | None = None  # why publishing is off (the weights exceed the server's limit)

    def hook(self, engine) -> None:
        """Make the engine's optimizer wait for a running read pass before it changes weights."""
        opt = engine.optimizer if hasattr(engine, "optimizer") else engine
        while not isinstance(opt, torch.optim.Optimizer) and hasattr(opt, "optimizer"):
            opt = opt.optimizer  # DeepSpeed's ZeRO wrapper holds the torch optimizer
        assert isinstance(opt, torch.optim.Optimizer), f"no torch optimizer under {type(engine).__name__}"
        opt.register_step_pre_hook(lambda *_: self.before_update())

    def before_update(self) -> None:
        """Wait until the running read pass (if any) has read the weights."""
        t0 = time.perf_counter()
        self._read.wait()
        with self._lock:
            self.stats["publish_blocked_seconds"] = time.perf_counter() - t0

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
        if not (first or self._wanted or step % every == 0):
            return False
        return self.publish(module, version, wait=wait)

    def _fits(self, module: torch.nn.Module, announce: bool = False) -> bool:
        """Whether the weights, in the publish dtype, fit the server's --max_weights_mb; if not,
        say so in one line and publish nothing from now on. `announce`: a line when they fit too."""
        limit = self.client.health().get("max_weights_bytes")
        state = published_state(module)
        size = publish_bytes(state, self.dtype)
        if limit is None or size <= limit:
            if announce:
                dtype = self.dtype or next((t.dtype for t in state.values() if t.is_floating_point()), None)
                within = ("the reference server states no limit" if limit is None else
                          f"within the reference server's --max_weights_mb={limit / 2**20:,.0f}")
                self.log(f"[trainer] weights publishing ready: {size / 2**20:,.0f} MiB in "
                         f"{str(dtype).removeprefix('torch.')}, {within}; generation workers get "
                         f"them once one polls the server")
            return True
        self.disabled = (f"the policy's weights are {size / 2**20:,.0f} MiB in the publish dtype, more "
                         f"than the reference server's --max_weights_mb={limit / 2**20:,.0f}: generation "
                         f"workers keep their weights (restart ref_server.py with --max_weights_mb="
                         f"{-(-size // 2**20) + 1}, or --publish_dtype=bfloat16)")
        self.log(f"[trainer] not publishing weights: {self.disabled}")
        return False

    def publish(self, module: torch.nn.Module, version: int, wait: bool = False) -> bool:
        """Read `module`'s weights and upload them as `version` in the background -> whether it
        started (not while the last upload is still going, unless `wait`, which also blocks until
        this one is on the server or failed)."""
        if self._job is not None and not self._job.done():
            if not wait:
                with self._lock:
                    self.stats["publish_skipped"] += 1
                self._wanted = True
                return False
            self._job.result()
        t0 = time.perf_counter()
        live, aliases = unique_tensors(module)
        ready = None
        if any(t.is_cuda for t in live.values()):
            ready = torch.cuda.Event()
            ready.record()  # the optimizer step's kernels come first
        self._wanted = False
        self._read.clear()
        self._job = self._pool.submit(self._run, live, aliases, lora.publish_metadata(module), version, ready)
        with self._lock:
            self.stats["snapshot_seconds"] = time.perf_counter() - t0
        if wait:
            self._job.result()
        return True

    def _run(self, live: dict[str, torch.Tensor], aliases: dict[str, str], extra: dict[str, str],
             version: int, ready) -> None:
        t0 = time.perf_counter()
        try:
            changes, base_version = self._read_pass(live, ready)
        finally:
            self._read.set()
        base = self._base
        metadata = file_metadata(version, aliases, extra)
        head = next(iter_state_dict_safetensors(base, metadata=metadata))
        size = file_size(base, metadata)
        try:
            sent = None
            if changes is not None and self._delta_due(base_version):
                sent = self._send_delta(changes, head, size, base_version, version)
            elif changes is not None:
                delta.discard(changes)
            if sent is None:  # the server's digest of the file it took is the next delta's base
                meta = self.client.publish_weights(iter_state_dict_safetensors(base, metadata=metadata),
                                                   version=version)
                sent = (meta, meta.get("bytes", 0), meta.get("digest"))
        except RefServerError as e:
            if e.status == 409:  # the server already has this version (a resumed run); its digest
                self._held = {"version": version, "digest": None}  # unknown: the next upload is full
                return
            self._failed(version, e)
            return
        except RefServerUnavailable as e:
            self._failed(version, e)
            return
        meta, nbytes, digest = sent
        is_delta = "delta_bytes" in meta
        self._held = {"version": version, "digest": digest}
        self._deltas_in_row = self._deltas_in_row + 1 if is_delta else 0
        with self._lock:
            self.stats.update(published_version=float(version), publishes=self.stats["publishes"] + 1,
                              publish_seconds=time.perf_counter() - t0,
                              publish_mb=meta.get("bytes", 0) / 2**20, publish_bytes=float(nbytes),
                              publish_delta=float(is_delta),
                              publish_bytes_total=self.stats["publish_bytes_total"] + nbytes)
            self.stats["publish_deltas" if is_delta else "publish_fulls"] += 1

    def _read_pass(self, live: dict[str, torch.Tensor], ready) -> tuple[list | None, int | None]:
        """Bring the kept copy up to the live weights -> (the changes, the version they start
        from), or (None, None) when a fresh copy was taken (the first publish, or other tensors)."""
        base, held = self._base, self._held
        same = base is not None and list(base) == list(live) and \
            all(base[k].shape == live[k].shape for k in live)
        if not same:
            self._base = None  # freed before the new copy is made
            self._base = cpu_copy(live, self.dtype)
            return None, None
        changes = delta.read_changes(base, live, ready=ready)
        return changes, held["version"] if held is not None else None

    def _delta_due(self, base_version: int | None) -> bool:
        """A delta against what the server holds of ours can go (the full file is due otherwise)."""
        periodic = self.full_every > 0 and self._deltas_in_row + 1 >= self.full_every
        return base_version is not None and self._held["digest"] is not None and not periodic

    def _send_delta(self, changes: list, head: bytes, size: int, base_version: int,
                    version: int) -> tuple[dict, int, str] | None:
        """Upload the changes as a delta against the server's version -> (the server's answer,
        bytes sent, the new digest), or None when the full file should go (the delta is not
        smaller than half of it, or the server does not hold the base: 412)."""
        enc, digest, _ = delta.finish(changes, self._base, head, from_version=base_version,
                                      to_version=version, base_digest=self._held["digest"],
                                      file_bytes=size, max_body_bytes=size // 2)
        if enc is None:
            return None
        with enc:
            try:
                return (self.client.publish_delta(enc.chunks(), version, base_version), enc.size,
                        digest)
            except RefServerError as e:
                if e.status == 412:
                    return None
                raise

    def _failed(self, version: int, e: Exception) -> None:
        self._held = None  # the kept copy is ahead of the server: the next upload is the full file
        with self._lock:
            self.stats["publish_failures"] += 1
        self.log(f"[trainer] publishing weight version {version} failed (will retry at the next "
                 f"publish): {e}")

    def metrics(self) -> dict[str, float]:
        with self._lock:
            return dict(self.stats)

    def close(self) -> None:
        """Wait for the upload in flight, then stop the thread."""
        if self._job is not None:
            self._job.result()
        self._pool.shutdown(wait=True)


def file_metadata(version: int, aliases: dict[str, str], extra: dict[str, str]) -> dict[str, str]:
    """The safetensors metadata of a published file. The version is zero-padded, so every
    version's file has one length and a delta always fits (an unpadded "10" would not)."""
    return {"version": f"{version:012d}", "aliases": json.dumps(aliases), **extra}


def file_size(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> int:
    """Bytes of the safetensors file `iter_state_dict_safetensors(tensors, metadata=metadata)`."""
    header = next(iter_state_dict_safetensors(tensors, metadata=metadata))
    return len(header) + sum(t.numel() * t.element_size() for t in tensors.values())


def publisher_for(cfg, dist, ref, version: int, module: torch.nn.Module | None = None
                  ) -> WeightPublisher | None:
    """Rank 0's publisher when generation workers can exist (a named --ref_url, or a trainer
    that does not generate) and --publish_every > 0; else None. Fails fast when the server
    already holds a version newer than this run's `version` (another run's weights: workers
    would never update). With `module`, says in one line before training whether its weights
    fit the server's --max_weights_mb (too big: no publishing)."""
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
    publisher = WeightPublisher(client, dtype=dtype, full_every=cfg.weights_full_every)
    if module is not None:
        publisher._fits(module, announce=True)
    return publisher
