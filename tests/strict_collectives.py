"""Run a script with every torch.distributed collective guarded, the way NCCL would guard them.

    python -m torch.distributed.run ... tests/strict_collectives.py LOG.jsonl SCRIPT.py [args...]

Each collective call must (a) come from simple_grpo/train/collectives.py or from DeepSpeed (the trainer's
own collectives live in one module, which puts tensors on the rank's device) and (b) carry only
tensors on the rank's device (`collectives.rank_device()`: CUDA under NCCL, the CPU on a CPU box).
A violation raises at once, so the run fails; every call is also counted per caller in LOG.jsonl
(one line per rank at exit), so a test can check the guard really saw the trainer's collectives.
"""
import atexit
import json
import os
import runpy
import sys
from collections import Counter
from pathlib import Path

import torch
import torch.distributed

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from simple_grpo.train.collectives import rank_device  # noqa: E402

GUARDED = ("all_reduce", "broadcast", "all_gather", "all_gather_into_tensor", "reduce", "reduce_scatter",
           "reduce_scatter_tensor", "all_gather_object", "broadcast_object_list", "gather", "scatter",
           "gather_object", "scatter_object_list", "all_to_all", "all_to_all_single", "barrier")
ALLOWED = (str(ROOT / "simple_grpo" / "train" / "collectives.py"), os.sep + "deepspeed" + os.sep)
calls: Counter = Counter()


def _tensors(args, kwargs):
    for a in (*args, *kwargs.values()):
        if isinstance(a, torch.Tensor):
            yield a
        elif isinstance(a, (list, tuple)):
            yield from (t for t in a if isinstance(t, torch.Tensor))


def _guard(name, fn):
    def guarded(*args, **kwargs):
        caller = sys._getframe(1).f_code.co_filename
        if not any(part in caller for part in ALLOWED):
            raise RuntimeError(f"torch.distributed.{name} called from {caller}: the trainer's "
                               f"collectives belong in simple_grpo/train/collectives.py")
        want = rank_device()
        for t in _tensors(args, kwargs):
            if t.device != want:
                raise RuntimeError(f"torch.distributed.{name} got a tensor on {t.device}, the rank's "
                                   f"device is {want} (NCCL refuses CPU tensors)")
        calls[f"{'collectives' if 'collectives.py' in caller else 'deepspeed'}.{name}"] += 1
        return fn(*args, **kwargs)
    return guarded


for _name in GUARDED:
    if hasattr(torch.distributed, _name):
        setattr(torch.distributed, _name, _guard(_name, getattr(torch.distributed, _name)))


def _write_log(path=Path(sys.argv[1])):
    with open(path, "a") as f:
        f.write(json.dumps({"rank": os.environ.get("RANK"), "calls": dict(calls)}) + "\n")


atexit.register(_write_log)
script = sys.argv[2]
sys.argv = sys.argv[2:]
runpy.run_path(script, run_name="__main__")
