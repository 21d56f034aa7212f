"""Process group and DeepSpeed ZeRO-2 engine, on GPUs (nccl, bf16) or CPUs (gloo, fp32).

`python grpo_ref_split.py` is a world of one; `deepspeed [--num_gpus N] grpo_ref_split.py` or
`torchrun` set RANK/WORLD_SIZE/LOCAL_RANK for each process. On CPU nothing is JIT-compiled: the
optimizer is a torch AdamW object (DeepSpeed's CPU FusedAdam would compile ~2 min) and the
shared-memory all-reduce op (compiled ~1 min on every fresh machine) is skipped; gloo does the
reductions. The one exception is `--offload_optimizer` (ZeRO-Offload: optimizer states in CPU
memory), which needs DeepSpeed's CPU Adam, a C++ extension compiled on first use (~1 min, then
cached in ~/.cache/torch_extensions).
"""
from __future__ import annotations

import atexit
import json
import os
import socket
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from types import SimpleNamespace

import torch

from simple_grpo.errors import UserError

if not torch.cuda.is_available():
    os.environ.setdefault("DS_ACCELERATOR", "cpu")  # before deepspeed is imported anywhere


@dataclass(frozen=True)
class Dist:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    local_world_size: int = 1  # ranks on this node (torchrun LOCAL_WORLD_SIZE, deepspeed LOCAL_SIZE)


DIST_ENV_KEYS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def standalone_env(**overrides: str) -> dict[str, str]:
    """This process's environment without the process-group variables, for a child process
    that must not join (or be mistaken for a member of) the trainer's process group."""
    env = {k: v for k, v in os.environ.items() if k not in DIST_ENV_KEYS}
    env.update(overrides)
    return env


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


BACKENDS = ("auto", "nccl", "gloo", "cpu:gloo,cuda:nccl")


def init_distributed(backend: str = "auto", timeout_min: float = 60.0) -> Dist:
    """Join (or, for a plain `python` launch, create) the process group.

    `backend`: auto (nccl on GPUs, gloo on CPUs) | nccl | gloo (also moves CUDA tensors: two ranks
    sharing one GPU, which NCCL refuses) | cpu:gloo,cuda:nccl (both, by tensor device). Our own
    collectives put their tensors on the rank's device (simple_grpo/train/collectives.py), so every
    choice works; DeepSpeed's reduce-scatter of CUDA gradients wants nccl on real multi-GPU runs."""
    import importlib

    import deepspeed

    # `import deepspeed.comm.torch as m` would bind the *torch* package (an attribute of deepspeed.comm)
    ds_torch_comm = importlib.import_module("deepspeed.comm.torch")

    if backend not in BACKENDS:
        raise UserError(f"--dist_backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    cuda = torch.cuda.is_available()
    if backend == "auto":
        backend = "nccl" if cuda else "gloo"
    if "nccl" in backend and not cuda:
        raise UserError(f"--dist_backend={backend} needs CUDA GPUs; use gloo (or auto) on CPUs")
    if "RANK" not in os.environ:  # plain `python grpo_ref_split.py`: a world of one
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(free_port()))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    local_ranks = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("LOCAL_SIZE", "1")))  # torchrun, deepspeed
    gpu = pick_gpu(local_rank, local_ranks, torch.cuda.device_count(), backend) if cuda else None
    if cuda:  # before any process group exists: NCCL binds each rank to its current device
        torch.cuda.set_device(gpu)
    if not cuda and hasattr(ds_torch_comm, "build_shm_op"):
        ds_torch_comm.build_shm_op = lambda: None  # no JIT compile on CPU; gloo all-reduce instead
    import warnings

    # deepspeed 0.19.8's ZeRO-2 gathers updated partitions with torch.distributed.
    # all_gather_into_tensor, which torch 2.13 deprecates (FutureWarning on every multi-rank run);
    # DeepSpeed's call, not ours: silenced by message until a DeepSpeed release moves off it
    warnings.filterwarnings("ignore", message=r"`torch\.distributed\.all_gather_into_tensor` is deprecated",
                            category=FutureWarning)
    if not torch.distributed.is_initialized():  # DeepSpeed adopts the group
        _init_process_group(backend, torch.device("cuda", gpu) if cuda else None, timeout_min)
        atexit.register(_destroy_process_group)  # before the interpreter tears down its threads
    deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False,
                               timeout=timedelta(minutes=timeout_min))
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    if cuda:
        device = torch.device("cuda", gpu)
    else:
        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))  # 1 per process on CPU
        device = torch.device("cpu")
    return Dist(rank, world, local_rank, device, local_ranks)


def pick_gpu(local_rank: int, local_ranks: int, device_count: int, backend: str) -> int:
    """The visible GPU of this rank: `local_rank % device_count`, so one-GPU-per-task launches
    (SLURM: LOCAL_RANK=3, one visible device) get GPU 0 and, with gloo, several ranks share GPUs.
    NCCL needs a GPU per rank: more local ranks than visible GPUs is one line."""
    assert device_count > 0, "no visible GPU"
    if "nccl" in backend and local_ranks > device_count:
        raise UserError(f"{local_ranks} ranks on this node but {device_count} GPU(s): NCCL needs a GPU "
                        f"per rank (--dist_backend=gloo lets ranks share one, slowly)")
    return local_rank % device_count


def _destroy_process_group() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def _init_process_group(backend: str, device: torch.device | None, timeout_min: float) -> None:
    """The default process group from RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT.

    Under torchrun with restarts (`--max-restarts`), the launcher's key-value store outlives a
    failed attempt, and with its default (static) rendezvous the new ranks would read the dead
    ranks' addresses from it and hang or fail to connect. So every attempt gets its own key prefix
    (TORCHELASTIC_RESTART_COUNT)."""
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    kw = {"device_id": device} if device is not None and "nccl" in backend and world > 1 else {}
    timeout = timedelta(minutes=timeout_min)  # every collective, not only the rendezvous
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        torch.distributed.init_process_group(backend=backend, init_method="env://", timeout=timeout, **kw)
        return
    store = torch.distributed.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world,
                                       is_master=False, timeout=timeout)
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    torch.distributed.init_process_group(backend=backend, rank=rank, world_size=world, timeout=timeout,
                                         store=torch.distributed.PrefixStore(f"/simple_grpo/attempt_{attempt}",
                                                                             store), **kw)


def ds_config(path: str | Path, *, micro_batch: int, grad_accum: int, world_size: int,
              grad_clip: float, bf16: bool, offload_optimizer: bool = False) -> dict:
    """The DeepSpeed JSON with its "auto" values filled from the trainer config
    (`offload_optimizer`: ZeRO-2's optimizer states and update on the CPU). ZeRO stage 3 is refused
    with a UserError: the ranks run different numbers of forward passes, which hangs its gathering."""
    p = Path(path)
    if not p.exists() and not p.is_absolute():  # the repo's own ds_config.json from any cwd
        p = Path(__file__).resolve().parents[2] / p  # simple_grpo/train/engine.py -> repo
    if not p.exists():
        raise UserError(f"DeepSpeed config {p} not found (set --ds_config=PATH)")
    try:
        cfg = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"DeepSpeed config {p} is not valid JSON: {e}") from None
    cfg["train_micro_batch_size_per_gpu"] = micro_batch
    cfg["gradient_accumulation_steps"] = grad_accum
    cfg["train_batch_size"] = micro_batch * grad_accum * world_size
    cfg["gradient_clipping"] = grad_clip  # the trainer config owns it (0 disables)
    cfg.setdefault("bf16", {})["enabled"] = bf16
    if bf16:  # micro-batch losses are already divided by the step's token count: many small
        # contributions, which a bf16 accumulator (8 bits of mantissa) would round away
        cfg.setdefault("data_types", {}).setdefault("grad_accum_dtype", "fp32")
    cfg["zero_allow_untested_optimizer"] = True  # a torch AdamW object, see the module docstring
    cfg.setdefault("zero_optimization", {}).setdefault("stage", 2)
    if str(cfg["zero_optimization"]["stage"]) == "3":  # ranks' forward counts differ: ZeRO-3 hangs
        raise UserError(f"DeepSpeed config {p} sets zero_optimization.stage 3, which the trainer refuses: "
                        f"its ranks run different numbers of forward passes (prefetching while the "
                        f"reference server works, evaluation and sampling outside the engine), so "
                        f"ZeRO-3's parameter gathering hangs; use stage 2, and --offload_optimizer or "
                        f"LoRA (--lora_r) for memory")
    if offload_optimizer:
        cfg["zero_optimization"]["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    return cfg


BETAS, EPS = (0.9, 0.99), 1e-8  # AdamW's, the same with and without offload

CPU_ADAM_HELP = ("it is a C++ extension compiled on first use, which needs a C++ compiler and ninja "
                 "(apt-get install g++ && pip install ninja), or prebuild it where a compiler is: "
                 "DS_BUILD_CPU_ADAM=1 pip install deepspeed")


def offloaded(config: dict) -> bool:
    """Whether this DeepSpeed config puts the optimizer (states and update) on the CPU."""
    return ((config.get("zero_optimization") or {}).get("offload_optimizer") or {}).get("device") == "cpu"


def cpu_adam(params, *, lr: float, weight_decay: float, betas: tuple[float, float] = BETAS):
    """DeepSpeed's CPU AdamW (what ZeRO-Offload steps on the CPU); one UserError line when its
    C++ extension cannot be built or loaded."""
    try:
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(params, lr=lr, betas=tuple(betas), eps=EPS, weight_decay=weight_decay,
                                adamw_mode=True)
    except Exception as e:  # noqa: BLE001 - a failed JIT build raises RuntimeError/OSError/...
        chain = [e]
        while chain[-1].__cause__ is not None and len(chain) < 10:
            chain.append(chain[-1].__cause__)
        lines = [line.strip() for x in chain for line in str(x).splitlines() if line.strip()]
        telling = [line for line in lines if "not found" in line or "error:" in line.lower()
                   or "No such file" in line]
        why = (telling or lines[-1:] or [type(chain[-1]).__name__])[0][:200]
        raise UserError(f"--offload_optimizer: DeepSpeed's CPU Adam could not be built ({why}); "
                        f"{CPU_ADAM_HELP}") from None


SCHEDULES = {"constant": "constant_with_warmup", "linear": "linear", "cosine": "cosine"}  # get_scheduler's


def lr_schedule(opt, name: str, warmup_steps: int, total_steps: int):
    """transformers.get_scheduler's `name` schedule (linear warm-up over `warmup_steps`, then constant
    or a linear / cosine decay) as a LambdaLR, shifted by one step: the k-th update (k = 0, 1, ...)
    uses its value after k + 1 steps, of total_steps + 1, so neither the first update (0 during
    warm-up) nor the last (0 at the end of a decay) trains at lr 0. DeepSpeed steps it after each
    optimizer step and keeps its state in checkpoints."""
    import warnings

    from transformers import get_scheduler

    sched = get_scheduler(SCHEDULES[name], opt, num_warmup_steps=max(0, warmup_steps),
                          num_training_steps=max(1, total_steps) + 1)
    with warnings.catch_warnings():  # "lr_scheduler.step() before optimizer.step()": on purpose
        warnings.simplefilter("ignore")
        sched.step()
    return sched


def build_engine(model, *, lr: float, weight_decay: float, warmup_steps: int, config: dict,
                 device: torch.device | None = None, lr_scheduler: str = "constant", total_steps: int = 1,
                 betas: tuple[float, float] = BETAS):
    """DeepSpeed engine with AdamW (`betas`) and a learning rate warmed up linearly over
    `warmup_steps`, then constant, or decayed (linear, cosine) over `total_steps` (lr_schedule).

    `device`: the rank's device (init_distributed's choice). DeepSpeed would otherwise select
    GPU LOCAL_RANK itself, which does not exist when ranks share a GPU or each task sees one.

    torch's fused AdamW updates ZeRO's flat fp32 partition in one pass; the default one allocates
    full-size temporaries for sqrt and division (~0.9 s a step for 135M parameters on one CPU core).
    With `offload_optimizer` in the config, DeepSpeed's CPU AdamW instead (same betas, eps, weight
    decay and schedule), which ZeRO-Offload requires."""
    import deepspeed

    params = [p for p in model.parameters() if p.requires_grad]
    if offloaded(config):
        opt = cpu_adam(params, lr=lr, weight_decay=weight_decay, betas=betas)
    else:
        opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, betas=tuple(betas), eps=EPS,
                                fused=True)
    sched = lr_schedule(opt, lr_scheduler, warmup_steps, total_steps)
    args = None if device is None or device.index is None else SimpleNamespace(device_rank=device.index)
    engine, _, _, _ = deepspeed.initialize(args=args, model=model, optimizer=opt, lr_scheduler=sched,
                                           config=config)
    return engine
