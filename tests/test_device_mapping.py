"""Each rank's device is chosen once (engine.pick_gpu) and DeepSpeed gets that device, not GPU
LOCAL_RANK: ranks sharing one GPU (gloo) and one-GPU-per-task launches (SLURM: LOCAL_RANK=3 with
one visible device) would otherwise ask for a GPU that does not exist."""
from __future__ import annotations

import pytest
import torch

from simple_grpo.errors import UserError
from simple_grpo.models import build_tiny_model
from simple_grpo.train import engine as eng


@pytest.mark.parametrize("local_rank, local_ranks, gpus, backend, want", [
    (0, 4, 4, "nccl", 0),   # one GPU per rank
    (3, 4, 4, "nccl", 3),
    (3, 1, 1, "nccl", 0),   # SLURM one-GPU-per-task: LOCAL_RANK 3, one visible device
    (1, 2, 1, "gloo", 0),   # two ranks sharing one GPU (gloo moves CUDA tensors)
    (2, 4, 2, "gloo", 0),   # more ranks than GPUs (gloo): ranks wrap around, 0 1 0 1
    (3, 4, 2, "gloo", 1),
    (5, 6, 4, "gloo", 1),   # 6 ranks on 4 GPUs: 0 1 2 3 0 1
    (3, 4, 2, "cpu:gloo,cuda:nccl", None),  # NCCL refuses two ranks on one GPU: one line
    (2, 3, 2, "nccl", None),
])
def test_pick_gpu(local_rank, local_ranks, gpus, backend, want):
    if want is None:
        with pytest.raises(UserError, match="NCCL needs a GPU per rank"):
            eng.pick_gpu(local_rank, local_ranks, gpus, backend)
    else:
        assert eng.pick_gpu(local_rank, local_ranks, gpus, backend) == want


def test_deepspeed_gets_the_chosen_device_not_local_rank(dist_env, monkeypatch):
    from deepspeed.accelerator import get_accelerator

    acc = get_accelerator()
    calls = []
    real = acc.set_device
    monkeypatch.setattr(acc, "set_device", lambda index: (calls.append(index), real(index))[1])
    monkeypatch.setenv("LOCAL_RANK", "3")  # a rank whose LOCAL_RANK is not a visible device index
    cfg = eng.ds_config("ds_config.json", micro_batch=1, grad_accum=1, world_size=1, grad_clip=1.0,
                        bf16=False)
    engine = eng.build_engine(build_tiny_model(seed=1), lr=1e-3, weight_decay=0.0, warmup_steps=1,
                              config=cfg, device=torch.device("cpu", 0))
    assert calls and set(calls) == {0}, f"DeepSpeed selected device(s) {calls}, the trainer chose 0"
    assert engine.local_rank == 3


@pytest.mark.parametrize("ref_device, local_ranks, gpus, want", [
    ("auto", 1, 0, "cpu"),          # a CPU run: the server takes a core of its own
    ("auto", 3, 4, "cuda:3"),       # 3 training ranks on 4 GPUs: the spare one
    ("auto", 7, 8, "cuda:7"),
    ("auto", 4, 4, None),           # every GPU trains: one line showing the split launch
    ("cuda:0", 4, 4, "cuda:0"),     # asked for: shares a training GPU
    ("cpu", 4, 4, "cpu"),
])
def test_auto_started_reference_is_placed_off_the_training_gpus(ref_device, local_ranks, gpus, want):
    from simple_grpo.train.ref_process import place

    if want is None:
        with pytest.raises(UserError, match=r"CUDA_VISIBLE_DEVICES=7 python ref_server.py.*--ref_device"):
            place(ref_device, local_ranks, gpus)
    else:
        assert place(ref_device, local_ranks, gpus) == want


def test_reachable_host(monkeypatch):
    from simple_grpo.train.ref_process import reachable_host

    assert reachable_host(False) == "127.0.0.1"  # one node: loopback, no token
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")  # the rendezvous host is this machine
    assert reachable_host(True) == "127.0.0.1"


@pytest.mark.parametrize("device, dtype, requested, flash_installed, want", [
    ("cuda:0", torch.bfloat16, "auto", True, "flash_attention_2"),   # GPU, half precision
    ("cuda:0", torch.float32, "auto", True, "sdpa"),                 # flash-attn has no fp32 kernels
    ("cuda:0", torch.bfloat16, "auto", False, "sdpa"),               # not installed
    ("cpu", torch.float32, "auto", True, "sdpa"),
    ("cpu", torch.float32, "eager", False, "eager"),                 # asked for
    ("cuda:0", torch.float32, "flash_attention_2", True, None),      # asked for, cannot run: one line
    ("cpu", torch.float32, "flash", False, None),                    # not a choice
])
def test_attn_implementation(device, dtype, requested, flash_installed, want, monkeypatch):
    import importlib.util

    from simple_grpo import models

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: (object() if flash_installed else None) if name == "flash_attn"
                        else real(name, *a))
    if want is None:
        with pytest.raises(UserError, match="--attn_implementation"):
            models.attn_implementation(device, dtype, requested)
    else:
        assert models.attn_implementation(device, dtype, requested) == want
