"""One optimisation step on a scored batch: micro-batches, `num_iterations` passes, the loss
normalised by the whole step's token / sequence counts (across micro-batches and ranks), and
DeepSpeed backward/step with gradient accumulation.

Micro-batches (simple_grpo/algo/packing.py): fixed slices of --micro_batch_size rows, or, with
--max_tokens_per_micro_batch, rows sorted by length and cut under a token budget, each trimmed to its
own widths. Budgeted ranks hold different numbers of micro-batches, so the accumulation boundary is
set by hand (see `_lockstep`).

Gradient bookkeeping: each micro-batch's loss already divides by the step-wide count, so the sum of
micro-batch gradients over all ranks *is* the full-batch gradient. DeepSpeed would divide by the
accumulation steps (we pass scale_wrt_gas=False) and average over data-parallel ranks (we multiply
by world_size to undo it), so a 2-rank step equals a 1-process step on the full batch.
"""
from __future__ import annotations

import time
from concurrent.futures import Future

import torch

from simple_grpo.algo import packing
from simple_grpo.algo.logprobs import completion_logprobs, packs
from simple_grpo.algo.losses import policy_loss
from simple_grpo.algo.masks import mask_from_lengths, truncated
from simple_grpo.algo.tis import TISSettings, ratio_max, tis_sums, tis_weights
from simple_grpo.train import collectives, offpolicy
from simple_grpo.common import dropout
from simple_grpo.wire.codec import RolloutBatch


# token means of the policy loss's metrics: per rank over its loss tokens (`loss_tokens`), reduced
# over ranks as sums and counts (train/loop.average), never as a mean of the ranks' means
TOKEN_MEANS = ("kl", "ratio_mean", "clip_low_frac", "clip_high_frac", "dual_clip_frac", "soft_gate_mean")


def loss_mask(batch: RolloutBatch, truncated_B: torch.Tensor, overlong_filter: bool) -> torch.Tensor:
    """[B, C] bool: completion tokens that enter the loss (DAPO's overlong filter drops the rows
    `truncated_B` marks: masks.truncated of the batch, computed once per step; rows whose
    `batch.loss_rows` is False, e.g. dynamic sampling's top-ups, are dropped too)."""
    mask_BC = mask_from_lengths(batch.completion_lens, batch.completion_ids.shape[1])
    if overlong_filter:
        mask_BC &= ~truncated_B[:, None]
    if batch.loss_rows is not None:
        mask_BC &= batch.loss_rows[:, None]
    return mask_BC


def global_counts(mask_BC: torch.Tensor, device: torch.device) -> tuple[float, int]:
    """(valid tokens, sequences) of this step summed over every rank. A sequence counts only with
    at least one token in the loss mask, so rows the overlong filter drops do not dilute the
    per-sequence mean (seq-mean-token-mean) or Dr.GRPO's B * max_tokens."""
    counts = collectives.all_reduce([float(mask_BC.sum()), float(mask_BC.any(1).sum())], device)
    return float(counts[0]), int(counts[1])


def _lockstep(n_mine: int, budgeted: bool, device) -> int:
    """How many backward passes each rank runs per pass over its batch; sets nothing when fixed.

    ZeRO-2 reduce-scatters gradients in every backward (not only at the boundary), so every rank
    must run the same number of backward passes, and the optimizer steps where DeepSpeed sees the
    accumulation boundary. Fixed micro-batches: every rank holds B / micro_batch_size of them, the
    config's gradient_accumulation_steps, and DeepSpeed's own micro-step counter finds the boundary.
    Budgeted: the counts differ by rank and by step, so the ranks agree on the largest count (one
    all_reduce max per step), a rank with fewer runs zero-loss filler passes (its shortest row, loss
    x 0: exact zero gradients, the same parameters hooked, the same collectives), and the caller
    marks the last backward of each pass as the boundary (engine.set_gradient_accumulation_boundary)
    instead of trusting the config's fixed count."""
    if not budgeted:
        return n_mine
    return int(collectives.all_reduce([float(n_mine)], device, op="max")[0])


def train_on_batch(engine, batch: RolloutBatch | None, *, micro_batch: int, num_iterations: int,
                   loss_kw: dict, eos_ids: list[int], overlong_filter: bool, temperature: float,
                   world_size: int, device, ref_pending: Future | None = None,
                   max_prefetch: int = 2, weight_version: int | None = None,
                   tis: TISSettings | None = None, offpolicy_clip_c: float = 3.0,
                   max_logits_bytes: int = 1 << 30, max_tokens: int = 0):
    """Run `num_iterations` optimizer steps over `batch` -> (metrics, the batch trained on).

    `ref_pending`: a future of the batch coming back from the reference server (ours with its
    reference log-probs, or another producer's). While the server computes, this process runs
    the forward passes of up to `max_prefetch` micro-batches (their graphs are kept for the
    backward), so the two processes work at the same time; if the batch that comes back is not
    ours, those forward passes are dropped and the returned batch is trained instead. `batch`
    None: train on whatever `ref_pending` returns (a trainer that does not generate).

    Which old policy and which importance weight the batch gets is decided once by
    offpolicy.correction (bypass with the dual clip `offpolicy_clip_c`, or decoupled TIS with
    `tis`). Metrics sums (divided in offpolicy.finish_ratios): mismatch_sum / mismatch_tokens (a
    fresh batch's mean |pi_old - pi_sampler|: sampling-vs-training numerics), tis_* (every batch
    TIS weighted), offpolicy_tokens / trained_tokens (tokens of late batches, corrected); ratio_max (the
    largest r = pi / pi_old) and tis_ratio_max (the largest pi_old / pi_sampler before the cap).
    TOKEN_MEANS are this rank's means over its `loss_tokens` (tokens in the loss, per pass).
    `max_tokens` > 0 (-1: auto): budgeted micro-batches (packing.plan); `micro_batches` (this rank's, per pass)
    and `pad_frac` (padded positions / all positions over the passes run here; filler passes count
    as padding) are reported either way.

    A step in which no rank has a token in the loss (every row a top-up, rejected by TIS's mask
    mode or dropped by the overlong filter) is empty: no backward, no optimizer or schedule step
    (`empty_step` 1; the trainer then keeps its weight version).
    """
    tis = tis or TISSettings()
    lp_kw = dict(temperature=temperature, max_logits_bytes=max_logits_bytes)  # completion_logprobs
    assert batch is not None or ref_pending is not None, "nothing to train on"
    t0 = time.perf_counter()
    prefetched: dict[int, torch.Tensor] = {}  # micro-batch index -> policy log-probs with graph
    ref_wait = 0.0
    if ref_pending is not None:
        if batch is not None and num_iterations == 1:
            early = packing.plan(batch, micro_batch=micro_batch, max_tokens=max_tokens)
            for i, mb in enumerate(early[:max_prefetch]):
                if i and ref_pending.done():
                    break
                prefetched[i] = completion_logprobs(engine, *mb.inputs(batch, device), **lp_kw)
        t = time.perf_counter()
        got = ref_pending.result()
        ref_wait = time.perf_counter() - t
        if batch is None or got.batch_id != batch.batch_id:
            prefetched.clear()
        batch = got
    B, C = batch.batch_size, batch.completion_ids.shape[1]
    mbs = packing.plan(batch, micro_batch=micro_batch, max_tokens=max_tokens)  # same plan as `early`
    real = positions = 0  # pad_frac's counts over this rank's passes
    packed = packs(engine)  # flash-attention: rows packed, only real tokens run (algo/logprobs.py)

    def ran(mb) -> int:  # positions one pass over `mb` runs
        return packing.real_positions(mb, batch) if packed else mb.positions
    assert batch.ref_logprobs is not None or loss_kw["beta"] == 0, "beta > 0 needs ref log-probs"
    module = getattr(engine, "module", engine)  # the model under the DeepSpeed engine
    plan = offpolicy.correction(batch, weight_version, tis=tis, num_iterations=num_iterations,
                                dropout=dropout.active(module), pg_loss=loss_kw.get("pg_loss", "clip"),
                                clip_ratio_c=loss_kw.get("clip_ratio_c"), offpolicy_clip_c=offpolicy_clip_c)
    step_kw = {**loss_kw, "clip_ratio_c": plan.clip_ratio_c}
    truncated_B = truncated(batch.completion_ids, batch.completion_lens, eos_ids)  # [B] no EOS in time
    valid_BC = loss_mask(batch, truncated_B, overlong_filter)
    trainer_BC = None  # [B, C] the trainer's pi_old: no grad, no dropout, before the first update
    if plan.recompute:
        with torch.no_grad(), dropout.eval_mode(module):
            trainer_BC = packing.scatter([(mb, completion_logprobs(engine, *mb.inputs(batch, device), **lp_kw))
                                          for mb in mbs], B, C)
        real += sum(packing.real_positions(mb, batch) for mb in mbs)
        positions += sum(ran(mb) for mb in mbs)
    old_BC = offpolicy.sampling_old(batch) if plan.old == "sampling" else trainer_BC  # None: pi detached
    gen_BC = batch.gen_logprobs  # the behaviour policy of the TIS weight (nucleus, EOS mask)
    numerics_BC = offpolicy.sampling_old(batch)  # logprob_mismatch: the same distribution as pi_old's
    sums: dict[str, float] = {"mismatch_sum": 0.0, "mismatch_tokens": 0.0, "offpolicy_tokens": 0.0,
                              "trained_tokens": 0.0}
    maxes: dict[str, float] = {"ratio_max": 0.0}
    if tis.level != "off":
        sums.update(tis_weight_sum=0.0, tis_clipped=0.0, tis_tokens=0.0, tis_seen=0.0, tis_masked=0.0)
        maxes["tis_ratio_max"] = 0.0
    mask_BC = valid_BC
    if plan.tis and tis.mode == "mask":  # rejected tokens / sequences leave the loss and its counts
        _, rejected_BC = tis_weights(trainer_BC, gen_BC, valid_BC, level=tis.level, mode="mask", cap=tis.cap)
        sums["tis_masked"] = sums["tis_seen"] = float(rejected_BC.sum())
        mask_BC = valid_BC & ~rejected_BC
    num_tokens, num_seqs = global_counts(mask_BC, device)
    empty = num_tokens == 0  # on every rank alike: nothing in the loss anywhere, no update at all
    if loss_kw["agg"] == "seq-mean-token-sum-norm":
        num_tokens = num_seqs * loss_kw["max_tokens"]  # Dr.GRPO's constant normaliser
    sums["trained_tokens"] = float(mask_BC.sum())
    corrected = plan.old == "sampling" or plan.tis  # a late batch without sampling log-probs is not
    sums["offpolicy_tokens"] = sums["trained_tokens"] if plan.late and corrected else 0.0
    budgeted = max_tokens != 0
    n_passes = _lockstep(len(mbs), budgeted, device)
    filler = packing.filler(batch) if n_passes > len(mbs) else None
    for it in range(0 if empty else num_iterations):
        for i in range(n_passes):
            if budgeted:  # the last backward of the pass, on every rank at once, is the boundary
                engine.set_gradient_accumulation_boundary(i == n_passes - 1)
            if i >= len(mbs):  # a filler: zero loss, the same backward and reduction as the others
                logp_bC = completion_logprobs(engine, *filler.inputs(batch, device), **lp_kw)
                engine.backward(logp_bC.sum() * 0.0, scale_wrt_gas=False)
                engine.step()
                positions += ran(filler)
                continue
            mb = mbs[i]
            real += packing.real_positions(mb, batch)
            positions += ran(mb)
            if i in prefetched:
                logp_bC = prefetched.pop(i)
            else:
                logp_bC = completion_logprobs(engine, *mb.inputs(batch, device), **lp_kw)
            pi_old_bC = logp_bC.detach() if trainer_BC is None else mb.take(trainer_BC, device)
            old = mb.take(old_BC, device)
            m_bC, weight_bC = mb.take(mask_BC, device), None
            if plan.fresh and it == 0:  # over every valid token, before any TIS rejection
                v_bC = mb.take(valid_BC, device)
                gen_bC = mb.take(numerics_BC, device)
                sums["mismatch_sum"] += float(((pi_old_bC - gen_bC).abs() * v_bC).sum())
                sums["mismatch_tokens"] += float(v_bC.sum())
            if plan.tis:  # the trainer's pi_old vs the sampler's
                gen_bC = mb.take(gen_BC, device)
                weight_bC, clipped_bC = tis_weights(pi_old_bC, gen_bC, m_bC, level=tis.level, mode=tis.mode,
                                                    cap=tis.cap)
                if it == 0:
                    for k, v in tis_sums(weight_bC, clipped_bC, m_bC).items():
                        sums[k] += v
                    maxes["tis_ratio_max"] = max(maxes["tis_ratio_max"], ratio_max(
                        pi_old_bC, gen_bC, mb.take(valid_BC, device), tis.level))
            ref = mb.take(batch.ref_logprobs, device)
            loss, m = policy_loss(logp_bC, old, ref, mb.take(batch.advantages, device),
                                  m_bC, num_tokens=num_tokens, num_seqs=num_seqs, token_weight=weight_bC,
                                  **step_kw)
            engine.backward(loss * world_size, scale_wrt_gas=False)
            engine.step()  # DeepSpeed steps the optimizer at the accumulation boundary only
            w = m.pop("tokens")
            for k, v in m.items():
                if k.endswith("_max"):
                    maxes[k] = max(maxes.get(k, 0.0), v)
                else:
                    sums[k] = sums.get(k, 0.0) + (v if k in ("loss", "pg_loss") else v * w)
            sums["loss"] = sums.get("loss", 0.0) + float(loss.detach())
            sums["tokens"] = sums.get("tokens", 0.0) + w
    loss_tokens = sums.pop("tokens", 0.0)
    tok = max(loss_tokens, 1.0)
    pairs = {k: sums.pop(k) for k in offpolicy.SUM_KEYS if k in sums}  # divided in offpolicy.finish_ratios
    out = {k: (v / num_iterations if k in ("loss", "pg_loss") else v / tok) for k, v in sums.items()}
    out.update(pairs, **maxes, loss_tokens=loss_tokens / num_iterations, empty_step=float(empty))
    if empty:
        out.update(loss=0.0, pg_loss=0.0)
    if step_kw.get("pg_loss", "clip") == "clip":
        out.setdefault("dual_clip_frac", 0.0)  # on every step: ranks and steps log the same keys
    out["micro_batches"] = float(len(mbs))  # this rank's, per pass (the mean over ranks is logged)
    out["pad_frac"] = 1.0 - real / positions if positions else 0.0
    out["truncated_frac"] = float(truncated_B.float().mean())  # of the batch trained (ours or not)
    out["train_seconds"] = time.perf_counter() - t0 - ref_wait
    out["ref_seconds"] = ref_wait
    out["grad_norm"] = 0.0 if empty else float(engine.get_global_grad_norm() or 0.0)
    out["lr"] = float(engine.get_lr()[0])
    return out, batch
