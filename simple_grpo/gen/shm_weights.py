"""The reader side of the overlap sampler's shared-memory weights folder (the writer is
simple_grpo/train/sampler.py): which trainer step's weights the sampler's n-th batch must be
sampled with, and which file holds them. `latest.json` names the newest step's file and the
recent steps' ({"version", "step", "file", "first", "steps": {step: [version, file]}})."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

LATEST = "latest.json"


@dataclasses.dataclass(frozen=True)
class Published:
    """What latest.json says: the newest step's weights, and the recent steps' (module docstring)."""
    version: int
    step: int
    path: Path
    first: int  # the first step published (the trainer's at start)
    steps: dict[int, tuple[int, Path]]  # recent step -> (version, file), the newest included


def read_latest(folder: str | Path) -> Published | None:
    """The reader side: the newest complete weights and the recent steps', or None yet."""
    folder = Path(folder)
    try:
        info = json.loads((folder / LATEST).read_text())
    except (OSError, ValueError):
        return None
    step, version = int(info["step"]), int(info["version"])
    steps = {int(s): (int(v), folder / name) for s, (v, name) in info.get("steps", {}).items()}
    steps[step] = (version, folder / info["file"])
    return Published(version, step, folder / info["file"], int(info.get("first", step)), steps)


def required_step(first: int, n: int, ranks: int, ahead: int) -> int:
    """The trainer step whose weights the n-th batch (1-based) must be sampled with: batch n
    belongs to step ceil(n / ranks) of the sampler's run (counted from `first`, the first step
    published), which may be at most `ahead` steps ahead of the weights. In steps, not versions:
    a step advances the version by --num_iterations, or not at all when it trained nothing."""
    step = -(-n // ranks)
    return first + max(step - 1 - ahead, 0)


def pick_weights(got: Published, need: int | None) -> tuple[int, int, Path] | None:
    """-> (step, version, file) to sample with: the weights of step `need` (None: the newest),
    from its own file while that is kept, else the newest (never older than `need`); None while
    step `need` is not published yet (wait)."""
    if need is None:
        return got.step, got.version, got.path
    if got.step < need:
        return None
    if need in got.steps:
        return (need, *got.steps[need])
    return got.step, got.version, got.path
