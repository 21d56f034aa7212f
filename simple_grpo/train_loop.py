"""The pieces of one training step and the run's outputs, used by grpo_ref_split.py's main()."""
from __future__ import annotations

import dataclasses
import json
import time
import uuid
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from simple_grpo import policy_step, rollout
from simple_grpo.errors import UserError
from simple_grpo.reward_registry import RewardSpec, parse_reward_specs


def reward_specs(cfg) -> list[RewardSpec]:
    """The configured reward functions, plus DAPO's soft overlong punishment when enabled."""
    if cfg.rewards is None:
        from simple_grpo.reward_registry import load_rewards

        specs = list(load_rewards().DEFAULT_REWARDS)
    else:
        specs = parse_reward_specs(cfg.rewards)
    if cfg.overlong_reward and not any(s.name == "overlong" for s in specs):
        specs.append(RewardSpec("overlong", 1.0))
    return specs


class RefConnection:
    """The reference server as the trainer sees it: upload a scored batch, get the next ready one."""

    def __init__(self, url: str, token: str | None, timeout: float, process=None):
        from simple_grpo.client import RefClient

        self.url, self.timeout, self.process = url, timeout, process
        self.client = RefClient(url, token=token)
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ref-exchange")
        self.client.wait_ready(timeout)

    def exchange(self, batch):
        """Upload our batch, then take the next ready batch from the queue (ours or a worker's)."""
        self.client.upload(batch)
        deadline = time.monotonic() + self.timeout
        while True:
            got = self.client.get(wait_s=1.0)  # the server holds the request until a batch is ready
            if got is not None:
                return got
            if self.process is not None and not self.process.alive():
                raise UserError(f"the reference server at {self.url} exited")
            if time.monotonic() > deadline:
                raise UserError(f"no batch from the reference server at {self.url} within "
                                f"{self.timeout:.0f} s (raise --ref_timeout?)")

    def exchange_async(self, batch) -> Future:
        """`exchange` in a background thread (HTTP waits release the GIL)."""
        return self._pool.submit(self.exchange, batch)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        if self.process is not None:
            self.process.stop()


def connect_ref(cfg, dist) -> RefConnection | None:
    """None when beta == 0 and no server was named; else a connection (starting a server if needed)."""
    if cfg.beta == 0 and not cfg.ref_url:
        return None
    if cfg.ref_url:
        return RefConnection(cfg.ref_url, cfg.ref_token, cfg.ref_timeout)
    from simple_grpo.models import resolve_model_path
    from simple_grpo.ref_process import RefProcess

    port = torch.zeros(1, dtype=torch.long)
    process = None
    if dist.rank == 0:
        threads = [] if dist.device.type == "cuda" else ["--torch_threads=1"]  # one core each
        process = RefProcess(resolve_model_path(cfg.model), dtype=cfg.dtype, extra=threads)
        port[0] = process.port
        print(f"[trainer] started a reference server at {process.url}", flush=True)
    if dist.world_size > 1:
        torch.distributed.broadcast(port, src=0)
    return RefConnection(f"http://127.0.0.1:{int(port)}", None, cfg.ref_timeout, process)


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

    @property
    def settings(self) -> rollout.SampleSettings:
        c = self.cfg
        return rollout.SampleSettings(num_generations=c.num_generations, max_new_tokens=c.max_new_tokens,
                                      min_new_tokens=c.min_new_tokens, temperature=c.temperature,
                                      top_p=c.top_p, overlong_cache=c.overlong_cache)


def step(ctx: StepContext, weight_version: int):
    """Generate + score, reference log-probs, policy update -> (metrics averaged over ranks, rollout)."""
    c = ctx.cfg
    roll = rollout.make_rollout(ctx.engine.module, ctx.tokenizer, ctx.stream, ctx.d.prompts_per_rank,
                                ctx.settings, ctx.specs, system_render=ctx.render, eos_ids=ctx.eos_ids,
                                dynamic_sampling=c.dynamic_sampling, max_refill_rounds=c.max_refill_rounds,
                                failure_value=c.reward_failure_value, scale=c.scale,
                                weight_version=weight_version)
    batch = roll.batch
    batch.batch_id = uuid.uuid4().hex  # to recognise our batch when it comes back from the queue
    pending = ctx.ref.exchange_async(batch) if ctx.ref is not None else None
    m = policy_step.train_on_batch(ctx.engine, batch, micro_batch=c.micro_batch_size,
                                   num_iterations=c.num_iterations, loss_kw=ctx.loss_kw,
                                   eos_ids=ctx.eos_ids, overlong_filter=c.overlong_filter,
                                   temperature=c.temperature, world_size=ctx.dist.world_size,
                                   device=ctx.dist.device, ref_pending=pending)
    metrics = {**roll.stats, **m}
    if c.eval_reward in roll.breakdown:
        values = roll.breakdown[c.eval_reward]
        metrics["accuracy"] = sum(1.0 for v in values if v >= 1.0) / len(values)
    new_tokens = float(roll.batch.completion_lens.sum())
    metrics["tokens_per_s"] = new_tokens / max(roll.stats["gen_seconds"], 1e-9)
    return average(metrics, ctx.dist), roll


def average(metrics: dict[str, float], dist) -> dict[str, float]:
    """Mean of every metric over ranks (maxima for *_max; sums for the loss, whose per-rank parts
    are already normalised by the whole step's counts); identity for one process."""
    if dist.world_size == 1:
        return metrics
    keys = sorted(metrics)
    t = torch.tensor([float(metrics[k]) for k in keys], dtype=torch.float64)
    mx = t.clone()
    torch.distributed.all_reduce(t)
    torch.distributed.all_reduce(mx, op=torch.distributed.ReduceOp.MAX)
    summed = ("loss", "pg_loss")
    return {k: float(mx[i] if k.endswith("_max") else t[i] if k in summed else t[i] / dist.world_size)
            for i, k in enumerate(keys)}


def gather(obj: dict, dist) -> list[dict]:
    """Every rank's JSON-able dict, on every rank (for checkpoints of per-rank state)."""
    if dist.world_size == 1:
        return [obj]
    out: list = [None] * dist.world_size
    torch.distributed.all_gather_object(out, json.loads(json.dumps(obj)))
    return out


def evaluate(ctx: StepContext, examples: list[dict]) -> float:
    """Held-out accuracy on rank 0 (greedy), shared with the other ranks."""
    acc = torch.zeros(1, dtype=torch.float64)
    if ctx.dist.rank == 0:
        acc[0] = rollout.evaluate(ctx.engine.module, ctx.tokenizer, examples, ctx.render, ctx.eos_ids,
                                  ctx.cfg.max_new_tokens, ctx.cfg.eval_reward)
    if ctx.dist.world_size > 1:
        torch.distributed.broadcast(acc, src=0)
    return float(acc[0])


class Outputs:
    """metrics.jsonl, samples.jsonl, plots, the progress bar and the final export (rank 0 writes)."""

    def __init__(self, run_dir: Path, cfg, dist, resume_step: int = 0):
        from simple_grpo.metrics import MetricsLogger, SamplesWriter

        self.run_dir, self.cfg, self.main = run_dir, cfg, dist.rank == 0
        if not self.main:
            return
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=2))
        print(f"[trainer] run dir {run_dir}; config:\n" + json.dumps(dataclasses.asdict(cfg)), flush=True)
        self.logger = MetricsLogger(run_dir, wandb=cfg.wandb, tensorboard=cfg.tensorboard,
                                    config=dataclasses.asdict(cfg))
        if resume_step:
            self.logger.truncate_after(resume_step + 1)
        self.samples = SamplesWriter(run_dir)

    def progress(self, start: int, total: int):
        from tqdm import tqdm

        return tqdm(total=total, initial=start, desc="grpo", unit="step", disable=not self.main,
                    dynamic_ncols=True)

    def log_eval(self, step: int, accuracy: float) -> None:
        if self.main:
            self.logger.log(step, {"eval_accuracy": accuracy})
            print(f"[trainer] step {step}: held-out accuracy {accuracy:.3f}", flush=True)

    def log_step(self, step: int, metrics: dict, roll, bar) -> None:
        if not self.main:
            return
        self.logger.log(step, metrics)
        bar.set_postfix(reward=f"{metrics['reward_mean']:.3f}", kl=f"{metrics.get('kl', 0):.4f}",
                        s=f"{metrics['step_seconds']:.1f}",
                        **({"acc": f"{metrics['eval_accuracy']:.2f}"} if "eval_accuracy" in metrics else {}),
                        refresh=False)
        bar.update(1)
        c = self.cfg
        if c.samples_every and step % c.samples_every == 0:
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
        from simple_grpo.metrics import plot_metrics

        plot_metrics(self.run_dir / "metrics.jsonl", self.run_dir / "plots.png")

    def finish(self, model, tokenizer) -> None:
        if not self.main:
            return
        from simple_grpo.checkpoint import export_pretrained

        export_pretrained(model, tokenizer, self.run_dir / "final")
        self.plot()
        self.logger.close()
        print(f"[trainer] done: final model in {self.run_dir / 'final'}", flush=True)
