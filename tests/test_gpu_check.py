"""benchmarks/gpu_check.py in its CPU mode (`--device=cpu --tiny`): the same path the GPU run takes
(numerics, ref_server.py + one trainer rank, two guarded trainer ranks), so the script cannot rot
between runs on a GPU; and each numerics check, run in-process, fails when one side of
its comparison is planted wrong (on a CPU both sides run on the same device)."""
import dataclasses
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from simple_grpo.train.engine import standalone_env

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_check_cpu_mode_passes_and_reports_every_part(tmp_path):
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--device=cpu", "--tiny",
                        f"--out={tmp_path}", "--steps=2", "--part_timeout_s=150"],
                       cwd=ROOT, env=standalone_env(OMP_NUM_THREADS="1"), capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    assert "gpu_check: PASS" in r.stdout
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert [row["check"] for row in report["numerics"]] == [
        "decode loop vs generate (greedy)", "shared-prompt log-probs vs plain forward",
        "sampling log-probs vs trainer (T=0.7)", "losses on device vs float64 CPU"]
    one, two = report["train"]
    assert one["part"] == "train_1rank" and two["part"] == "train_2ranks"
    for run in (one, two):
        assert run["ok"] and run["s_per_step"] > 0 and run["gen_tok_s"] > 0 and run["train_tok_s"] > 0
        assert run["kl_step1"] < 1e-6, "fp32 on the CPU: policy == reference at step 1"
    assert two["collectives"]["collectives.all_reduce"] > 0, "the guard saw the trainer's collectives"
    metrics = [json.loads(line) for line in (tmp_path / "train_1rank" / "metrics.jsonl").read_text().splitlines()]
    assert one["kl_step1"] == next(r["kl"] for r in metrics if r.get("step") == 1), "step 1's KL, not step 2's"
    assert report["server"]["compute_s_per_call"] > 0
    table = (tmp_path / "gpu_check.md").read_text()
    assert "| train_1rank | yes |" in table and "| train_2ranks | yes |" in table


@pytest.fixture(scope="module")
def numerics():
    """benchmarks/gpu_check_numerics.py and the fp32 / bf16 models of the CPU mode's numerics part
    (sys.path as it was: benchmarks/ holds modules named like the root's, e.g. ref_server)."""
    saved = list(sys.path)
    try:
        spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "benchmarks" / "gpu_check.py")
        gpu_check = importlib.util.module_from_spec(spec)
        sys.modules["gpu_check"] = gpu_check  # dataclasses look their module up
        spec.loader.exec_module(gpu_check)
        import gpu_check_numerics
    finally:
        sys.path[:] = saved
    model = gpu_check.numerics_model(gpu_check.CheckConfig(device="cpu", tiny=True))
    return gpu_check_numerics, gpu_check_numerics.model_pair(model, torch.device("cpu"))


def _one_token_off(real):  # greedy decode that picks another token at position 3 of every row
    def wrong(*a, **kw):
        d = real(*a, **kw)
        ids_NC = d.completion_ids_NC.clone()
        ids_NC[:, 3] = (ids_NC[:, 3] + 1) % 320
        return dataclasses.replace(d, completion_ids_NC=ids_NC)
    return wrong


def _recorded_off(real):  # sampling log-probs recorded 1e-3 off
    def wrong(*a, **kw):
        d = real(*a, **kw)
        return dataclasses.replace(d, logprobs_NC=d.logprobs_NC + 1e-3) if kw.get("record_logprobs") else d
    return wrong


def _shared_off(real):  # the shared-prompt path 1e-3 off
    def wrong(*a, **kw):
        return real(*a, **kw) + (1e-3 if kw.get("share_prompts", True) else 0.0)
    return wrong


def _clip_off(real):  # a loss that clips at half the upper clip range
    def wrong(*a, **kw):
        return real(*a, **{**kw, "eps_high": kw["eps_high"] / 2})
    return wrong


@pytest.mark.parametrize("check, target, plant", [
    ("decode_vs_generate", "decode", _one_token_off), ("shared_prompt_logp", "completion_logprobs", _shared_off),
    ("sampling_logp", "decode", _recorded_off), ("losses", "policy_loss", _clip_off)])
def test_each_numerics_check_fails_on_a_planted_error(numerics, monkeypatch, check, target, plant):
    """The CPU mode compares CPU with CPU, so each check must be able to fail there: it passes on
    the real code and reports failure when one side of its comparison (`target`) is planted wrong."""
    mod, models = numerics
    args = (torch.device("cpu"),) if check == "losses" else (models, 16)
    assert getattr(mod, check)(*args)["ok"], "the real code passes"
    monkeypatch.setattr(mod, target, plant(getattr(mod, target)))
    row = getattr(mod, check)(*args)
    assert row["ok"] is False, row


def test_deadline_reports_what_ran_and_skips_the_rest(tmp_path):
    """One overall deadline: the parts after it are reported as skipped (exit 1), and the report
    is already in --report_dir (each part's log joins it as the part finishes)."""
    report_dir = tmp_path / "report"
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--device=cpu", "--tiny",
                        f"--out={tmp_path / 'out'}", f"--report_dir={report_dir}", "--steps=2", "--deadline_s=1"],
                       cwd=ROOT, env=standalone_env(OMP_NUM_THREADS="1"), capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 1 and "gpu_check: FAIL" in r.stdout, (r.stdout + r.stderr)[-3000:]
    report = json.loads((report_dir / "gpu_check.json").read_text())
    assert len(report["numerics"]) == 4, "what ran before the deadline is reported"
    assert all("skipped" in run["error"] for run in report["train"]), report["train"]
    assert "skipped: the overall --deadline_s had passed" in (report_dir / "gpu_check.md").read_text()
