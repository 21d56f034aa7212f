"""Which old policy and which importance weight a batch is trained with: one rule, `correction`,
for every kind of batch (fresh or late, the trainer's or a worker's).

A batch is trained one or more optimizer steps after it was sampled (a worker's, or the trainer's
own that came back late from the queue), and its sampler's numerics differ from the trainer's (a
worker's dtype or device, a KV-cached decode step, the nucleus of top-p). Three policies meet:

    pi_sampler  the batch's recorded sampling log-probs (`gen_logprobs`): what drew the tokens
                (with top_p < 1 or min_new_tokens the renormalised nucleus / EOS-masked softmax;
                beside them `gen_logprobs_full`: the same tokens under the whole tempered softmax)
    pi_old      the proximal policy of the clipped ratio r = pi / pi_old
    pi          the policy being differentiated (the training forward)

  * --tis=token|sequence (decoupled, verl's "decoupled" mode): every batch that has sampling
    log-probs, fresh or late, gets pi_old = the trainer's own log-probs at the start of the update
    (no dropout) and the weight w = min(pi_old / pi_sampler, C) on its policy-gradient term (or
    the mask variant: tokens / sequences outside [1/C, C] leave the loss and its denominator).
    With one pass over the batch pi_old is the training forward's value (ratio 1): the whole
    off-policy correction is w, bounded by C.
  * --tis=off (bypass, verl's "bypass" mode): a late batch (and a worker's fresh batch) uses its
    sampling log-probs as pi_old, so r = pi / pi_sampler absorbs how far the weights moved. They
    are taken under the whole tempered softmax (`sampling_old`: gen_logprobs_full), the
    distribution the trainer's forward computes: with identical weights r starts at 1, whatever
    top_p and min_new_tokens (the nucleus log-probs exceed it by -log Z per token, so a tight
    clip such as GSPO's 1 - 3e-4 would drop every negative-advantage sequence of the batch). Its
    negative-advantage tokens' loss r * |A| has no bound of its own, so these batches get the dual
    clip --offpolicy_clip_c (default 3, as verl's clip_ratio_c): loss <= c * |A|. A fresh trainer
    batch is on-policy: pi_old = pi detached.
  * no trainer version given (unit tests, benchmarks): bypass when sampling log-probs are present.

pi_old is recomputed in a no-grad pass before the first update (`Correction.recompute`) when the
training forward cannot serve as it: several passes (num_iterations > 1), dropout in the training
forward (pi_old, TIS and logprob_mismatch must not see random masks), and TIS's mask mode (which
tokens leave the denominator must be known before the first micro-batch's loss).
"""
from __future__ import annotations

from dataclasses import dataclass

from simple_grpo.wire.codec import RolloutBatch

# (metric, numerator, denominator): policy_step returns the sums, averaged over ranks like every
# metric (a mean of sums over a mean of counts is the ratio of the totals), then divided here.
RATIOS = (("logprob_mismatch", "mismatch_sum", "mismatch_tokens"),
          ("offpolicy_token_frac", "offpolicy_tokens", "trained_tokens"),
          ("tis_weight_mean", "tis_weight_sum", "tis_tokens"),
          ("tis_clipped_frac", "tis_clipped", "tis_seen"),
          ("tis_masked_frac", "tis_masked", "tis_seen"))
SUM_KEYS = tuple(dict.fromkeys(k for _, num, den in RATIOS for k in (num, den)))


@dataclass(frozen=True)
class Correction:
    """How one batch is trained (module docstring)."""

    old: str  # "sampling": gen_logprobs are pi_old (bypass) | "trainer": the trainer's own log-probs
    recompute: bool  # the trainer's log-probs from a no-grad, no-dropout pass before the first update
    tis: bool  # weight the policy-gradient terms by the TIS weight pi_old / pi_sampler
    clip_ratio_c: float | None  # the dual clip of this batch's pg terms (pg_loss=clip only)
    late: bool  # sampled with older weights than the trainer's
    fresh: bool  # sampled with the current weights and has sampling log-probs: logprob_mismatch


def is_trainer_batch(batch: RolloutBatch) -> bool:
    return str(batch.meta.get("producer", "")).startswith("trainer")


def is_late(batch: RolloutBatch, weight_version: int | None) -> bool:
    """Generated with older weights than the trainer's current `weight_version`."""
    return weight_version is not None and batch.weight_version < weight_version


def correction(batch: RolloutBatch, weight_version: int | None, *, tis, num_iterations: int = 1,
               dropout: bool = False, pg_loss: str = "clip", clip_ratio_c: float | None = None,
               offpolicy_clip_c: float = 3.0) -> Correction:
    """The one rule (module docstring). `tis`: TISSettings; `dropout`: the training forward has
    active dropout; `clip_ratio_c`: the preset's dual clip (it wins); `offpolicy_clip_c`: the dual
    clip of bypass batches (0: none)."""
    has_gen = batch.gen_logprobs is not None
    late = is_late(batch, weight_version)
    fresh = has_gen and weight_version is not None and batch.weight_version == weight_version
    use_tis = has_gen and tis.level != "off"
    bypass = has_gen and not use_tis and (weight_version is None or late or not is_trainer_batch(batch))
    old = "sampling" if bypass else "trainer"
    recompute = (old == "trainer" and (num_iterations > 1 or (use_tis and tis.mode == "mask"))) \
        or (dropout and (old == "trainer" or fresh))  # fresh: the mismatch of pi_old, not of a mask
    dual = clip_ratio_c if clip_ratio_c is not None else \
        (offpolicy_clip_c if bypass and offpolicy_clip_c else None)
    return Correction(old=old, recompute=recompute, tis=use_tis,
                      clip_ratio_c=dual if pg_loss == "clip" else None, late=late, fresh=fresh)


def sampling_old(batch: RolloutBatch):
    """[B, C] the sampler's log-probs that serve as pi_old in bypass (and for logprob_mismatch):
    the whole tempered softmax's when recorded, else the sampling distribution's; None without."""
    return batch.gen_logprobs_full if batch.gen_logprobs_full is not None else batch.gen_logprobs


def finish_ratios(metrics: dict[str, float]) -> dict[str, float]:
    """Replace the SUM_KEYS sums by their RATIOS (each only when its denominator is > 0)."""
    sums = {k: metrics.pop(k) for k in SUM_KEYS if k in metrics}
    for name, num, den in RATIOS:
        if sums.get(den, 0.0) > 0 and num in sums:
            metrics[name] = sums[num] / sums[den]
    return metrics
