"""metrics.jsonl lines, NaN handling, resume truncation, the progress plot and samples.jsonl."""
import json
import logging
import math
import sys
import types

import pytest
import torch

from simple_grpo.errors import UserError
from simple_grpo.train.metrics import MetricsLogger, SamplesWriter, plot_metrics, read_jsonl

torch.set_num_threads(1)


def lines(path):
    return [json.loads(ln) for ln in path.read_text().splitlines()]


def test_log_writes_one_parseable_line_per_call(tmp_path):
    m = MetricsLogger(tmp_path / "run")
    m.log(1, {"reward_mean": 0.5, "kl": torch.tensor(0.01), "loss": 2, "phase": "train"})
    # flushed at once: readable before close
    assert lines(tmp_path / "run" / "metrics.jsonl")[0]["reward_mean"] == 0.5
    m.log(2, {"reward_mean": 0.75})
    m.close()
    rows = lines(tmp_path / "run" / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2]
    assert rows[0]["kl"] == pytest.approx(0.01) and isinstance(rows[0]["loss"], float)
    assert rows[0]["phase"] == "train" and "time" in rows[0]


def test_nan_and_inf_become_null_with_warning(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="simple_grpo"), MetricsLogger(tmp_path) as m:
        m.log(3, {"loss": float("nan"), "kl": math.inf, "reward_mean": 1.0})
    text = (tmp_path / "metrics.jsonl").read_text()
    assert "NaN" not in text and "Infinity" not in text
    row = json.loads(text)
    assert row["loss"] is None and row["kl"] is None and row["reward_mean"] == 1.0
    assert "'loss'" in caplog.text and "step 3" in caplog.text


def test_truncate_after_drops_resumed_steps(tmp_path):
    m = MetricsLogger(tmp_path)
    for s in range(1, 6):
        m.log(s, {"loss": float(s)})
    m.close()
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 6, "loss": 1.')  # crash mid-line
    resumed = MetricsLogger(tmp_path)
    assert resumed.truncate_after(4) == 3  # steps 4, 5 and the broken line
    resumed.log(4, {"loss": 40.0})
    resumed.close()
    rows = lines(tmp_path / "metrics.jsonl")
    assert [(r["step"], r["loss"]) for r in rows] == [(1, 1.0), (2, 2.0), (3, 3.0), (4, 40.0)]
    assert MetricsLogger(tmp_path / "new").truncate_after(3) == 0  # no file yet


def test_missing_backends_give_user_error(tmp_path, monkeypatch):
    """Absent wandb / tensorboard (a None in sys.modules makes any import of them fail, installed
    or not) are one UserError each, before any file is written."""
    monkeypatch.setitem(sys.modules, "wandb", None)
    with pytest.raises(UserError, match="pip install wandb"):
        MetricsLogger(tmp_path / "w", wandb=True)
    monkeypatch.setitem(sys.modules, "tensorboard", None)
    monkeypatch.delitem(sys.modules, "torch.utils.tensorboard", raising=False)  # imported afresh
    with pytest.raises(UserError, match="pip install tensorboard"):
        MetricsLogger(tmp_path / "t", tensorboard=True)
    assert not (tmp_path / "w" / "metrics.jsonl").exists() and not (tmp_path / "t" / "tensorboard").exists()


def test_present_backends_get_every_numeric_metric(tmp_path, monkeypatch):
    """Stand-ins for wandb and torch.utils.tensorboard record what the logger forwards: the
    numeric metrics at their step, then finish / close once."""
    calls = []

    class Run:
        def log(self, metrics, step):
            calls.append(("wandb.log", step, metrics))

        def finish(self):
            calls.append(("wandb.finish",))

    class SummaryWriter:
        def __init__(self, log_dir):
            calls.append(("tb", log_dir))

        def add_text(self, tag, text):
            calls.append(("tb.text", tag))

        def add_scalar(self, k, v, step):
            calls.append(("tb.scalar", step, k, v))

        def flush(self):
            pass

        def close(self):
            calls.append(("tb.close",))

    wandb = types.ModuleType("wandb")
    wandb.init = lambda project, dir, config: calls.append(("wandb.init", project, config)) or Run()
    tb = types.ModuleType("torch.utils.tensorboard")
    tb.SummaryWriter = SummaryWriter
    monkeypatch.setitem(sys.modules, "wandb", wandb)
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", tb)
    monkeypatch.delenv("WANDB_PROJECT", raising=False)
    m = MetricsLogger(tmp_path, wandb=True, tensorboard=True, config={"lr": 1e-6})
    m.log(3, {"loss": 0.5, "note": "text"})
    m.close()
    m.close()
    assert calls == [("wandb.init", "simple_grpo", {"lr": 1e-6}), ("tb", str(tmp_path / "tensorboard")),
                     ("tb.text", "config"), ("wandb.log", 3, {"loss": 0.5}), ("tb.scalar", 3, "loss", 0.5),
                     ("wandb.finish",), ("tb.close",)]


def test_plot_tolerates_missing_keys_and_broken_last_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    rows = [{"step": s, "reward_mean": s / 10, "kl": 0.001 * s, "completion_len_mean": 20 + s,
             "completion_len_max": 40 + s, "loss": 1 / s} for s in range(1, 8)]
    rows[2].pop("kl")
    rows[3]["loss"] = None
    rows.append({"step": 4, "eval_accuracy": 0.25})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 8, "rew')
    out = plot_metrics(path, tmp_path / "plots" / "progress.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in out.parent.iterdir()] == ["progress.png"], "temp file left behind"
    assert len(read_jsonl(path)) == 8
    # an empty or absent file still gives a (blank) figure
    assert plot_metrics(tmp_path / "absent.jsonl", tmp_path / "blank.png").stat().st_size > 0


def test_samples_writer(tmp_path):
    w = SamplesWriter(tmp_path)
    w.write(5, [{"prompt": "2+2=?", "completion": "4 ✓", "rewards": {"correct": 1.0, "format": 0.5},
                 "total": 1.5, "advantage": torch.tensor(0.7)},
                {"prompt": "2+2=?", "completion": "5", "rewards": {"correct": 0.0, "format": float("nan")},
                 "total": 0.0, "advantage": -0.7}])
    w.write(6, [])
    rows = lines(tmp_path / "samples.jsonl")
    assert len(rows) == 2 and all(r["step"] == 5 for r in rows)
    assert rows[0]["completion"] == "4 ✓" and rows[0]["rewards"]["correct"] == 1.0
    assert rows[0]["advantage"] == pytest.approx(0.7) and rows[1]["rewards"]["format"] is None
