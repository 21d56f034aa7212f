"""The pieces of one training step and the run's outputs, used by grpo_ref_split.py's main()."""
from __future__ import annotations

import dataclasses
import json
import sys
import time
import uuid
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from simple_grpo.algo.tis import TISSettings
from simple_grpo.train import collectives, offpolicy, policy_step, sampler
from simple_grpo.common import lora
from simple_grpo.gen import rollout
from simple_grpo.gen.reward_registry import RewardSpec
from simple_grpo.train.rollout_source import RefConnection
from simple_grpo.wire.codec import RolloutBatch
from simple_grpo.wire.contract import BatchContract


@dataclass
class StepContext:
    """What a step needs, passed explicitly."""

    cfg: object
    d: object
    dist: object
    engine: object
    tokenizer: object
    stream: object
    render: Callable[[dict], str]
    eos_ids: list[int]
    specs: list[RewardSpec]
    loss_kw: dict
    ref: RefConnection | None
    settings: rollout.SampleSettings  # rollout.sample_settings(cfg)
    filter_metric: str  # rollout.dynamic_filter_metric(cfg, specs)
    contract: BatchContract | None = None  # batch_contract.expected_contract: on our batches
    overlap: object | None = None  # sampler.Overlap: the sampler's batches, while it runs
    prefetched: object | None = None  # the next step's batch, taken early (sampler.hold_next_batch)


def step(ctx: StepContext, weight_version: int):
    """Take a worker's batch that is ready in the queue, else generate + score our own (unless
    --generate_locally=false: then wait for workers) and, with a server, exchange it for the next
    ready batch (ours with reference log-probs, or a worker's); with --overlap, while the sampler
    runs, its batch from the queue (simple_grpo/train/sampler.py); then the policy update
    -> (metrics averaged over ranks, our rollout or None, the trained batch's provenance)."""
    c = ctx.cfg
    if ctx.ref is not None:  # rank 0: a generation worker that fell silent is one line
        ctx.ref.watch_workers()
    roll, batch, pending = None, None, None
    overlapped = ctx.overlap is not None and ctx.overlap.running  # decided before the step (all ranks)
    if overlapped or ctx.prefetched is not None:  # the sampler's batch, sampled while the last step
        got = ctx.prefetched if ctx.prefetched is not None else \
            ctx.ref.next_batch(weight_version, stop=ctx.overlap.stopped)  # trained (None: it died)
        if overlapped:  # every rank: its own part of the step
            got = sampler.own_part(got, ctx.dist)
        overlapped, ctx.prefetched = True, None  # prefetched: held by a checkpoint
        if got is not None:
            pending = Future()
            pending.set_result(got)
    if c.generate_locally and ctx.ref is not None and not overlapped:  # workers' batches first
        ready = ctx.ref.ready_batch(weight_version)
        if ready is not None:
            pending = Future()
            pending.set_result(ready)
    if c.generate_locally and pending is None:
        roll = rollout.make_rollout(ctx.engine.module, ctx.tokenizer, ctx.stream, ctx.d.prompts_per_rank,
                                    ctx.settings, ctx.specs, system_render=ctx.render, eos_ids=ctx.eos_ids,
                                    dynamic_sampling=c.dynamic_sampling,
                                    filter_metric=ctx.filter_metric,
                                    max_refill_rounds=c.max_refill_rounds,
                                    failure_value=c.reward_failure_value, scale=c.scale,
                                    weight_version=weight_version,  # sampling log-probs: the old
                                    record_logprobs=ctx.ref is not None or c.tis != "off")  # policy if late
        batch = roll.batch
        batch.batch_id = uuid.uuid4().hex  # to recognise our batch when it comes back from the queue
        batch.contract = ctx.contract  # what the queue's batches are checked against: ours too
        batch.meta.update(producer=f"trainer-{ctx.dist.rank}",
                          reward_breakdown=rollout.json_breakdown(roll.breakdown))
    if ctx.ref is not None and pending is None:  # the sampler died while we waited: ours skips the
        pending = ctx.ref.score_async(batch) if overlapped else \
            ctx.ref.exchange_async(batch, weight_version)  # queue, where a rank still waiting takes any
    ref_seconds = None
    if ctx.ref is None and c.beta > 0 and c.lora_r > 0:  # reference = our model, adapter disabled
        t = time.perf_counter()
        batch.ref_logprobs = lora.reference_logprobs(ctx.engine, batch, micro_batch=c.micro_batch_size,
                                                     temperature=c.temperature, device=ctx.dist.device,
                                                     max_logits_bytes=c.max_logits_mb << 20,
                                                     max_tokens=c.max_tokens_per_micro_batch)
        ref_seconds = time.perf_counter() - t
    m, trained = policy_step.train_on_batch(
        ctx.engine, batch, micro_batch=c.micro_batch_size, num_iterations=c.num_iterations,
        loss_kw=ctx.loss_kw, eos_ids=ctx.eos_ids, overlong_filter=c.overlong_filter,
        temperature=c.temperature, world_size=ctx.dist.world_size, device=ctx.dist.device,
        ref_pending=pending, weight_version=weight_version, tis=TISSettings.from_config(c),
        offpolicy_clip_c=c.offpolicy_clip_c, max_logits_bytes=c.max_logits_mb << 20,
        max_tokens=c.max_tokens_per_micro_batch)
    if ref_seconds is not None:
        m["ref_seconds"] = ref_seconds
    sampler.follow_streams(ctx.stream, trained, ctx.dist.rank)  # after the sampler's batches
    metrics = {**(roll.stats if roll is not None else {"gen_seconds": 0.0}), **m,
               "local_generation": float(roll is not None), "overlap_batch": float(overlapped and roll is None),
               **batch_stats(trained, weight_version, c.eval_reward)}
    if ctx.ref is not None:
        metrics.update({k: float(v) for k, v in ctx.ref.counts.items()})
    if roll is not None:
        new_tokens = float(roll.batch.completion_lens.sum())
        metrics["tokens_per_s"] = new_tokens / max(roll.stats["gen_seconds"], 1e-9)
    ours = roll is not None and trained.batch_id == roll.batch.batch_id
    if ctx.dist.device.type == "cuda":  # this rank's peak since the start (max over ranks below)
        metrics["gpu_mem_gb_max"] = torch.cuda.max_memory_allocated(ctx.dist.device) / 2**30
    metrics = average(metrics, ctx.dist)
    metrics = offpolicy.finish_ratios(metrics)  # logprob_mismatch, offpolicy_token_frac, tis_*
    info = {"batch_id": trained.batch_id, "producer": trained.meta.get("producer", "?"),
            "weight_version": trained.weight_version, "rank": ctx.dist.rank,
            **({"part": trained.meta["part"]} if "part" in trained.meta else {})}  # the sampler's
    return metrics, (roll if ours else None), gather(info, ctx.dist)


def advance(state: dict, metrics: dict, cfg, rank: int) -> bool:
    """After step `state["step"]`: the weight version moves on by num_iterations, unless the step was
    empty (nothing in the loss on any rank: no update, policy_step.train_on_batch), which is
    counted (`empty_steps`) and said in one line -> whether the weights changed."""
    empty = metrics.pop("empty_step", 0.0) > 0
    state["empty_steps"] = state.get("empty_steps", 0) + int(empty)
    metrics["empty_steps"] = float(state["empty_steps"])
    if not empty:
        state["weight_version"] += cfg.num_iterations
    elif rank == 0:
        why = ("every group was flat after --max_refill_rounds={} refill rounds".format(cfg.max_refill_rounds)
               if metrics.get("topped_up_frac", 0.0) >= 1.0 else
               "the overlong filter dropped every row" if cfg.overlong_filter and
               metrics.get("truncated_frac", 0.0) >= 1.0 else "--tis_mode=mask rejected every sequence"
               if cfg.tis_mode == "mask" and cfg.tis != "off" else "no row had a token in the loss")
        print(f"[trainer] step {state['step']}: nothing to learn from ({why}); no update, weight "
              f"version stays {state['weight_version']}", file=sys.stderr, flush=True)
    return not empty


def batch_stats(batch: RolloutBatch, weight_version: int, eval_reward: str) -> dict[str, float]:
    """What the logs say about the batch actually trained (ours or a worker's)."""
    lens = batch.completion_lens.float()
    out = {}
    for name, values in batch.meta.get("reward_breakdown", {}).items():
        out[f"reward/{name}"] = sum(values) / max(len(values), 1)
        if name == eval_reward:
            out["accuracy"] = sum(1.0 for v in values if v >= 1.0) / max(len(values), 1)
    return out | {"reward_mean": float(batch.rewards.mean()), "reward_std": float(batch.rewards.std()),
            "completion_len_mean": float(lens.mean()), "completion_len_max": float(lens.max()),
            "batch_staleness": float(weight_version - batch.weight_version),
            "topped_up_frac": 0.0 if batch.loss_rows is None else  # rows outside the loss
            float((~batch.loss_rows).float().mean()),
            "remote_batch": float(not offpolicy.is_trainer_batch(batch)),
            "gen_calls": float(batch.meta.get("gen_calls", 0))}


def average(metrics: dict[str, float], dist) -> dict[str, float]:
    """Every metric over ranks: maxima for *_max; sums for the loss (whose per-rank parts are
    already normalised by the whole step's counts) and counters; token means (policy_step.
    TOKEN_MEANS) as the ratio of their sums over ranks to the step's loss tokens, so a rank with
    few or no tokens weighs what it holds; the mean for the rest. Identity for one process."""
    if dist.world_size == 1:
        return metrics
    key_sets = collectives.all_gather_objects(sorted(metrics), dist.device)
    keys = sorted(set.intersection(*map(set, key_sets)))  # e.g. a worker's batch lacks a reward
    n = float(metrics.get("loss_tokens", 0.0))
    values = [float(metrics[k]) * (n if k in policy_step.TOKEN_MEANS else 1.0) for k in keys]
    t = collectives.all_reduce(values + [n], dist.device)
    mx = collectives.all_reduce(values, dist.device, op="max")
    tokens = float(t[-1])
    summed = ("loss", "pg_loss", "loss_tokens", "stale_dropped", "rejected_batches", "duplicates_dropped",
              "rollouts_resent", "queue_full_bypass")  # server_restarts: every rank sees the same ones (mean)

    def reduce(i: int, k: str) -> float:
        if k.endswith("_max"):
            return float(mx[i])
        if k in policy_step.TOKEN_MEANS:
            return float(t[i]) / tokens if tokens > 0 else 0.0
        return float(t[i]) if k in summed else float(t[i]) / dist.world_size
    return {k: reduce(i, k) for i, k in enumerate(keys)}


def gather(obj: dict, dist) -> list[dict]:
    """Every rank's JSON-able dict, on every rank (for checkpoints of per-rank state)."""
    return collectives.all_gather_objects(obj, dist.device)


def evaluate(ctx: StepContext, examples: list[dict]) -> float:
    """Held-out accuracy (greedy): every rank evaluates its share (examples[rank::world]), the
    correct answers are summed over ranks. No GPU idles and no rank waits alone on a collective."""
    share = examples[ctx.dist.rank::ctx.dist.world_size]
    mine = rollout.evaluate(ctx.engine.module, ctx.tokenizer, share, ctx.render, ctx.eos_ids,
                            ctx.cfg.max_new_tokens, ctx.cfg.eval_reward)
    correct, seen = collectives.all_reduce([mine, len(share)], ctx.dist.device).tolist()
    assert seen == len(examples), f"evaluated {seen} of {len(examples)} held-out examples"
    if ctx.dist.world_size > 1:
        print(f"[rank{ctx.dist.rank}] evaluated {len(share)} held-out prompts", flush=True)
    return correct / max(seen, 1)


RUN_FILES = ("metrics.jsonl", "batches.jsonl", "samples.jsonl", "plots.png", "checkpoints", "final",
             "sampler.log", "sampler-config.json", "sampler-state.json", "tensorboard")


def run_dir_of(cfg) -> Path:
    """--run_dir, or the default runs/<preset>-<task>-<seed>."""
    return Path(cfg.run_dir or f"runs/{cfg.preset}-{Path(cfg.task).stem}-{cfg.seed}")


def claim_run_dir(run_dir: Path, resume: str, overwrite: bool, rank: int) -> None:
    """One run per folder: a fresh run (--resume=false) into a folder that holds another run's
    files stops with one line, before anything loads; with --overwrite rank 0 removes them first.
    (--resume=true|auto continue the run that is there.)"""
    import shutil

    from simple_grpo.errors import UserError

    def holds(path: Path) -> bool:  # an empty folder (a mount point made for the run) holds nothing
        return path.is_file() or (path.is_dir() and any(path.iterdir()))

    found = [n for n in RUN_FILES if holds(run_dir / n)] if resume == "false" else []
    if found and not overwrite:
        raise UserError(f"--run_dir {run_dir} holds another run ({', '.join(found)}): continue it "
                        f"with --resume=true, choose another --run_dir, or replace it with --overwrite")
    if found and rank == 0:
        for name in found:
            path = run_dir / name
            shutil.rmtree(path) if path.is_dir() else path.unlink()
        print(f"[trainer] --overwrite: removed the previous run's {', '.join(found)} from {run_dir}",
              flush=True)


class Outputs:
    """metrics.jsonl, samples.jsonl, plots, the progress bar and the final export (rank 0 writes)."""

    def __init__(self, run_dir: Path, cfg, dist, resume_step: int = 0, restart: bool = False):
        """`resume_step`: the checkpoint's step, whose later log lines are dropped; `restart`
        (--resume=auto) with no checkpoint yet: the logs of a previous attempt are dropped."""
        from simple_grpo.train.metrics import MetricsLogger, SamplesWriter, truncate_jsonl

        self.run_dir, self.cfg, self.main = run_dir, cfg, dist.rank == 0
        if not self.main:
            return
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=2))
        print(f"[trainer] run dir {run_dir}; config:\n" + json.dumps(dataclasses.asdict(cfg)), flush=True)
        self.logger = MetricsLogger(run_dir, wandb=cfg.wandb, tensorboard=cfg.tensorboard,
                                    config=dataclasses.asdict(cfg))
        if resume_step or restart:
            first = resume_step + 1 if resume_step else 0
            self.logger.truncate_after(first)
            for name in ("batches.jsonl", "samples.jsonl"):
                truncate_jsonl(run_dir / name, first)
        self.samples = SamplesWriter(run_dir)

    def progress(self, start: int, total: int):
        from tqdm import tqdm

        return tqdm(total=total, initial=start, desc="grpo", unit="step", disable=not self.main,
                    dynamic_ncols=True)

    def log_eval(self, step: int, accuracy: float) -> None:
        if self.main:
            self.logger.log(step, {"eval_accuracy": accuracy})
            print(f"[trainer] step {step}: held-out accuracy {accuracy:.3f}", flush=True)

    def log_step(self, step: int, metrics: dict, roll, bar, trained: list[dict] = ()) -> None:
        """metrics.jsonl, the bar, batches.jsonl (which batch each rank trained: id, producer,
        weight version), samples and plots."""
        if not self.main:
            return
        self.logger.log(step, metrics)
        with open(self.run_dir / "batches.jsonl", "a") as f:
            for info in trained:
                f.write(json.dumps({"step": step, **info}) + "\n")
        bar.set_postfix(reward=f"{metrics['reward_mean']:.3f}", kl=f"{metrics.get('kl', 0):.4f}",
                        s=f"{metrics['step_seconds']:.1f}",
                        **({"acc": f"{metrics['eval_accuracy']:.2f}"} if "eval_accuracy" in metrics else {}),
                        refresh=False)
        bar.update(1)
        c = self.cfg
        if c.samples_every and step % c.samples_every == 0 and roll is not None:
            G = c.num_generations
            rows = [{"question": roll.examples[i // G]["question"], "answer": roll.examples[i // G]["answer"],
                     "completion": text, "reward": float(roll.batch.rewards[i]),
                     "advantage": float(roll.batch.advantages[i]),
                     "rewards": {k: v[i] for k, v in roll.breakdown.items()}}
                    for i, text in enumerate(roll.completions)]
            self.samples.write(step, rows)
        if c.plot_every and (step % c.plot_every == 0 or step == c.steps):
            self.plot()

    def plot(self) -> None:
        from simple_grpo.train.metrics import plot_metrics

        plot_metrics(self.run_dir / "metrics.jsonl", self.run_dir / "plots.png")

    def finish(self, model, tokenizer) -> None:
        if not self.main:
            return
        from simple_grpo.errors import UserError
        from simple_grpo.train.checkpoint import describe_write_failure, export_pretrained, is_write_failure, \
            latest_checkpoint

        final = self.run_dir / "final"
        try:
            export_pretrained(model, tokenizer, final, **lora.export_options(model))  # LoRA: merged
        except Exception as e:  # a full disk arrives as OSError, RuntimeError or SafetensorError
            if not is_write_failure(e):
                raise
            self.logger.close()
            ckpt = latest_checkpoint(self.run_dir / "checkpoints")
            raise UserError(f"could not write the final model to {final} "
                            f"({describe_write_failure(e, self.run_dir)}); " + (
                                f"the last good checkpoint is {ckpt}: free space, then run the same "
                                "command with --resume to export it" if ckpt is not None else
                                "and no checkpoint was saved")) from None
        self.plot()
        self.logger.close()
        print(f"[trainer] done: final model in {self.run_dir / 'final'}", flush=True)
