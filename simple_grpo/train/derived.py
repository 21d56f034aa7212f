"""Values computed once from a resolved TrainConfig (simple_grpo/train/config.py): the batch
sizes per rank, the loss's keyword arguments, the sampling settings and dynamic sampling's filter
metric, each with a clear error when it does not fit."""
from __future__ import annotations

from dataclasses import dataclass

from simple_grpo.errors import UserError


@dataclass(frozen=True)
class Derived:
    """Values computed once from the config and the world size."""

    world_size: int
    prompts_per_rank: int
    seqs_per_rank: int
    grad_accum: int


def derive(cfg, world_size: int) -> Derived:
    if cfg.prompts_per_step % world_size:
        raise UserError(f"--prompts_per_step={cfg.prompts_per_step} does not divide over "
                        f"{world_size} ranks; use a multiple of {world_size}")
    prompts_per_rank = cfg.prompts_per_step // world_size
    seqs = prompts_per_rank * cfg.num_generations
    if seqs % cfg.micro_batch_size:
        raise UserError(f"{seqs} sequences per rank (prompts_per_step/world_size * num_generations) "
                        f"do not split into micro-batches of --micro_batch_size={cfg.micro_batch_size}")
    return Derived(world_size, prompts_per_rank, seqs, seqs // cfg.micro_batch_size)


def loss_kwargs(cfg) -> dict:
    """The policy_loss keyword arguments this config selects."""
    return dict(eps_low=cfg.eps_low, eps_high=cfg.eps_high, beta=cfg.beta, kl=cfg.kl, agg=cfg.agg,
                max_tokens=cfg.max_new_tokens, ratio_level=cfg.ratio_level, pg_loss=cfg.pg_loss,
                tau_pos=cfg.tau_pos, tau_neg=cfg.tau_neg, clip_ratio_c=cfg.clip_ratio_c)


def dynamic_filter_metric(cfg, specs) -> str:
    """The metric dynamic sampling filters groups on (rollout.make_rollout's filter_metric): a
    reward name from `specs` or 'reward'; 'auto' picks --eval_reward when it is in `specs`."""
    names = [s.name for s in specs]
    if cfg.filter_metric == "auto":
        return cfg.eval_reward if cfg.eval_reward in names else "reward"
    if cfg.filter_metric != "reward" and cfg.filter_metric not in names:
        raise UserError(f"--filter_metric={cfg.filter_metric} is not among the rewards "
                        f"({', '.join(names)}); use one of them, 'reward' or 'auto'")
    return cfg.filter_metric


def sample_settings(cfg):
    """How completions are sampled (rollout.SampleSettings), for the trainer and workers."""
    from simple_grpo.train.rollout import SampleSettings

    return SampleSettings(num_generations=cfg.num_generations, max_new_tokens=cfg.max_new_tokens,
                          min_new_tokens=cfg.min_new_tokens, temperature=cfg.temperature,
                          top_p=cfg.top_p, overlong_cache=cfg.overlong_cache, sampler=cfg.sampler)
