"""Learning moves the right way, end to end: one step of the real trainer (`grpo_ref_split.main`:
real sampling, scoring, group advantages and a DeepSpeed step) makes every completion with a
positive advantage more likely and every one with a negative advantage less likely; and the
rollout's advantages are its rewards' group-relative scores, its rewards the reward function's
values of its completions. A trainer that minimised reward (an advantage or loss sign flipped
anywhere on the way) fails here."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from simple_grpo.algo.logprobs import completion_logprobs
from simple_grpo.algo.masks import mask_from_lengths
from simple_grpo.models import load_model
from simple_grpo.train import loop
from simple_grpo.gen.reward_registry import register

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import grpo_ref_split  # noqa: E402

G = 8


@register("direction_distinct_chars")
def distinct_chars(completion: str, example: dict) -> float:
    """Differs between random completions, so every group has a spread of advantages."""
    return len(set(completion)) / 10.0


def one_step(model_dir: Path, run_dir: Path, preset: str, monkeypatch):
    """Train one step; -> the rollout it trained on (the real loop.step, observed, not replaced)."""
    seen = []
    real_step = loop.step

    def observed(ctx, weight_version):
        metrics, roll, trained = real_step(ctx, weight_version)
        seen.append(roll)
        return metrics, roll, trained

    monkeypatch.setattr(loop, "step", observed)
    grpo_ref_split.main([f"--model={model_dir}", f"--run_dir={run_dir}", "--steps=1", f"--preset={preset}",
                         "--beta=0", "--lr=1e-4", "--warmup_steps=1", "--prompts_per_step=2",
                         f"--num_generations={G}", f"--micro_batch_size={G}", "--max_new_tokens=8",
                         "--eval_every=0", "--rewards=direction_distinct_chars", "--save_every=0",
                         "--plot_every=0", "--samples_every=0"])
    (roll,) = seen
    return roll


@pytest.mark.parametrize("preset, scale", [
    ("grpo", "std"),      # (r - mean) / (std + 1e-6), per-sequence token mean
    ("dr_grpo", "none"),  # r - mean, constant normaliser
])
def test_one_step_raises_positive_and_lowers_negative_advantage_completions(preset, scale, tiny_model_dir,
                                                                           tmp_path, monkeypatch):
    roll = one_step(tiny_model_dir, tmp_path, preset, monkeypatch)
    b = roll.batch
    # scoring: the rewards are the reward function's values of the decoded completions
    assert b.rewards.tolist() == pytest.approx([distinct_chars(c, {}) for c in roll.completions])
    # advantages: each reward against its own group, by hand
    r_NG = b.rewards.double().view(-1, G)
    want_NG = r_NG - r_NG.mean(1, keepdim=True)
    if scale == "std":
        want_NG = want_NG / (r_NG.std(1, keepdim=True) + 1e-6)
    torch.testing.assert_close(b.advantages.double(), want_NG.view(-1), atol=1e-5, rtol=1e-5)
    adv_N = want_NG.view(-1)
    assert (adv_N > 0).sum() >= 4 and (adv_N < 0).sum() >= 4, f"a spread of advantages: {adv_N}"

    # learning: the sequence log-probability of each sampled completion, before and after the step
    inputs = (b.prompt_ids, b.prompt_lens, b.completion_ids, b.completion_lens)
    with torch.no_grad():
        before_NC = completion_logprobs(load_model(str(tiny_model_dir), "float32", "cpu").eval(), *inputs)
        after_NC = completion_logprobs(load_model(str(tmp_path / "final"), "float32", "cpu").eval(), *inputs)
    mask_NC = mask_from_lengths(b.completion_lens, b.completion_ids.shape[1])
    gain_N = ((after_NC - before_NC) * mask_NC).sum(1).double()
    assert float((adv_N * gain_N).sum()) > 0, "the step must raise the advantage-weighted log-likelihood"
    for i in range(len(adv_N)):
        if adv_N[i] > 0:
            assert gain_N[i] > 0, f"completion {i} (advantage {adv_N[i]:+.3f}) lost log-prob {gain_N[i]:.4f}"
        if adv_N[i] < 0:
            assert gain_N[i] < 0, f"completion {i} (advantage {adv_N[i]:+.3f}) gained log-prob {gain_N[i]:.4f}"
