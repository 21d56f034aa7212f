"""Truncated importance sampling (TIS) for the sampler/trainer mismatch, as pure functions over
[B, T] completion-token tensors and a mask.

A batch's sampling log-probs (`gen_logprobs`) come from other numerics than the trainer's forward
(a worker's device or dtype, a KV-cached decode step): even with the same weights the policy that
sampled a token is not exactly the one the trainer differentiates. TIS weights each token's
policy-gradient term by how much more likely the trainer found it than the sampler did:

    d_it = logp_trainer_old_it - logp_sampler_it            (valid tokens; 0 elsewhere)
    level "token":     w_it = exp(d_it)
    level "sequence":  w_it = exp(sum_t d_it m_it)           (the sequence's ratio, on each token)
    mode "truncate":   w <- min(w, cap)                      (one-sided, as in TIS)
    mode "mask":       w <- w if 1/cap <= w <= cap else 0    (the token / sequence is dropped)

`logp_trainer_old` is the trainer's log-prob at the start of the update (pi_old of the decoupled
objective, simple_grpo/train/offpolicy.py), for fresh and late batches alike. The weight multiplies
the policy-gradient term only (not the KL term) before aggregation. In mask mode the training
step removes the dropped tokens (or sequences) from the loss mask, so they also leave the loss's
denominator (policy_step.train_on_batch). Log-differences are clamped to [-20, 20] before exp().
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

TIS_LEVELS = ("off", "token", "sequence")
TIS_MODES = ("truncate", "mask")
_MAX_LOG = 20.0


@dataclass(frozen=True)
class TISSettings:
    """--tis, --tis_mode, --tis_cap (simple_grpo/common/config.py)."""

    level: str = "off"
    mode: str = "truncate"
    cap: float = 2.0

    @classmethod
    def from_config(cls, cfg) -> "TISSettings":
        assert cfg.tis != "auto", "--tis=auto is resolved at start-up (simple_grpo/train/sampler.py finalize)"
        return cls(cfg.tis, cfg.tis_mode, cfg.tis_cap)


def _log_ratios(trainer_old_BT, sampler_BT, m_BT, level: str) -> torch.Tensor:
    """[B, T] float64 log(pi_old / pi_sampler) of each valid token (sequence level: of its
    sequence), clamped; 0 at masked positions."""
    d_BT = torch.where(m_BT, trainer_old_BT.detach().double() - sampler_BT.double(), 0.0)
    if level == "sequence":
        d_BT = d_BT.sum(1, keepdim=True).expand_as(d_BT)
    return torch.where(m_BT, d_BT.clamp(-_MAX_LOG, _MAX_LOG), 0.0)


@torch.no_grad()
def ratio_max(trainer_old_BT: torch.Tensor, sampler_BT: torch.Tensor, mask_BT: torch.Tensor,
              level: str = "token") -> float:
    """The largest pi_old / pi_sampler of the valid tokens before truncation or masking (the
    metric tis_ratio_max); 0.0 without valid tokens."""
    m_BT = mask_BT.bool()
    if not m_BT.any():
        return 0.0
    return float(torch.exp(_log_ratios(trainer_old_BT, sampler_BT, m_BT, level)[m_BT].max()))


@torch.no_grad()
def tis_weights(trainer_old_BT: torch.Tensor, sampler_BT: torch.Tensor, mask_BT: torch.Tensor, *,
                level: str = "token", mode: str = "truncate", cap: float = 2.0):
    """-> (weights [B, T], 0 at masked positions; truncated-or-masked [B, T] bool, valid tokens only).
    Masked positions may hold any value (even inf/NaN) in both log-prob tensors."""
    assert level in TIS_LEVELS[1:], f"tis level must be one of {TIS_LEVELS[1:]}, got {level!r}"
    assert mode in TIS_MODES, f"tis mode must be one of {TIS_MODES}, got {mode!r}"
    assert cap >= 1.0, f"tis cap must be >= 1, got {cap}"
    assert trainer_old_BT.shape == sampler_BT.shape == mask_BT.shape, "tis inputs differ in shape"
    m_BT = mask_BT.bool()
    raw_BT = torch.exp(_log_ratios(trainer_old_BT, sampler_BT, m_BT, level))
    if mode == "truncate":
        clipped_BT = raw_BT > cap
        w_BT = raw_BT.clamp(max=cap)
    else:
        clipped_BT = (raw_BT < 1.0 / cap) | (raw_BT > cap)
        w_BT = torch.where(clipped_BT, 0.0, raw_BT)
    w_BT = torch.where(m_BT, w_BT, 0.0).to(trainer_old_BT.dtype)
    return w_BT, clipped_BT & m_BT


def tis_sums(w_BT: torch.Tensor, clipped_BT: torch.Tensor, mask_BT: torch.Tensor) -> dict[str, float]:
    """Sums for the step's metrics over the tokens of `mask_BT`: tis_weight_mean = tis_weight_sum /
    tis_tokens and tis_clipped_frac = tis_clipped / tis_seen (simple_grpo.train.offpolicy.
    finish_ratios). The step adds the tokens mask mode removed to tis_masked and tis_seen."""
    m_BT = mask_BT.bool()
    n = float(m_BT.sum())
    return {"tis_weight_sum": float((w_BT.double() * m_BT).sum()),
            "tis_clipped": float((clipped_BT & m_BT).sum()), "tis_tokens": n, "tis_seen": n}
