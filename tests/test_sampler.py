"""The overlap sampler's pieces (simple_grpo/train/sampler.py): the weights folder in shared memory
(written behind the step, read back bit-identical, the two newest files kept, a reader never sees
a partial file) and the rule that keeps the sampler at most one step ahead."""
from __future__ import annotations

import json

import pytest
import torch

from simple_grpo.models import build_tiny_model
from simple_grpo.train.sampler import LocalWeights, read_latest, required_version, shm_folder


@pytest.mark.parametrize("first, n, ranks, ahead, want", [
    (0, 1, 1, 1, 0),    # batch 1 (step 1): the first weights
    (0, 2, 1, 1, 0),    # batch 2 (step 2) is sampled while step 1 trains: still version 0
    (0, 3, 1, 1, 1),    # batch 3 (step 3) waits for step 1's weights
    (0, 10, 1, 1, 8),   # batch k waits for version k - 2
    (5, 3, 1, 1, 6),    # a resumed run: counted from the first version read
    (0, 4, 2, 1, 0),    # 2 ranks: batches 3 and 4 are step 2's
    (0, 5, 2, 1, 1),    # ... batch 5 opens step 3: version 1
    (0, 3, 1, 0, 2),    # ahead 0: lockstep, batch k with version k - 1
])
def test_the_sampler_is_at_most_one_step_ahead(first, n, ranks, ahead, want):
    assert required_version(first, n, ranks, ahead) == want


def test_local_weights_round_trip_and_keep_two_files(tmp_path):
    from simple_grpo.train.worker import load_into

    model = build_tiny_model(seed=3)
    folder = shm_folder()
    try:
        w = LocalWeights(folder, dtype=None)
        assert read_latest(folder) is None  # nothing written yet: the sampler waits
        for version in range(4):
            with torch.no_grad():
                for p in model.parameters():
                    p.add_(0.01)
            w.publish(model, version)
            w.wait()
            got_version, path = read_latest(folder)
            assert got_version == version and path.exists()
            other = build_tiny_model(seed=9)
            load_into(other, path)
            assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(),
                                                        other.state_dict().values())), version
        files = sorted(p.name for p in folder.glob("weights-*.safetensors"))
        assert files == ["weights-2.safetensors", "weights-3.safetensors"]
        assert not list(folder.glob(".*.tmp")), "no partial file left behind"
        assert json.loads((folder / "latest.json").read_text()) == {"version": 3, "file": "weights-3.safetensors"}
        assert w.failure is None and w.snapshot_seconds > 0
    finally:
        import shutil

        shutil.rmtree(folder, ignore_errors=True)


def test_a_failed_write_is_reported_not_raised(tmp_path):
    folder = tmp_path / "gone"
    w = LocalWeights(folder)  # the folder does not exist: the write fails in the background
    w.publish(build_tiny_model(seed=1), 1)
    w.wait()
    assert w.failure and "No such file" in w.failure and read_latest(folder) is None
