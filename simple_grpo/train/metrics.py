"""Training metrics: one JSON line per log call in `run_dir/metrics.jsonl` (optionally mirrored to
wandb / TensorBoard), a 4-panel progress plot, and the sampled completions in `samples.jsonl`.

Only rank 0 should create these (the trainer's job). Files are appended and flushed per line, so
a crash loses at most a partial last line; readers here skip such a line.
"""
from __future__ import annotations

import gc
import json
import logging
import math
import os
import time
from pathlib import Path

from simple_grpo.errors import UserError
from simple_grpo.io import atomic_open, write_text_atomic

log = logging.getLogger("simple_grpo")

METRICS_FILE = "metrics.jsonl"
SAMPLES_FILE = "samples.jsonl"


def _to_float(key: str, value, step: int) -> float | str | None:
    """A JSON-safe scalar: numbers (python, numpy, 0-d tensors) as float, NaN/inf as None."""
    if isinstance(value, str) or value is None:
        return value
    if hasattr(value, "item"):  # torch / numpy scalars
        value = value.item()
    assert isinstance(value, (int, float)), \
        f"metric {key!r} at step {step} must be a number or string, got {type(value).__name__}"
    x = float(value)
    if not math.isfinite(x):
        log.warning("metric %r is %s at step %d; written as null", key, x, step)
        return None
    return x


def read_jsonl(path: Path, keys: tuple[str, ...] | None = None) -> list[dict]:
    """The parseable JSON objects of a .jsonl file (only `keys` of each, when given), read line
    by line; a partial or broken line is skipped."""
    rows = []
    try:
        f = open(path, errors="replace")
    except FileNotFoundError:
        return rows
    with f:
        for line in f:
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue  # usually the last line of a file being written, or cut by a crash
            if isinstance(row, dict):
                rows.append(row if keys is None else {k: row[k] for k in keys if k in row})
    return rows


class MetricsLogger:
    """Appends `{"step": s, "time": unix_seconds, **metrics}` lines to `run_dir/metrics.jsonl`.

    wandb / tensorboard are imported only when enabled; a UserError says how to install them.
    On resume call `truncate_after(first_step_to_log)` before logging, so steps logged after the
    checkpoint by the interrupted run are dropped instead of duplicated."""

    def __init__(self, run_dir: Path, *, wandb: bool = False, tensorboard: bool = False,
                 config: dict | None = None):
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.run_dir / METRICS_FILE
        self._file = None
        self._wandb = None
        self._tb = None
        if wandb:
            try:
                import wandb as wandb_mod
            except ImportError:
                raise UserError("wandb logging is enabled but wandb is not installed; "
                                "run: pip install wandb (or turn wandb off)") from None
            self._wandb = wandb_mod.init(project=os.environ.get("WANDB_PROJECT", "simple_grpo"),
                                         dir=str(self.run_dir), config=config or {})
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise UserError("tensorboard logging is enabled but tensorboard is not installed; "
                                "run: pip install tensorboard (or turn tensorboard off)") from None
            self._tb = SummaryWriter(log_dir=str(self.run_dir / "tensorboard"))
            if config:
                self._tb.add_text("config", f"```\n{json.dumps(config, indent=2, default=str)}\n```")

    def log(self, step: int, metrics: dict) -> None:
        """Append one line for `step` (flushed at once) and forward to the enabled backends."""
        assert "step" not in metrics and "time" not in metrics, "'step' and 'time' are added here"
        clean = {str(k): _to_float(str(k), v, step) for k, v in metrics.items()}
        row = {"step": int(step), "time": round(time.time(), 3), **clean}
        if self._file is None:
            self._file = open(self.path, "a", encoding="utf-8")
        self._file.write(json.dumps(row, allow_nan=False) + "\n")
        self._file.flush()
        numeric = {k: v for k, v in clean.items() if isinstance(v, float)}
        if self._wandb is not None:
            self._wandb.log(numeric, step=int(step))
        if self._tb is not None:
            for k, v in numeric.items():
                self._tb.add_scalar(k, v, int(step))
            self._tb.flush()

    def truncate_after(self, step: int) -> int:
        """Drop lines with step >= `step` (and broken lines); returns how many lines were dropped.
        Pass the first step the resumed run will log, i.e. the checkpoint's step + 1 when the
        checkpoint was written after that step's metrics."""
        self.close_file()
        return truncate_jsonl(self.path, step)

    def close_file(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def close(self) -> None:
        """Close the file and finish the backends; safe to call twice."""
        self.close_file()
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None

    def __enter__(self) -> "MetricsLogger":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# ----------------------------------------------------------------------------- plot

def _series(rows: list[dict], key: str) -> tuple[list[float], list[float]]:
    pts = [(r["step"], r[key]) for r in rows
           if isinstance(r.get(key), (int, float)) and isinstance(r.get("step"), (int, float))]
    return [p[0] for p in pts], [p[1] for p in pts]


PLOTTED = ("step", "reward_mean", "eval_accuracy", "kl", "completion_len_mean", "completion_len_max",
           "loss")
MAX_PLOTTED_ROWS = 2000


def plot_metrics(metrics_jsonl: Path, out_png: Path) -> Path:
    """A 2x2 progress figure (reward + eval accuracy, KL, completion length, loss) as a PNG,
    written atomically. Missing keys leave an empty panel; a broken last line is skipped."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure  # no pyplot: no global state, no GUI backend

    out_png = Path(out_png)
    rows = read_jsonl(Path(metrics_jsonl), PLOTTED)
    if len(rows) > MAX_PLOTTED_ROWS:  # a long run: every k-th step (and the evaluations) is enough
        k = -(-len(rows) // MAX_PLOTTED_ROWS)
        rows = [r for i, r in enumerate(rows) if i % k == 0 or "eval_accuracy" in r]
    fig = Figure(figsize=(11, 7), dpi=80)
    FigureCanvasAgg(fig)
    axes = fig.subplots(2, 2)
    (ax_r, ax_kl), (ax_len, ax_loss) = axes
    x, y = _series(rows, "reward_mean")
    ax_r.plot(x, y, color="tab:blue", label="reward mean")
    ax_r.set_ylabel("reward")
    xe, ye = _series(rows, "eval_accuracy")
    if xe:
        ax_acc = ax_r.twinx()
        ax_acc.plot(xe, ye, "o-", color="tab:orange", markersize=4, label="eval accuracy")
        ax_acc.set_ylabel("eval accuracy")
        ax_acc.set_ylim(-0.02, 1.02)
        ax_acc.legend(loc="lower right", fontsize=8)
    ax_r.set_title("reward")
    ax_kl.plot(*_series(rows, "kl"), color="tab:red")
    ax_kl.set_title("KL to reference")
    ax_len.plot(*_series(rows, "completion_len_mean"), label="mean")
    ax_len.plot(*_series(rows, "completion_len_max"), label="max", alpha=0.6)
    ax_len.set_title("completion length (tokens)")
    ax_loss.plot(*_series(rows, "loss"), color="tab:green")
    ax_loss.set_title("loss")
    for ax in axes.flat:
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    out_png.parent.mkdir(parents=True, exist_ok=True)
    try:
        with atomic_open(out_png, "wb", durable=False) as f:
            fig.savefig(f, format="png")
    finally:
        fig.clear()
        del fig, axes, rows
        gc.collect()  # matplotlib's reference cycles: free them now, not at some later collection
    return out_png


# ----------------------------------------------------------------------------- samples

class SamplesWriter:
    """Appends one line per sampled completion to `run_dir/samples.jsonl`:
    `{"step", "prompt", "completion", "rewards": {fn: value}, "total", "advantage", ...}`."""

    def __init__(self, run_dir: Path):
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.run_dir / SAMPLES_FILE

    def write(self, step: int, rows: list[dict]) -> None:
        """Append `rows` (each a dict for one completion) tagged with `step`; one flush per call."""
        lines = []
        for i, row in enumerate(rows):
            assert isinstance(row, dict), f"sample {i} at step {step} must be a dict, got {type(row)}"
            lines.append(json.dumps({"step": int(step), **_jsonable(row)}, ensure_ascii=False,
                                    allow_nan=False))
        with open(self.path, "a", encoding="utf-8") as f:
            f.write("".join(ln + "\n" for ln in lines))


def _jsonable(x):
    """Tensors / numpy scalars to python numbers, NaN/inf to None, recursively."""
    if hasattr(x, "tolist"):
        x = x.tolist()
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


def truncate_jsonl(path: Path, step: int) -> int:
    """Keep only the lines of a JSONL file whose "step" is < `step` (atomically); -> lines dropped."""
    if not path.exists():
        return 0
    lines = [ln for ln in path.read_text(errors="replace").splitlines() if ln.strip()]
    keep = []
    for ln in lines:
        try:
            row = json.loads(ln)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict) and isinstance(row.get("step"), (int, float)) and row["step"] < step:
            keep.append(ln)
    dropped = len(lines) - len(keep)
    if dropped:
        write_text_atomic(path, "".join(ln + "\n" for ln in keep))
        log.info("dropped %d lines with step >= %d from %s", dropped, step, path)
    return dropped
