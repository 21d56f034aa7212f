"""Group-relative advantages: each completion is scored against the other completions of its prompt.

    A_ij = r_ij - mean_j(r_i)                       scale="none"  (Dr.GRPO)
    A_ij = (r_ij - mean_j(r_i)) / (std_j(r_i) + eps) scale="std"   (GRPO, DAPO, GSPO)

std is the *sample* standard deviation (Bessel's correction, divisor G - 1), the convention of
`torch.std` and TRL; a group of one completion has std 0. A group whose rewards are all equal
carries no signal and gets advantages of exactly 0 (never NaN), whatever `scale` is.
"""
from __future__ import annotations

import torch

SCALES = ("std", "none")


def group_advantages(rewards: torch.Tensor, scale: str = "std", eps: float = 1e-6) -> torch.Tensor:
    """rewards [num_prompts, G] -> advantages [num_prompts, G] (same dtype)."""
    assert rewards.dim() == 2, f"rewards must be [num_prompts, G], got {tuple(rewards.shape)}"
    assert scale in SCALES, f"scale must be one of {SCALES}, got {scale!r}"
    assert torch.isfinite(rewards).all(), "rewards must be finite (score failures before this)"
    centered_NG = rewards - rewards.mean(dim=1, keepdim=True)
    if scale == "std":
        G = rewards.shape[1]
        std_N1 = rewards.std(dim=1, keepdim=True) if G > 1 else torch.zeros_like(rewards[:, :1])
        centered_NG = centered_NG / (std_N1 + eps)
    constant_N1 = (rewards == rewards[:, :1]).all(dim=1, keepdim=True)
    return torch.where(constant_N1, torch.zeros_like(centered_NG), centered_NG)


def zero_variance_groups(rewards: torch.Tensor) -> torch.Tensor:
    """[num_prompts] bool: groups whose rewards are all equal (DAPO's dynamic sampling drops them)."""
    assert rewards.dim() == 2, f"rewards must be [num_prompts, G], got {tuple(rewards.shape)}"
    return (rewards == rewards[:, :1]).all(dim=1)
