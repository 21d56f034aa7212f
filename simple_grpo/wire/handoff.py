"""The overlap sampler's weights, straight from the trainer's rank 0: a torch.distributed group of
their own (two members: the trainer's rank 0 is 0, the sampler 1), no file and no HTTP.

    sender = Sender.listen("gloo", device)        # trainer rank 0: a store on a free port
    ... start the sampler with --weights_from={sender.address} ...
    sender.connect(alive)                          # the group forms (alive(): is the sampler there)
    sender.send(version, step, alive, tensors, aliases, metadata)  # blocks until it has it all
    receiver = Receiver.join(address, device)      # the sampler, at start
    version, step, came = receiver.recv(fit)       # the next publish, in order, into the tensors
                                                   # fit(names, aliases, metadata) names

Backend: NCCL when both ends are on different CUDA devices (GPU to GPU over NVLink or PCIe, no host
copy), else gloo (CPU tensors; a GPU end stages one bucket at a time through host memory).

Each publish is a header in the group's store (JSON: protocol, version, step, bucket size, and
unless the step left the weights as they were, the manifest: every tensor's name, dtype, shape;
tied tensors' aliases; a LoRA adapter's metadata), the sampler's "ready" in the store when it has
finished the batch it samples, then the tensors' bytes as broadcasts from rank 0, packed in
buckets of at most `bucket_bytes`, each tensor at a 64-byte aligned offset. Waits happen in
Python on the store, never inside a collective (a group with a collective pending cannot be torn
down: a SIGTERM'd sampler would hang at exit, a dead one would hold the trainer to the
timeout). The receiver copies each bucket's tensors into its model's parameters in place
(converting the dtype if the sampler's differs); two buckets take turns on each end.
The sampler receives every publish in order, one per trainer step, so the weights it samples a
batch with are exactly the ones its schedule names (`required_step`), whatever the timing.

GPU arithmetic (Qwen2.5-7B, 15.2 GB in bf16, 128 MiB buckets = 114 broadcasts, two buckets of
memory on each end): NVLink (~150 GB/s achieved) ~0.1 s, PCIe 4 x16 (~20 GB/s) ~0.8 s; filling a
bucket on the GPU (~0.1 ms at 1.5 TB/s) overlaps the previous bucket's transfer. gloo on this CPU
bench: BENCHMARKS.md ("Weights to the overlap sampler").
"""
from __future__ import annotations

import dataclasses
import datetime
import json
import threading
import time
from typing import Callable

import torch
import torch.distributed as tdist

from simple_grpo.errors import UserError

PROTOCOL = 1
ALIGN = 64
KEY = "simple_grpo/handoff"  # the store's keys: .../publish/N (the header), .../ready/N


class HandoffError(RuntimeError):
    """The other end is gone (or the group failed): the handoff is over for this run."""


def required_step(first: int, n: int, ranks: int, ahead: int) -> int:
    """The trainer step whose weights the n-th batch (1-based) must be sampled with: batch n
    belongs to step ceil(n / ranks) of the sampler's run (counted from `first`, the first step
    published), which may be at most `ahead` steps ahead of the weights. In steps, not versions:
    a step advances the version by --num_iterations, or not at all when it trained nothing."""
    step = -(-n // ranks)
    return first + max(step - 1 - ahead, 0)


def backend_for(trainer_device: str | torch.device, sampler_device: str | torch.device) -> str:
    """nccl between two different CUDA devices, else gloo (NCCL cannot pair a GPU with itself)."""
    a, b = torch.device(trainer_device), torch.device(sampler_device)
    return "nccl" if a.type == b.type == "cuda" and a != b else "gloo"


@dataclasses.dataclass(frozen=True)
class Address:
    backend: str
    host: str
    port: int

    def __str__(self) -> str:
        return f"{self.backend}://{self.host}:{self.port}"

    @classmethod
    def parse(cls, text: str) -> "Address":
        backend, sep, rest = text.partition("://")
        host, _, port = rest.rpartition(":")
        if not sep or backend not in ("gloo", "nccl") or not host or not port.isdigit():
            raise UserError(f"--weights_from must be gloo://HOST:PORT or nccl://HOST:PORT (got {text!r})")
        return cls(backend, host, int(port))


def _group(store, rank: int, backend: str, timeout: datetime.timedelta):
    store = tdist.PrefixStore("simple_grpo/pg", store)  # its rendezvous keys apart from ours
    if backend == "nccl":
        return tdist.ProcessGroupNCCL(store, rank, 2, tdist.ProcessGroupNCCL.Options())
    return tdist.ProcessGroupGloo(store, rank, 2, timeout)


def _layout(manifest: list, bucket_bytes: int) -> list[list[tuple[int, int, int]]]:
    """Buckets of (tensor index, offset, bytes), in manifest order, each under bucket_bytes
    (a tensor larger than a bucket gets one of its own)."""
    buckets, cur, used = [], [], 0
    for i, (_, dtype, shape) in enumerate(manifest):
        n = torch.Size(shape).numel() * getattr(torch, dtype).itemsize
        if cur and used + n > bucket_bytes:
            buckets.append(cur)
            cur, used = [], 0
        cur.append((i, used, n))
        used += -(-n // ALIGN) * ALIGN
    return buckets + ([cur] if cur else [])


def _poll(done: Callable[[], bool], alive: Callable[[], bool] | None = None) -> None:
    """Wait in Python until done() (polled 0.5 ms, then up to 20 ms apart): a SIGTERM stops a
    waiting sampler, and `alive()` going False (a dead sampler) ends the trainer's wait at once."""
    pause = 0.0005
    while not done():
        if alive is not None and not alive():
            raise HandoffError("the sampler stopped")
        time.sleep(pause)
        pause = min(pause * 2, 0.02)


class _End:
    def __init__(self, store, pg, backend: str, device: torch.device):
        self.store, self.pg, self.backend = store, pg, backend
        self.device = device if backend == "nccl" else torch.device("cpu")  # where buffers live
        self.bufs: list[torch.Tensor | None] = [None, None]  # two buckets: one filled, one in flight
        self.count = 0  # publishes so far: the next one's key

    def _stream(self, buckets: list, fill=None, drain=None, alive: Callable[[], bool] | None = None) -> int:
        """The buckets as broadcasts from rank 0 (both ends are in them by then: see `send`), in
        two buffers by turns: the sender fills the next bucket while the last is on the wire, the
        receiver copies the last one out while the next arrives -> bytes."""
        pending, sent = None, 0
        for k, bucket in enumerate(buckets):
            size = bucket[-1][1] + bucket[-1][2]
            if self.bufs[k % 2] is None or self.bufs[k % 2].numel() < size:
                self.bufs[k % 2] = torch.empty(size, dtype=torch.uint8, device=self.device)
            buf = self.bufs[k % 2][:size]  # its last broadcast (bucket k - 2) is done: waited below
            if fill is not None:
                fill(bucket, buf)
            work = self.pg.broadcast([buf])
            if pending is not None:
                self._finish(*pending, drain, alive)
            pending, sent = (work, bucket, buf), sent + size
        if pending is not None:
            self._finish(*pending, drain, alive)
        return sent

    @staticmethod
    def _finish(work, bucket, buf, drain, alive) -> None:
        _poll(work.is_completed, alive)
        work.wait()  # raises if the broadcast failed (gloo: the peer closed its end)
        if drain is not None:
            drain(bucket, buf)

    def close(self) -> None:
        if self.pg is not None:
            try:
                self.pg.abort()
            except RuntimeError:
                pass


class Sender(_End):
    """The trainer's end (rank 0 of the pair)."""

    def __init__(self, store, backend: str, device: torch.device, timeout: datetime.timedelta,
                 bucket_bytes: int):
        super().__init__(store, None, backend, device)
        self.timeout, self.bucket_bytes = timeout, bucket_bytes
        self.address = Address(backend, "127.0.0.1", store.port)
        self.sent_version: int | None = None

    @classmethod
    def listen(cls, backend: str, device: str | torch.device, timeout_s: float = 3600.0,
               bucket_bytes: int = 128 << 20) -> "Sender":
        timeout = datetime.timedelta(seconds=timeout_s)
        store = tdist.TCPStore("127.0.0.1", 0, world_size=2, is_master=True, wait_for_workers=False,
                               timeout=timeout)
        return cls(store, backend, torch.device(device), timeout, bucket_bytes)

    def connect(self, alive: Callable[[], bool]) -> None:
        """Form the group with the sampler (it joins at its start); HandoffError when it dies first."""
        got: dict = {}
        t = threading.Thread(target=lambda: got.update(pg=_group(self.store, 0, self.backend, self.timeout)),
                             daemon=True, name="handoff-connect")
        t.start()
        try:
            _poll(lambda: not t.is_alive(), alive)
        except HandoffError:
            raise HandoffError("the sampler stopped before it joined") from None
        if "pg" not in got:
            raise HandoffError("the group did not form")
        self.pg = got["pg"]

    def send(self, version: int, step: int, alive: Callable[[], bool],
             tensors: dict[str, torch.Tensor] | None = None, aliases: dict[str, str] | None = None,
             metadata: dict[str, str] | None = None) -> dict:
        """Hand the weights of trainer `step` (at `version`) to the sampler: `tensors` (tied
        ones named in `aliases`, `metadata` as a published file's), or only the step (None: it
        trained nothing). The header goes through the store; the sampler answers when it is
        ready (it finishes the batch it samples first), and only then do the buckets go, so
        neither end ever waits inside a collective -> {"wait_seconds": until it was ready,
        "send_seconds": the tensors, "bytes", "peer_state": what the sampler said with its ready
        (its position, for a checkpoint)}."""
        t0, n = time.perf_counter(), self.count
        tensors = tensors or {}
        manifest = [[k, str(t.dtype).removeprefix("torch."), list(t.shape)] for k, t in tensors.items()]
        self.store.set(f"{KEY}/publish/{n}", json.dumps({
            "protocol": PROTOCOL, "version": version, "step": step, "bucket_bytes": self.bucket_bytes,
            "tensors": manifest, "aliases": aliases or {}, "metadata": metadata or {}}))
        _poll(lambda: self.store.check([f"{KEY}/ready/{n}"]), alive)
        peer_state = json.loads(self.store.get(f"{KEY}/ready/{n}"))
        self.store.delete_key(f"{KEY}/publish/{n}")
        self.store.delete_key(f"{KEY}/ready/{n}")
        self.count += 1
        t1, values = time.perf_counter(), list(tensors.values())

        def fill(bucket, buf):
            with torch.no_grad():
                for i, off, nbytes in bucket:
                    buf[off:off + nbytes].copy_(values[i].detach().reshape(-1).view(torch.uint8))

        sent = self._stream(_layout(manifest, self.bucket_bytes), fill=fill, alive=alive)
        if tensors:
            self.sent_version = version
        return {"wait_seconds": t1 - t0, "send_seconds": time.perf_counter() - t1, "bytes": sent,
                "peer_state": peer_state}


class Receiver(_End):
    """The sampler's end (rank 1 of the pair)."""

    def __init__(self, store, pg, backend: str, device: torch.device):
        super().__init__(store, pg, backend, device)
        self.first: int | None = None
        self.waited = 0.0

    @classmethod
    def join(cls, address: str | Address, device: str | torch.device,
             timeout_s: float = 3600.0) -> "Receiver":
        a = Address.parse(address) if isinstance(address, str) else address
        timeout = datetime.timedelta(seconds=timeout_s)
        store = tdist.TCPStore(a.host, a.port, world_size=2, is_master=False, timeout=timeout)
        return cls(store, _group(store, 1, a.backend, timeout), a.backend, torch.device(device))

    def recv(self, fit: Callable[[list[str], dict, dict], dict[str, torch.Tensor]],
             state: dict | None = None) -> tuple[int, int, bool]:
        """The next publish, copied into the tensors `fit(names, aliases, metadata)` names (a
        model's parameters, by the names sent; it raises when they don't fit) -> (version, step,
        whether tensors came). `state` (JSON-able) goes to the trainer with the ready."""
        key, n, t = f"{KEY}/publish/{self.count}", self.count, time.perf_counter()
        _poll(lambda: self.store.check([key]))
        self.waited = time.perf_counter() - t  # for the trainer to publish: the gate's wait
        info = json.loads(self.store.get(key))
        if info["protocol"] != PROTOCOL:
            raise HandoffError(f"the trainer speaks handoff protocol {info['protocol']}, this "
                               f"sampler {PROTOCOL}")
        manifest = info["tensors"]
        params = fit([k for k, _, _ in manifest], info["aliases"], info["metadata"]) if manifest else {}
        targets: dict[str, list[torch.Tensor]] = {}
        for name, param in params.items():
            targets.setdefault(info["aliases"].get(name, name), []).append(param)
        for name, dtype, shape in manifest:  # before it says ready
            for param in targets[name]:
                if tuple(param.shape) != tuple(shape):
                    raise UserError(f"published weight {name} has shape {tuple(shape)}, the model "
                                    f"{tuple(param.shape)}: start the sampler with the trainer's --model")
        self.store.set(f"{KEY}/ready/{n}", json.dumps(state))
        self.count += 1

        def drain(bucket, buf):
            with torch.no_grad():
                for i, off, nbytes in bucket:
                    name, dtype, shape = manifest[i]
                    src = buf[off:off + nbytes].view(getattr(torch, dtype)).view(shape)
                    for param in targets[name]:
                        param.copy_(src)

        self._stream(_layout(manifest, info["bucket_bytes"]), drain=drain)
        self.first = info["step"] if self.first is None else self.first
        return info["version"], info["step"], bool(manifest)
