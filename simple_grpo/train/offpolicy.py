"""Which log-probs are a batch's old policy in the clipped ratio, and the step's ratio metrics.

With generation workers and a FIFO queue, a batch can be trained one or more optimizer steps
after it was generated (a worker's, or the trainer's own that came back late). Every batch is
trained against the policy that sampled it:

  * late (batch.weight_version < the trainer's version): its recorded sampling log-probs
    (`gen_logprobs`) are the old policy, so the ratio measures how far the weights moved;
  * fresh (generated with the current weights): the trainer's own log-probs (detached: ratio 1;
    with num_iterations > 1 recorded before the first update), except a worker's fresh batch with
    --tis=off, whose sampling log-probs stay the old policy (the clipped ratio then also absorbs
    the sampler/trainer numerics). With --tis on, fresh batches get TIS weights instead
    (simple_grpo/algo/tis.py);
  * no trainer version given (unit tests, benchmarks): the sampling log-probs when present.
A late batch without sampling log-probs can only be trained as on-policy (every producer here
records them); `offpolicy_token_frac` counts the tokens of late batches trained against their
sampling log-probs, so such a batch shows as 0 there while its `batch_staleness` is > 0.
"""
from __future__ import annotations

from simple_grpo.wire.codec import RolloutBatch

# (metric, numerator, denominator): policy_step returns the sums, averaged over ranks like every
# metric (a mean of sums over a mean of counts is the ratio of the totals), then divided here.
RATIOS = (("logprob_mismatch", "mismatch_sum", "mismatch_tokens"),
          ("offpolicy_token_frac", "offpolicy_tokens", "trained_tokens"),
          ("tis_weight_mean", "tis_weight_sum", "tis_tokens"),
          ("tis_clipped_frac", "tis_clipped", "tis_tokens"))
SUM_KEYS = tuple(dict.fromkeys(k for _, num, den in RATIOS for k in (num, den)))


def is_trainer_batch(batch: RolloutBatch) -> bool:
    return str(batch.meta.get("producer", "")).startswith("trainer")


def is_late(batch: RolloutBatch, weight_version: int | None) -> bool:
    """Generated with older weights than the trainer's current `weight_version`."""
    return weight_version is not None and batch.weight_version < weight_version


def sampling_is_old(batch: RolloutBatch, weight_version: int | None, tis_level: str = "off") -> bool:
    """True: the batch's gen_logprobs are the old policy; False: the trainer's own (module doc)."""
    if batch.gen_logprobs is None:
        return False
    if weight_version is None or is_late(batch, weight_version):
        return True
    return tis_level == "off" and not is_trainer_batch(batch)


def finish_ratios(metrics: dict[str, float]) -> dict[str, float]:
    """Replace the SUM_KEYS sums by their RATIOS (each only when its denominator is > 0)."""
    sums = {k: metrics.pop(k) for k in SUM_KEYS if k in metrics}
    for name, num, den in RATIOS:
        if sums.get(den, 0.0) > 0 and num in sums:
            metrics[name] = sums[num] / sums[den]
    return metrics
