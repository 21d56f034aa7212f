"""Every collective the trainer issues itself (DeepSpeed issues its own), in one place.

Rule: a tensor that crosses ranks lives on the rank's device. On GPUs the process group is
usually NCCL alone (what `deepspeed` creates), and NCCL refuses CPU tensors; gloo, on the other
hand, moves CUDA tensors too (that is how `benchmarks/gpu_check.py` runs two ranks on one GPU). So
each function here copies its values to `device` (the rank's: `Dist.device`, or `rank_device()`),
runs the collective there, and hands back a CPU tensor or plain Python values. Objects
(`all_gather_objects`, JSON-able values) travel as JSON bytes in a uint8 tensor, not through
torch's all_gather_object (pickle), so no rank ever unpickles another's bytes.

With one process (world size 1, or no process group at all) every function is the identity.
tests/test_distributed.py runs the 2-rank trainer under tests/strict_collectives.py, which fails
any collective that comes from another module or carries a tensor off the rank's device.
"""
from __future__ import annotations

import json

import torch

_OPS = {"sum": "SUM", "max": "MAX", "min": "MIN"}


def active() -> bool:
    """A process group with more than one rank exists."""
    return (torch.distributed.is_available() and torch.distributed.is_initialized()
            and torch.distributed.get_world_size() > 1)


def rank_device() -> torch.device:
    """The device this rank computes on: the current CUDA device when CUDA is in use, else CPU
    (engine.init_distributed sets the CUDA device to LOCAL_RANK before anything else)."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce(values: list[float] | torch.Tensor, device: torch.device, op: str = "sum",
               dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Element-wise `op` (sum | max | min) of `values` over ranks -> CPU tensor [N]."""
    t_N = torch.as_tensor(values, dtype=dtype).reshape(-1)
    if not active():
        return t_N.clone()
    t_N = t_N.to(device)
    torch.distributed.all_reduce(t_N, op=getattr(torch.distributed.ReduceOp, _OPS[op]))
    return t_N.cpu()


def broadcast(values: list[float] | torch.Tensor, device: torch.device, src: int = 0,
              dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Rank `src`'s `values` on every rank -> CPU tensor [N] (the others pass a same-sized
    placeholder)."""
    t_N = torch.as_tensor(values, dtype=dtype).reshape(-1)
    if not active():
        return t_N.clone()
    t_N = t_N.to(device)
    torch.distributed.broadcast(t_N, src=src)
    return t_N.cpu()


def any_rank(flag: bool, device: torch.device) -> bool:
    """True on every rank when `flag` is True on at least one."""
    return bool(all_reduce([1.0 if flag else 0.0], device, op="max")[0] > 0)


def all_gather_objects(obj, device: torch.device) -> list:
    """Every rank's JSON-able value, in rank order, on every rank (as JSON round-trips it)."""
    data = json.dumps(obj, allow_nan=True, separators=(",", ":")).encode()
    if not active():
        return [json.loads(data)]
    world = torch.distributed.get_world_size()
    mine = torch.zeros(world, dtype=torch.float64)
    mine[torch.distributed.get_rank()] = len(data)
    size = all_reduce(mine, device)
    width = int(size.max())
    buf = torch.zeros(width, dtype=torch.uint8)
    buf[:len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    parts = [torch.empty(width, dtype=torch.uint8, device=device) for _ in range(world)]
    torch.distributed.all_gather(parts, buf.to(device))
    return [json.loads(p[:int(n)].cpu().numpy().tobytes()) for p, n in zip(parts, size.tolist())]


def deepspeed_barrier() -> None:
    """The barrier DeepSpeed's own code takes (torch.distributed.barrier): a rank whose DeepSpeed
    call failed before that call's barrier takes it here, so its peers' barrier completes (an
    all-reduce is another collective and would not match it: both would wait forever)."""
    if active():
        torch.distributed.barrier()


def barrier(device: torch.device) -> None:
    """Wait for every rank (an all-reduce on the rank's device: NCCL's barrier guesses devices)."""
    if active():
        all_reduce([0.0], device)
