"""group_advantages against a plain-Python reference, and its edge cases."""
import statistics

import pytest
import torch

from simple_grpo.algo.advantages import group_advantages, zero_variance_groups


def reference(rows, scale, eps):
    out = []
    for row in rows:
        mean = sum(row) / len(row)
        std = statistics.stdev(row) if len(row) > 1 else 0.0  # sample std, divisor G - 1
        if all(r == row[0] for r in row):
            out.append([0.0] * len(row))
        elif scale == "std":
            out.append([(r - mean) / (std + eps) for r in row])
        else:
            out.append([r - mean for r in row])
    return out


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("scale", ["std", "none"])
def test_matches_python_loop(seed, scale):
    g = torch.Generator().manual_seed(seed)
    n, G = int(torch.randint(1, 7, (1,), generator=g)), int(torch.randint(1, 9, (1,), generator=g))
    # rewards on a coarse grid so that some groups are constant
    rewards = torch.randint(0, 3, (n, G), generator=g).double() * 0.5
    got = group_advantages(rewards, scale=scale, eps=1e-6)
    want = torch.tensor(reference(rewards.tolist(), scale, 1e-6), dtype=torch.float64)
    assert got.shape == rewards.shape
    assert torch.allclose(got, want, atol=1e-9)


def test_hand_computed_group():
    # rewards [1, 0, 0, 1]: mean 0.5, sample std = sqrt((4 * 0.25) / 3) = 0.57735
    adv = group_advantages(torch.tensor([[1.0, 0.0, 0.0, 1.0]], dtype=torch.float64), eps=0.0)
    assert torch.allclose(adv, torch.tensor([[0.8660254, -0.8660254, -0.8660254, 0.8660254]],
                                            dtype=torch.float64), atol=1e-6)


@pytest.mark.parametrize("rewards", [
    [[0.1, 0.1, 0.1]],      # constant non-representable float whose float32 mean is exact
    [[0.9, 0.9, 0.9]],      # one whose float32 mean rounds (r - mean = 6e-8): still exactly 0
    [[0.3] * 6],            # the same with six completions (r - mean = 3e-8)
    [[1.0, 1.0], [0.0, 0.0]],  # two constant groups
    [[7.0]],                # a group of one completion
])
@pytest.mark.parametrize("scale", ["std", "none"])
def test_zero_variance_gives_exact_zeros(rewards, scale):
    adv = group_advantages(torch.tensor(rewards), scale=scale)
    assert torch.equal(adv, torch.zeros_like(adv)), "constant groups carry no signal: exactly 0"
    assert zero_variance_groups(torch.tensor(rewards)).all()


def test_rejects_bad_input():
    with pytest.raises(AssertionError, match="num_prompts, G"):
        group_advantages(torch.zeros(4))
    with pytest.raises(AssertionError, match="finite"):
        group_advantages(torch.tensor([[1.0, float("nan")]]))
    with pytest.raises(AssertionError, match="scale"):
        group_advantages(torch.zeros(1, 2), scale="max")
