"""One optimisation step on a scored batch: micro-batches, `num_iterations` passes, the loss
normalised by the whole step's token / sequence counts (across micro-batches and ranks), and
DeepSpeed backward/step with gradient accumulation.

Gradient bookkeeping: each micro-batch's loss already divides by the step-wide count, so the sum of
micro-batch gradients over all ranks *is* the full-batch gradient. DeepSpeed would divide by the
accumulation steps (we pass scale_wrt_gas=False) and average over data-parallel ranks (we multiply
by world_size to undo it), so a 2-rank step equals a 1-process step on the full batch.
"""
from __future__ import annotations

import time
from concurrent.futures import Future

import torch

from simple_grpo.algo.logprobs import completion_logprobs
from simple_grpo.algo.losses import policy_loss
from simple_grpo.algo.masks import mask_from_lengths, truncated
from simple_grpo.algo.tis import TISSettings, tis_sums, tis_weights
from simple_grpo.train import collectives, offpolicy
from simple_grpo.wire.codec import RolloutBatch


def loss_mask(batch: RolloutBatch, truncated_B: torch.Tensor, overlong_filter: bool) -> torch.Tensor:
    """[B, C] bool: completion tokens that enter the loss (DAPO's overlong filter drops the rows
    `truncated_B` marks: masks.truncated of the batch, computed once per step)."""
    mask_BC = mask_from_lengths(batch.completion_lens, batch.completion_ids.shape[1])
    if overlong_filter:
        mask_BC &= ~truncated_B[:, None]
    return mask_BC


def global_counts(mask_BC: torch.Tensor, device: torch.device) -> tuple[float, int]:
    """(valid tokens, sequences) of this step summed over every rank. A sequence counts only with
    at least one token in the loss mask, so rows the overlong filter drops do not dilute the
    per-sequence mean (seq-mean-token-mean) or Dr.GRPO's B * max_tokens."""
    counts = collectives.all_reduce([float(mask_BC.sum()), float(mask_BC.any(1).sum())], device)
    return float(counts[0]), int(counts[1])


def _micro(batch: RolloutBatch, sl: slice, device):
    return (batch.prompt_ids[sl].to(device), batch.prompt_lens[sl].to(device),
            batch.completion_ids[sl].to(device), batch.completion_lens[sl].to(device))


def train_on_batch(engine, batch: RolloutBatch | None, *, micro_batch: int, num_iterations: int,
                   loss_kw: dict, eos_ids: list[int], overlong_filter: bool, temperature: float,
                   world_size: int, device, ref_pending: Future | None = None,
                   max_prefetch: int = 2, weight_version: int | None = None,
                   tis: TISSettings | None = None, max_logits_bytes: int = 1 << 30):
    """Run `num_iterations` optimizer steps over `batch` -> (metrics, the batch trained on).

    `ref_pending`: a future of the batch coming back from the reference server (ours with its
    reference log-probs, or another producer's). While the server computes, this process runs
    the forward passes of up to `max_prefetch` micro-batches (their graphs are kept for the
    backward), so the two processes work at the same time; if the batch that comes back is not
    ours, those forward passes are dropped and the returned batch is trained instead. `batch`
    None: train on whatever `ref_pending` returns (a trainer that does not generate).

    The old policy is the one that sampled the batch (simple_grpo/train/offpolicy.py): a batch generated
    with older weights than `weight_version` uses its `gen_logprobs` (sampling log-probs); a fresh
    one the trainer's own (a worker's fresh batch with tis off: its gen_logprobs). For a fresh batch
    with gen_logprobs the mean |gen_logprobs - trainer log-probs| over its tokens is returned as
    mismatch_sum / mismatch_tokens (sampling-vs-training numerics: bf16 weights, another kernel or
    device), and `tis` (level != off) weights its policy-gradient terms (simple_grpo/algo/tis.py; sums
    tis_weight_sum / tis_clipped / tis_tokens). offpolicy_tokens / trained_tokens: this rank's
    tokens of a late batch trained against its sampling log-probs / all its loss tokens.
    """
    tis = tis or TISSettings()
    lp_kw = dict(temperature=temperature, max_logits_bytes=max_logits_bytes)  # completion_logprobs
    assert batch is not None or ref_pending is not None, "nothing to train on"
    t0 = time.perf_counter()
    prefetched: dict[int, torch.Tensor] = {}  # micro-batch start -> policy log-probs with graph
    ref_wait = 0.0
    if ref_pending is not None:
        if batch is not None and num_iterations == 1 and \
                not offpolicy.sampling_is_old(batch, weight_version, tis.level):
            for s in range(0, min(batch.batch_size, max_prefetch * micro_batch), micro_batch):
                if s and ref_pending.done():
                    break
                prefetched[s] = completion_logprobs(engine, *_micro(batch, slice(s, s + micro_batch),
                                                                    device), **lp_kw)
        t = time.perf_counter()
        got = ref_pending.result()
        ref_wait = time.perf_counter() - t
        if batch is None or got.batch_id != batch.batch_id:
            prefetched.clear()
        batch = got
    B = batch.batch_size
    assert B % micro_batch == 0, f"batch of {B} does not split into micro-batches of {micro_batch}"
    assert batch.ref_logprobs is not None or loss_kw["beta"] == 0, "beta > 0 needs ref log-probs"
    truncated_B = truncated(batch.completion_ids, batch.completion_lens, eos_ids)  # [B] no EOS in time
    mask_BC = loss_mask(batch, truncated_B, overlong_filter)
    num_tokens, num_seqs = global_counts(mask_BC, device)
    if loss_kw["agg"] == "seq-mean-token-sum-norm":
        num_tokens = num_seqs * loss_kw["max_tokens"]  # Dr.GRPO's constant normaliser
    slices = [slice(s, s + micro_batch) for s in range(0, B, micro_batch)]

    # the old policy: the sampling log-probs (late batches, ...) or the trainer's own (offpolicy.py)
    old_BC = batch.gen_logprobs if offpolicy.sampling_is_old(batch, weight_version, tis.level) else None
    if old_BC is None and num_iterations > 1:  # record the old policy before the first update
        with torch.no_grad():
            old_BC = torch.cat([completion_logprobs(engine, *_micro(batch, sl, device),
                                                    **lp_kw).cpu() for sl in slices])
    fresh = batch.gen_logprobs is not None and weight_version is not None \
        and batch.weight_version == weight_version
    use_tis = fresh and tis.level != "off"
    late = offpolicy.is_late(batch, weight_version) and batch.gen_logprobs is not None  # old = sampling
    sums: dict[str, float] = {"mismatch_sum": 0.0, "mismatch_tokens": 0.0,
                              "offpolicy_tokens": float(mask_BC.sum()) if late else 0.0,
                              "trained_tokens": float(mask_BC.sum()),
                              **({"tis_weight_sum": 0.0, "tis_clipped": 0.0, "tis_tokens": 0.0}
                                 if tis.level != "off" else {})}
    for it in range(num_iterations):
        for sl in slices:
            if sl.start in prefetched:
                logp_bC = prefetched.pop(sl.start)
            else:
                logp_bC = completion_logprobs(engine, *_micro(batch, sl, device), **lp_kw)
            old = None if old_BC is None else old_BC[sl].to(device)
            m_bC, weight_bC = mask_BC[sl].to(device), None
            if fresh and it == 0:
                gen_bC = batch.gen_logprobs[sl].to(device)
                sums["mismatch_sum"] += float(((logp_bC.detach() - gen_bC).abs() * m_bC).sum())
                sums["mismatch_tokens"] += float(m_bC.sum())
            if use_tis:  # trainer's old log-probs (current weights, detached) vs the sampler's
                weight_bC, clipped_bC = tis_weights(logp_bC.detach() if old is None else old,
                                                    batch.gen_logprobs[sl].to(device), m_bC,
                                                    level=tis.level, mode=tis.mode, cap=tis.cap)
                if it == 0:
                    for k, v in tis_sums(weight_bC, clipped_bC, m_bC).items():
                        sums[k] += v
            ref = None if batch.ref_logprobs is None else batch.ref_logprobs[sl].to(device)
            loss, m = policy_loss(logp_bC, old, ref, batch.advantages[sl].to(device),
                                  m_bC, num_tokens=num_tokens, num_seqs=num_seqs,
                                  **loss_kw, **({"token_weight": weight_bC} if use_tis else {}))
            engine.backward(loss * world_size, scale_wrt_gas=False)
            engine.step()  # DeepSpeed steps the optimizer at the accumulation boundary only
            w = m["tokens"]
            for k, v in m.items():
                if k != "tokens" and not k.startswith("mismatch_"):
                    sums[k] = sums.get(k, 0.0) + (v if k in ("loss", "pg_loss") else v * w)
            sums["loss"] = sums.get("loss", 0.0) + float(loss.detach())
            sums["tokens"] = sums.get("tokens", 0.0) + w
    tok = max(sums.pop("tokens", 0.0), 1.0)
    pairs = {k: sums.pop(k) for k in offpolicy.SUM_KEYS if k in sums}  # divided in offpolicy.finish_ratios
    out = {k: (v / num_iterations if k in ("loss", "pg_loss") else v / tok) for k, v in sums.items()}
    out.update(pairs)
    out["truncated_frac"] = float(truncated_B.float().mean())  # of the batch trained (ours or not)
    out["train_seconds"] = time.perf_counter() - t0 - ref_wait
    out["ref_seconds"] = ref_wait
    out["grad_norm"] = float(engine.get_global_grad_norm() or 0.0)
    out["lr"] = float(engine.get_lr()[0])
    return out, batch
