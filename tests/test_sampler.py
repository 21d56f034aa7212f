"""The overlap sampler's pieces (simple_grpo/train/sampler.py): the weights folder in shared memory
(written behind the step, read back bit-identical, the two newest files kept, a reader never sees
a partial file) and the gate that keeps the sampler at most one step ahead, counted in trainer
steps (a step advances the weight version by --num_iterations, or not at all when it trained
nothing)."""
from __future__ import annotations

import json

import pytest
import torch

from simple_grpo.models import build_tiny_model
from simple_grpo.gen.shm_weights import pick_weights, read_latest, required_step
from simple_grpo.train.sampler import LocalWeights, shm_folder


@pytest.mark.parametrize("first, n, ranks, ahead, want", [
    (0, 1, 1, 1, 0),    # batch 1 (step 1): the first weights
    (0, 2, 1, 1, 0),    # batch 2 (step 2) is sampled while step 1 trains: still step 0's weights
    (0, 3, 1, 1, 1),    # batch 3 (step 3) waits for step 1's weights
    (0, 10, 1, 1, 8),   # batch k waits for step k - 2
    (5, 3, 1, 1, 6),    # a resumed run: counted from the first step published
    (0, 4, 2, 1, 0),    # 2 ranks: batches 3 and 4 are step 2's
    (0, 5, 2, 1, 1),    # ... batch 5 opens step 3: step 1's weights
    (0, 3, 1, 0, 2),    # ahead 0: lockstep, batch k with step k - 1's weights
])
def test_the_sampler_is_at_most_one_step_ahead(first, n, ranks, ahead, want):
    assert required_step(first, n, ranks, ahead) == want


class _Tiny(torch.nn.Module):  # a model whose one weight is its version: what was loaded shows
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))


@pytest.mark.parametrize("ranks", [1, 2])
@pytest.mark.parametrize("slow_sampler", [False, True])
def test_the_gate_counts_steps_not_versions(ranks, slow_sampler):
    """--num_iterations=2 (a step adds 2 versions) and an empty step 3 (no version added): the
    trainer publishes each step's weights, the sampler's n-th batch takes exactly the weights of
    step ceil(n / ranks) - 2 (a gate counting versions as steps would take older ones), from that
    step's own file even when the next step has landed already (slow_sampler), and every batch
    the trainer then trains is at most one step (2 versions) old."""
    from simple_grpo.gen.worker import load_into

    versions = {0: 0, 1: 2, 2: 4, 3: 4, 4: 6, 5: 8, 6: 10}  # step -> version after it
    model, folder = _Tiny(), shm_folder()
    try:
        w = LocalWeights(folder)

        def publish(step):
            with torch.no_grad():
                model.w.fill_(versions[step])
            w.publish(model, versions[step], step)
            w.wait()

        publish(0)
        for s in range(7):  # while step s trains (none for s = 0), the batches of step s + 1
            if s and slow_sampler:
                publish(s)  # step s ended before the sampler got to its gate
            for n in range(s * ranks + 1, (s + 1) * ranks + 1):
                need = required_step(read_latest(folder).first, n, ranks, ahead=1)
                assert need == max(s - 1, 0), (n, need)
                if not slow_sampler:
                    assert pick_weights(read_latest(folder), need + 1) is None, "wait for that step"
                step, version, path = pick_weights(read_latest(folder), need)
                assert (step, version) == (need, versions[need]), (n, step, version)
                got = _Tiny()
                load_into(got, path)
                assert float(got.w.detach()) == version, "that step's own file"
                assert versions[s] - version <= 2, "trained (by step s + 1) at most one step stale"
            if s and not slow_sampler:
                publish(s)
    finally:
        import shutil

        shutil.rmtree(folder, ignore_errors=True)


def test_an_empty_step_publishes_its_step_without_rewriting_the_weights():
    model, folder = _Tiny(), shm_folder()
    try:
        w = LocalWeights(folder)
        w.publish(model, 4, 2)
        w.wait()
        before = (folder / "weights-4.safetensors").stat()
        w.publish(model, 4, 3)  # step 3 trained nothing: same version
        assert w._thread is None and w.snapshot_seconds == 0.0, "no snapshot, no write"
        after = (folder / "weights-4.safetensors").stat()
        assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
        got = read_latest(folder)
        assert (got.step, got.version, got.path.name, got.first) == (3, 4, "weights-4.safetensors", 2)
        assert pick_weights(got, 2) == (2, 4, folder / "weights-4.safetensors")
    finally:
        import shutil

        shutil.rmtree(folder, ignore_errors=True)


@pytest.mark.parametrize("need, want", [
    (None, (5, 8, "weights-8.safetensors")),  # no gate: the newest
    (4, (4, 6, "weights-6.safetensors")),     # the required step's own file, not the newest
    (5, (5, 8, "weights-8.safetensors")),     # the newest is the required one
    (6, None),                                # not published yet: wait
    (3, (5, 8, "weights-8.safetensors")),     # its file is gone: the newest, never an older one
])
def test_pick_weights(need, want, tmp_path):
    (tmp_path / "latest.json").write_text(json.dumps({
        "version": 8, "step": 5, "file": "weights-8.safetensors", "first": 0,
        "steps": {"4": [6, "weights-6.safetensors"], "5": [8, "weights-8.safetensors"]}}))
    got = pick_weights(read_latest(tmp_path), need)
    assert got == (want if want is None else (*want[:2], tmp_path / want[2]))


def test_local_weights_round_trip_and_keep_two_files(tmp_path):
    from simple_grpo.gen.worker import load_into

    model = build_tiny_model(seed=3)
    folder = shm_folder()
    try:
        w = LocalWeights(folder, dtype=None)
        assert read_latest(folder) is None  # nothing written yet: the sampler waits
        for version in range(4):
            with torch.no_grad():
                for p in model.parameters():
                    p.add_(0.01)
            w.publish(model, version, version + 10)
            w.wait()
            got = read_latest(folder)
            assert (got.version, got.step) == (version, version + 10) and got.path.exists()
            other = build_tiny_model(seed=9)
            load_into(other, got.path)
            assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(),
                                                        other.state_dict().values())), version
        files = sorted(p.name for p in folder.glob("weights-*.safetensors"))
        assert files == ["weights-2.safetensors", "weights-3.safetensors"]
        assert not list(folder.glob(".*.tmp")), "no partial file left behind"
        assert json.loads((folder / "latest.json").read_text()) == {
            "version": 3, "step": 13, "file": "weights-3.safetensors", "first": 10,
            "steps": {"12": [2, "weights-2.safetensors"], "13": [3, "weights-3.safetensors"]}}
        assert w.failure is None and w.snapshot_seconds > 0
    finally:
        import shutil

        shutil.rmtree(folder, ignore_errors=True)


def test_a_failed_write_is_reported_not_raised(tmp_path):
    folder = tmp_path / "gone"
    w = LocalWeights(folder)  # the folder does not exist: the write fails in the background
    w.publish(build_tiny_model(seed=1), 1, 1)
    w.wait()
    assert w.failure and "No such file" in w.failure and read_latest(folder) is None


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
