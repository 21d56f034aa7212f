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


def _part(i: int, producer: str = "trainer-sampler"):
    """Part i of a sampler step: 2 rows whose ids and log-probs say i."""
    from simple_grpo.wire.codec import RolloutBatch

    return RolloutBatch(prompt_ids=torch.full((2, 3), 10 + i), prompt_lens=torch.full((2,), 3),
                        completion_ids=torch.full((2, 4), 20 + i), completion_lens=torch.full((2,), 4),
                        rewards=torch.full((2,), float(i)), advantages=torch.zeros(2),
                        ref_logprobs=torch.full((2, 4), -0.5 - i), batch_id=f"part-{i}",
                        meta={"producer": producer, "part": i})


def _own_part_rank(rank: int, port: int, world: int, held: list, results) -> None:
    """One gloo rank: hold part held[rank] (None: no batch), ask own_part for its own."""
    import os
    from types import SimpleNamespace

    from simple_grpo.train.sampler import own_part

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    try:
        got = own_part(None if held[rank] is None else _part(held[rank]),
                       SimpleNamespace(world_size=world, rank=rank, device=torch.device("cpu")))
        results[rank] = None if got is None else (got.meta["part"], got.batch_id, int(got.completion_ids[0, 0]),
                                                  float(got.ref_logprobs[0, 0]))
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.parametrize("held, want", [
    ([1, 2, 0], [0, 1, 2]),        # the queue handed the parts around: each gets its own back
    ([0, 1, 2], [0, 1, 2]),        # already in order: kept
    ([2, None, 0], [2, None, 0]),  # rank 1 got nothing (the sampler died): everyone keeps theirs
])
def test_each_rank_trains_the_part_of_its_own_stream(held, want):
    """3 real gloo processes: whichever part of the sampler's step the queue handed a rank, it
    trains the part drawn from its own stream (the same bytes), so a run's gradient sums do not
    depend on the order in which ranks asked the queue."""
    import torch.multiprocessing as mp

    from simple_grpo.train.engine import free_port

    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(_own_part_rank, args=(free_port(), 3, held, results), nprocs=3, join=True)
        got = [results[r] for r in range(3)]
    assert got == [None if p is None else (p, f"part-{p}", 20 + p, -0.5 - p) for p in want], got
