"""When --overlap=auto turns the overlap sampler on (simple_grpo/train/sampler.py); its weights
handoff is tests/test_handoff.py, its runs tests/test_overlap.py."""
from __future__ import annotations

import pytest
import torch


@pytest.mark.parametrize("device, gpus, cpus, local_ranks, want", [
    ("cuda", 4, 64, 3, True),    # 3 training GPUs and a spare one for the sampler
    ("cuda", 4, 64, 4, False),   # every GPU trains
    ("cuda", 2, 64, 4, False),   # more ranks than GPUs (sharing them): no spare one either
    ("cpu", 0, 2, 1, True),      # a CPU run: a spare core
    ("cpu", 0, 2, 2, False),     # every core trains
])
def test_overlap_auto_needs_a_device_beside_the_training_ranks(device, gpus, cpus, local_ranks, want,
                                                               monkeypatch):
    """--overlap=auto (a trainer that starts its own reference server) turns the sampler on only
    when this node has a device no training rank uses: GPUs on a GPU run, cores on a CPU run."""
    import os
    from types import SimpleNamespace

    from simple_grpo.cli import parse_config
    from simple_grpo.train import sampler
    from simple_grpo.common.config import TrainConfig, resolve

    monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus)
    monkeypatch.setattr(os, "cpu_count", lambda: cpus)
    cfg = resolve(parse_config(TrainConfig, ["--overlap=auto", "--beta=0.04"]))
    dist = SimpleNamespace(device=SimpleNamespace(type=device), local_world_size=local_ranks,
                           world_size=local_ranks, rank=0)
    assert sampler.enabled(cfg, dist) is want
    assert sampler.finalize(cfg, dist).overlap == ("true" if want else "false")
