"""The run's inputs checked before anything slow starts (the reference server, the model, a
dataset download): what needs no model and no network. Each failure is one UserError line."""
from __future__ import annotations

import difflib
import importlib.util
from pathlib import Path

from simple_grpo.errors import UserError

BUILTIN_TASKS = ("arithmetic", "arithmetic2")


def check_task(task: str, option: str = "--task") -> None:
    """A local file that is missing, or a name one letter away from a built-in task, is an error
    here (else it would go to the dataset hub and be retried there); hub names pass."""
    from simple_grpo.gen.data import FILE_SUFFIXES, _split_path

    if task in BUILTIN_TASKS or task.startswith("rg:"):
        return
    if task.endswith(FILE_SUFFIXES):
        path = _split_path(task, "train")
        if not path.is_file():
            raise UserError(f"{option}={task}: no such file ({path})")
        return
    close = difflib.get_close_matches(task, BUILTIN_TASKS, n=1, cutoff=0.8)
    if close and "/" not in task and not Path(task).exists():
        raise UserError(f"{option}={task}: no such task (did you mean {close[0]}?); a dataset on the "
                        f"hub is named org/name")


def check_inputs(cfg, run_dir: Path) -> None:
    """Every input check that needs no model: the rewards (names, a rewards file, --eval_reward),
    the task files and names, --resume with something to resume, optional packages."""
    from simple_grpo.gen.reward_registry import get_reward, reward_specs, validate_specs
    from simple_grpo.train.checkpoint import require_checkpoint

    validate_specs(reward_specs(cfg))  # a rewards file is loaded here: its DEFAULT_REWARDS checked
    if cfg.eval_every > 0:
        try:
            get_reward(cfg.eval_reward)
        except UserError as e:
            raise UserError(f"--eval_reward={cfg.eval_reward}: {e}") from None
    check_task(cfg.task)
    if cfg.eval_task:
        check_task(cfg.eval_task, "--eval_task")
    if cfg.resume == "true":
        require_checkpoint(run_dir / "checkpoints")
    for flag, package in (("wandb", "wandb"), ("tensorboard", "tensorboard")):
        if getattr(cfg, flag) and importlib.util.find_spec(package) is None:
            raise UserError(f"--{flag} needs the {package} package: pip install {package} (or drop --{flag})")
