"""The GRPO-family policy loss as pure functions over [B, T] completion-token tensors and a mask.

One per-token objective, three knobs (clip range, KL estimator, aggregation) and a ratio level:

    r_t    = exp(logp_t - old_logp_t)                                 ratio_level="token"
    s_i    = exp(mean_{t valid} (logp_t - old_logp_t))                ratio_level="sequence" (GSPO)
    pg_t   = -min(r_t * A_i, clip(r_t, 1 - eps_low, 1 + eps_high) * A_i)
    kl_t   = k1: logp - ref | k2: (logp - ref)^2 / 2 | k3: exp(ref - logp) - (ref - logp) - 1
    loss_t = pg_t + beta * kl_t
    loss   = aggregate(loss_t, mask, agg)

Aggregation modes (L = per-token loss, m = mask, B sequences):
    "seq-mean-token-mean"      (GRPO)    1/B sum_i [ sum_t L_it m_it / sum_t m_it ]
    "token-mean"               (DAPO)    sum_it L_it m_it / N,  N = num_tokens or sum_it m_it
    "seq-mean-token-sum-norm"  (Dr.GRPO) sum_it L_it m_it / N,  N = num_tokens or B * max_tokens

Micro-batching: with `num_tokens` (token modes) or `num_seqs` (seq-mean-token-mean) set to the whole
step's count, the gradients of the micro-batches *sum* to the full batch's gradient.

Masked tokens get exactly zero gradient and may hold any value (even inf/NaN) in every input.
Log-differences are clamped to [-20, 20] before exp(), so a wild ratio cannot overflow to inf.
"""
from __future__ import annotations

import torch

KL_ESTIMATORS = ("k1", "k2", "k3")
AGG_MODES = ("seq-mean-token-mean", "token-mean", "seq-mean-token-sum-norm")
RATIO_LEVELS = ("token", "sequence")
_MAX_LOG = 20.0

# A preset is plain data: the trainer maps these keys onto group_advantages(scale=...),
# policy_loss(...) and its sampling options; any key can be overridden from the command line.
PRESETS: dict[str, dict] = {
    "grpo": dict(scale="std", agg="seq-mean-token-mean", beta=0.04, eps_low=0.2, eps_high=0.2,
                 kl="k3", ratio_level="token", dynamic_sampling=False, overlong_filter=False,
                 overlong_reward=False),
    "dr_grpo": dict(scale="none", agg="seq-mean-token-sum-norm", beta=0.0, eps_low=0.2,
                    eps_high=0.2, kl="k3", ratio_level="token", dynamic_sampling=False,
                    overlong_filter=False, overlong_reward=False),
    "dapo": dict(scale="std", agg="token-mean", beta=0.0, eps_low=0.2, eps_high=0.28, kl="k3",
                 ratio_level="token", dynamic_sampling=True, overlong_filter=False,
                 overlong_reward=True),
    "gspo": dict(scale="std", agg="seq-mean-token-mean", beta=0.0, eps_low=3e-4, eps_high=4e-4,
                 kl="k3", ratio_level="sequence", dynamic_sampling=False, overlong_filter=False,
                 overlong_reward=False),
}


def kl_estimate(logp: torch.Tensor, ref_logp: torch.Tensor, kind: str = "k3") -> torch.Tensor:
    """Per-token estimate of KL(policy || reference) from samples of the policy."""
    assert kind in KL_ESTIMATORS, f"kl must be one of {KL_ESTIMATORS}, got {kind!r}"
    diff = (logp - ref_logp).clamp(-_MAX_LOG, _MAX_LOG)  # log(pi / ref)
    if kind == "k1":
        return diff
    if kind == "k2":
        return 0.5 * diff * diff
    return torch.exp(-diff) + diff - 1  # k3: ref/pi - log(ref/pi) - 1 >= 0


def aggregate(loss_BT: torch.Tensor, mask_BT: torch.Tensor, mode: str, *,
              max_tokens: int | None = None, num_tokens: float | None = None,
              num_seqs: int | None = None) -> torch.Tensor:
    """Reduce a per-token loss to a scalar; masked positions contribute exactly nothing."""
    assert mode in AGG_MODES, f"agg must be one of {AGG_MODES}, got {mode!r}"
    assert loss_BT.shape == mask_BT.shape, f"loss {tuple(loss_BT.shape)} vs mask {tuple(mask_BT.shape)}"
    mask_BT = mask_BT.bool()
    masked_BT = torch.where(mask_BT, loss_BT, torch.zeros_like(loss_BT))
    B, T = loss_BT.shape
    if mode == "seq-mean-token-mean":
        per_seq_B = masked_BT.sum(1) / mask_BT.sum(1).clamp(min=1)
        return per_seq_B.sum() / max(num_seqs if num_seqs is not None else B, 1)
    if mode == "token-mean":
        denom = num_tokens if num_tokens is not None else mask_BT.sum().item()
    else:  # seq-mean-token-sum-norm: a constant normaliser, so length does not bias the gradient
        denom = num_tokens if num_tokens is not None else B * (max_tokens or T)
    return masked_BT.sum() / max(float(denom), 1.0)


def policy_loss(logp: torch.Tensor, old_logp: torch.Tensor | None, ref_logp: torch.Tensor | None,
                advantages: torch.Tensor, mask: torch.Tensor, *, eps_low: float = 0.2,
                eps_high: float = 0.2, beta: float = 0.0, kl: str = "k3",
                agg: str = "seq-mean-token-mean", max_tokens: int | None = None,
                ratio_level: str = "token", num_tokens: float | None = None,
                num_seqs: int | None = None) -> tuple[torch.Tensor, dict[str, float]]:
    """Clipped policy-gradient loss + beta * KL over completion tokens -> (scalar loss, metrics).

    logp, old_logp, ref_logp, mask: [B, T]; advantages: [B]. `old_logp=None` means on-policy
    (old = logp detached, ratio 1). `ref_logp` may be None only when beta == 0.
    """
    B, T = logp.shape
    assert mask.shape == (B, T), f"mask {tuple(mask.shape)} != logp {(B, T)}"
    assert advantages.shape == (B,), f"advantages must be [B]={B}, got {tuple(advantages.shape)}"
    assert ratio_level in RATIO_LEVELS, f"ratio_level must be one of {RATIO_LEVELS}"
    assert eps_low >= 0 and eps_high >= 0, "clip ranges must be >= 0"
    assert beta == 0 or ref_logp is not None, "beta > 0 needs ref_logp"
    for name, t in (("old_logp", old_logp), ("ref_logp", ref_logp)):
        assert t is None or t.shape == (B, T), f"{name} {tuple(t.shape)} != logp {(B, T)}"
    mask_BT = mask.bool()
    zero = torch.zeros((), dtype=logp.dtype, device=logp.device)
    # Sanitise first so masked garbage (inf, NaN) can never reach a gradient.
    logp_BT = torch.where(mask_BT, logp, zero)
    old_BT = logp_BT.detach() if old_logp is None else torch.where(mask_BT, old_logp.to(logp.dtype), zero)
    log_ratio_BT = (logp_BT - old_BT).clamp(-_MAX_LOG, _MAX_LOG)
    if ratio_level == "sequence":
        n_B = mask_BT.sum(1).clamp(min=1)
        seq_log_ratio_B = (log_ratio_BT * mask_BT).sum(1) / n_B
        log_ratio_BT = seq_log_ratio_B[:, None].expand(B, T)
    ratio_BT = torch.exp(log_ratio_BT)
    adv_B1 = advantages.to(logp.dtype)[:, None]
    clipped_BT = ratio_BT.clamp(1 - eps_low, 1 + eps_high)
    pg_BT = -torch.min(ratio_BT * adv_B1, clipped_BT * adv_B1)
    loss_BT = pg_BT
    if ref_logp is not None:
        kl_BT = kl_estimate(logp_BT, torch.where(mask_BT, ref_logp.to(logp.dtype), zero), kl)
        if beta:
            loss_BT = loss_BT + beta * kl_BT
    else:
        kl_BT = torch.zeros_like(logp_BT)
    loss = aggregate(loss_BT, mask_BT, agg, max_tokens=max_tokens, num_tokens=num_tokens,
                     num_seqs=num_seqs)

    with torch.no_grad():
        n = mask_BT.sum().clamp(min=1)
        adv_BT = adv_B1.expand(B, T)
        low_BT = (ratio_BT < 1 - eps_low) & (adv_BT < 0) & mask_BT   # clipped below: no gradient
        high_BT = (ratio_BT > 1 + eps_high) & (adv_BT > 0) & mask_BT  # clipped above: no gradient
        metrics = {
            "kl": float((kl_BT * mask_BT).sum() / n),
            "clip_low_frac": float(low_BT.sum() / n),
            "clip_high_frac": float(high_BT.sum() / n),
            "ratio_mean": float((ratio_BT * mask_BT).sum() / n),
            "pg_loss": float(aggregate(pg_BT.detach(), mask_BT, agg, max_tokens=max_tokens,
                                       num_tokens=num_tokens, num_seqs=num_seqs)),
            "tokens": float(mask_BT.sum()),
        }
    return loss, metrics
