"""Values computed once from a resolved TrainConfig (simple_grpo/common/config.py): the batch
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
    grad_accum: int  # DeepSpeed's gradient_accumulation_steps: the fixed micro-batches' count; with
    # --max_tokens_per_micro_batch only a nominal value (policy_step sets each step's boundary itself)


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


def overlap_ahead(cfg) -> int:
    """How many steps ahead of the weights the trainer's overlap sampler samples (--max_ahead)."""
    return 1 if cfg.max_ahead < 0 else cfg.max_ahead


def resolved_tis(cfg, overlap: bool) -> str:
    """--tis with auto resolved: token when generation overlaps training (its batches one step
    stale), else off (also with --max_ahead=0: the sampler's batches are on-policy)."""
    late = overlap and overlap_ahead(cfg) > 0
    return ("token" if late else "off") if cfg.tis == "auto" else cfg.tis
