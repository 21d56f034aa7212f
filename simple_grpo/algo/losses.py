"""The GRPO-family policy loss as pure functions over [B, T] completion-token tensors and a mask.

A per-token objective (pg_loss: clip | cispo | sapo), its knobs (clip range, dual clip, SAPO's
temperatures, KL estimator, aggregation) and a ratio level:

    r_t    = exp(logp_t - old_logp_t)                                 ratio_level="token"
    s_i    = exp(mean_{t valid} (logp_t - old_logp_t))                ratio_level="sequence" (GSPO)
    s_it   = sg(s_i) * exp(logp_t - sg(logp_t))   the ratio a sequence-level token sees (GSPO-token):
             the value of s_i; token t's gradient flows through its own logp_t only, so a per-token
             weight w_t (TIS) weights that token's gradient, not its sequence's mean (verl's GSPO)
    pg_t   = -min(r_t * A_i, clip(r_t, 1 - eps_low, 1 + eps_high) * A_i)    pg_loss="clip" (PPO/GRPO)
             dual-clip (clip_ratio_c = c > 1): for A_i < 0, pg_t = min(pg_t, -c * A_i)
    pg_t   = -sg(clip(r_t, 1 - eps_low, 1 + eps_high)) * A_i * logp_t     pg_loss="cispo" (MiniMax-M1)
    pg_t   = -(4 / tau) * sigmoid(tau * (r_t - 1)) * A_i                  pg_loss="sapo" (Qwen SAPO)
             tau = tau_pos if A_i > 0 else tau_neg; sg = stop-gradient
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
PG_LOSSES = ("clip", "cispo", "sapo")
_MAX_LOG = 20.0

# A preset is plain data: the trainer maps these keys onto group_advantages(scale=...),
# policy_loss(...) and its sampling options; any key can be overridden from the command line.
_CLIP = dict(pg_loss="clip", tau_pos=1.0, tau_neg=1.05, clip_ratio_c=None)  # PPO's clipped term

PRESETS: dict[str, dict] = {
    "grpo": dict(scale="std", agg="seq-mean-token-mean", beta=0.04, eps_low=0.2, eps_high=0.2,
                 kl="k3", ratio_level="token", dynamic_sampling=False, overlong_filter=False,
                 overlong_reward=False, **_CLIP),
    "dr_grpo": dict(scale="none", agg="seq-mean-token-sum-norm", beta=0.0, eps_low=0.2,
                    eps_high=0.2, kl="k3", ratio_level="token", dynamic_sampling=False,
                    overlong_filter=False, overlong_reward=False, **_CLIP),
    "dapo": dict(scale="std", agg="token-mean", beta=0.0, eps_low=0.2, eps_high=0.28, kl="k3",
                 ratio_level="token", dynamic_sampling=True, overlong_filter=False,
                 overlong_reward=True, **_CLIP),
    "gspo": dict(scale="std", agg="seq-mean-token-mean", beta=0.0, eps_low=3e-4, eps_high=4e-4,
                 kl="k3", ratio_level="sequence", dynamic_sampling=False, overlong_filter=False,
                 overlong_reward=False, **_CLIP),
    # MiniMax-M1 (arXiv 2506.13585): no lower bound on the IS weight (eps_low=1: clip at 0), only
    # the upper one; it does not publish its eps_high, so the weight is capped at 4 (eps_high=3),
    # ScaleRL's truncation (arXiv 2510.13786). Token-mean over the batch's tokens, no KL.
    "cispo": dict(scale="std", agg="token-mean", beta=0.0, eps_low=1.0, eps_high=3.0, kl="k3",
                  ratio_level="token", dynamic_sampling=False, overlong_filter=False,
                  overlong_reward=False, pg_loss="cispo", tau_pos=1.0, tau_neg=1.05,
                  clip_ratio_c=None),
    # Qwen SAPO (arXiv 2511.20347): tau_pos=1.0, tau_neg=1.05, GRPO's per-sequence token mean;
    # eps_low/eps_high are unused (no hard clip).
    "sapo": dict(scale="std", agg="seq-mean-token-mean", beta=0.0, eps_low=0.2, eps_high=0.2,
                 kl="k3", ratio_level="token", dynamic_sampling=False, overlong_filter=False,
                 overlong_reward=False, pg_loss="sapo", tau_pos=1.0, tau_neg=1.05,
                 clip_ratio_c=None),
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


def pg_terms(ratio_BT: torch.Tensor, logp_BT: torch.Tensor, adv_B1: torch.Tensor, *,
             pg_loss: str = "clip", eps_low: float = 0.2, eps_high: float = 0.2,
             tau_pos: float = 1.0, tau_neg: float = 1.05,
             clip_ratio_c: float | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Per-token policy-gradient term [B, T] and per-token metric tensors (to be averaged over
    valid tokens): clip_low_frac / clip_high_frac (clip: tokens whose gradient the clip removes;
    cispo: tokens whose IS weight is truncated, which keep their gradient), dual_clip_frac (capped by
    the dual clip: no gradient), soft_gate_mean (sapo: 4 sigma (1 - sigma), the gradient's weight
    relative to the unclipped -r A; 1 at r = 1)."""
    lo, hi = 1 - eps_low, 1 + eps_high
    r_BT = ratio_BT.detach()
    clipped_BT = ratio_BT.clamp(lo, hi)
    if pg_loss == "cispo":  # REINFORCE weighted by a truncated, stop-gradient IS weight
        return -clipped_BT.detach() * adv_B1 * logp_BT, {"clip_low_frac": r_BT < lo,
                                                         "clip_high_frac": r_BT > hi}
    if pg_loss == "sapo":  # a sigmoid gate, steeper (tau_neg > tau_pos) for negative advantages
        tau_B1 = torch.where(adv_B1 > 0, torch.full_like(adv_B1, tau_pos),
                             torch.full_like(adv_B1, tau_neg))
        gate_BT = torch.sigmoid(tau_B1 * (ratio_BT - 1))
        g_BT = gate_BT.detach()
        return -(4 / tau_B1) * gate_BT * adv_B1, {"soft_gate_mean": 4 * g_BT * (1 - g_BT)}
    assert pg_loss == "clip", f"pg_loss must be one of {PG_LOSSES}, got {pg_loss!r}"
    pg_BT = -torch.min(ratio_BT * adv_B1, clipped_BT * adv_B1)
    neg_BT = (adv_B1 < 0).expand_as(pg_BT)
    stats = {"clip_low_frac": (r_BT < lo) & neg_BT, "clip_high_frac": (r_BT > hi) & (adv_B1 > 0)}
    if clip_ratio_c is not None:  # dual clip (Ye et al. 2020): cap a negative-advantage token's loss
        cap_B1 = -clip_ratio_c * adv_B1
        stats["dual_clip_frac"] = neg_BT & (pg_BT.detach() > cap_B1)
        pg_BT = torch.where(neg_BT, torch.minimum(pg_BT, cap_B1), pg_BT)
    return pg_BT, stats


def policy_loss(logp: torch.Tensor, old_logp: torch.Tensor | None, ref_logp: torch.Tensor | None,
                advantages: torch.Tensor, mask: torch.Tensor, *, eps_low: float = 0.2,
                eps_high: float = 0.2, beta: float = 0.0, kl: str = "k3",
                agg: str = "seq-mean-token-mean", max_tokens: int | None = None,
                ratio_level: str = "token", num_tokens: float | None = None,
                num_seqs: int | None = None, pg_loss: str = "clip", tau_pos: float = 1.0,
                tau_neg: float = 1.05, clip_ratio_c: float | None = None,
                token_weight: torch.Tensor | None = None,
                ) -> tuple[torch.Tensor, dict[str, float]]:
    """Policy-gradient loss (`pg_loss`: clip | cispo | sapo) + beta * KL over completion tokens
    -> (scalar loss, metrics).

    logp, old_logp, ref_logp, mask: [B, T]; advantages: [B]. `old_logp=None` means on-policy
    (old = logp detached, ratio 1). `ref_logp` may be None only when beta == 0. cispo and sapo
    take token ratios only; `clip_ratio_c` (dual clip, > 1) applies to pg_loss="clip" (token or
    sequence ratios). `token_weight` [B, T] (no gradient; e.g. TIS weights, simple_grpo/algo/tis.py)
    multiplies the policy-gradient term of each token, not the KL term.
    """
    B, T = logp.shape
    assert mask.shape == (B, T), f"mask {tuple(mask.shape)} != logp {(B, T)}"
    assert advantages.shape == (B,), f"advantages must be [B]={B}, got {tuple(advantages.shape)}"
    assert ratio_level in RATIO_LEVELS, f"ratio_level must be one of {RATIO_LEVELS}"
    assert eps_low >= 0 and eps_high >= 0, "clip ranges must be >= 0"
    assert beta == 0 or ref_logp is not None, "beta > 0 needs ref_logp"
    assert pg_loss in PG_LOSSES, f"pg_loss must be one of {PG_LOSSES}, got {pg_loss!r}"
    assert pg_loss == "clip" or ratio_level == "token", f"pg_loss={pg_loss!r} needs token ratios"
    assert clip_ratio_c is None or (pg_loss == "clip" and clip_ratio_c > 1), \
        "clip_ratio_c (dual clip) must be > 1 and needs pg_loss='clip'"
    assert tau_pos > 0 and tau_neg > 0, "tau_pos and tau_neg must be > 0"
    for name, t in (("old_logp", old_logp), ("ref_logp", ref_logp)):
        assert t is None or t.shape == (B, T), f"{name} {tuple(t.shape)} != logp {(B, T)}"
    mask_BT = mask.bool()
    zero = torch.zeros((), dtype=logp.dtype, device=logp.device)
    # Sanitise first so masked garbage (inf, NaN) can never reach a gradient.
    logp_BT = torch.where(mask_BT, logp, zero)
    old_BT = logp_BT.detach() if old_logp is None else torch.where(mask_BT, old_logp.to(logp.dtype), zero)
    log_ratio_BT = (logp_BT - old_BT).clamp(-_MAX_LOG, _MAX_LOG)
    if ratio_level == "sequence":  # GSPO-token: the value of s_i, each token's own gradient
        n_B = mask_BT.sum(1).clamp(min=1)
        seq_log_ratio_B = ((log_ratio_BT * mask_BT).sum(1) / n_B).detach()
        log_ratio_BT = logp_BT - logp_BT.detach() + seq_log_ratio_B[:, None]
    ratio_BT = torch.exp(log_ratio_BT)
    adv_B1 = advantages.to(logp.dtype)[:, None]
    pg_BT, token_stats = pg_terms(ratio_BT, logp_BT, adv_B1, pg_loss=pg_loss, eps_low=eps_low,
                                  eps_high=eps_high, tau_pos=tau_pos, tau_neg=tau_neg,
                                  clip_ratio_c=clip_ratio_c)
    if token_weight is not None:
        pg_BT = pg_BT * torch.where(mask_BT, token_weight.detach().to(logp.dtype), zero)
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
        metrics = {
            "kl": float((kl_BT * mask_BT).sum() / n),
            "clip_low_frac": 0.0, "clip_high_frac": 0.0,  # sapo has no hard clip
            **{k: float((v * mask_BT).sum() / n) for k, v in token_stats.items()},
            "ratio_mean": float((ratio_BT * mask_BT).sum() / n),
            "ratio_max": float(ratio_BT[mask_BT].max()) if mask_BT.any() else 0.0,
            "pg_loss": float(aggregate(pg_BT.detach(), mask_BT, agg, max_tokens=max_tokens,
                                       num_tokens=num_tokens, num_seqs=num_seqs)),
            "tokens": float(mask_BT.sum()),
        }
    return loss, metrics
