"""benchmarks/gpu_check.py in its CPU mode (`--device=cpu --tiny`): the same path the GPU run takes
(numerics, ref_server.py + one trainer rank, two guarded trainer ranks), so the script cannot rot
between runs on a GPU; and each numerics check, run in-process, fails when one side of
its comparison is planted wrong (on a CPU both sides run on the same device)."""
import dataclasses
import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from simple_grpo.train.engine import standalone_env

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
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
        "packed (varlen) log-probs vs padded", "sampling log-probs vs trainer (T=0.7)", "losses on device vs float64 CPU"]
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
    check_decode_rows(report["gen"], table)


# the tiny shape by hand: a layer is q 64*64+64, k and v 64*32+32 each, o 64*64, MLP 3*64*128 and 2
# norms of 64 = 37,120; 2 layers + the tied 320 x 64 embedding + the final norm = 94,784 weights,
# 4 bytes each in fp32; K and V of a cached position: 2 layers * 2 * 2 KV heads * 16 * 4 B = 512 B
TINY_WEIGHTS, TINY_KV_BYTES = 2 * 37_120 + 320 * 64 + 64, 2 * 2 * 2 * 16 * 4


def check_decode_rows(gen: dict, table: str) -> None:
    """The decode table of the tiny mode: every engine at 4/8 x 8/16 with every row full, one
    variable set whose rows end at different lengths, finite numbers, and the floor of each row
    equal to the hand-computed bytes / the measured bandwidth."""
    info, rows = gen["info"], gen["rows"]
    assert {k: info["dims"][k] for k in ("layers", "kv_heads", "head_dim", "weights", "b")} == \
        {"layers": 2, "kv_heads": 2, "head_dim": 16, "weights": TINY_WEIGHTS, "b": 4}
    assert 1e8 < info["bandwidth"] < 1e13 and info["flops"] > 0 and info["nominal"] is None
    assert [(r["engine"], r["batch"], r["new_tokens"], r["variable"]) for r in rows] == [
        (e, b, n, False) for n in (8, 16) for b in (4, 8) for e in ("loop", "static", "generate")] + [
        ("loop", 8, 16, True), ("static", 8, 16, True), ("generate", 8, 16, True)]
    for r in rows:
        assert r["ok"], r
        assert all(math.isfinite(r[k]) and r[k] > 0 for k in ("tok_s", "ms_step", "floor_ms", "ratio")), r
        assert r["context"] == r["prompt_width"] + r["steps"] / 2
        want = (4 * TINY_WEIGHTS + TINY_KV_BYTES * r["context"] * r["batch"]) / info["bandwidth"] * 1e3
        assert r["floor_ms"] == pytest.approx(want, rel=1e-9), "the floor is bytes read / bandwidth"
        assert r["ratio"] == pytest.approx(r["ms_step"] / r["floor_ms"])
        if not r["variable"]:
            assert r["steps"] == r["new_tokens"] and r["mean_len"] == r["new_tokens"], r
    assert all(r["min_len"] < r["steps"] for r in rows if r["variable"]), "rows end at different lengths"
    assert isinstance(info["ops_per_step"]["loop"], dict) and info["ops_per_step"]["loop"]["layer"] > 10
    assert "| loop | 4 | 8 | all full |" in table and "| generate | 8 | 16 | mean " in table
    assert "| static | 8 | 16 | all full |" in table


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


def _packed_off(real):  # the packed path 1e-3 off
    def wrong(*a, **kw):
        return real(*a, **kw) + (1e-3 if kw.get("packed") else 0.0)
    return wrong


def _clip_off(real):  # a loss that clips at half the upper clip range
    def wrong(*a, **kw):
        return real(*a, **{**kw, "eps_high": kw["eps_high"] / 2})
    return wrong


@pytest.mark.parametrize("check, target, plant", [
    ("decode_vs_generate", "decode", _one_token_off), ("shared_prompt_logp", "completion_logprobs", _shared_off),
    ("packed_logp", "completion_logprobs", _packed_off), ("sampling_logp", "decode", _recorded_off),
    ("losses", "policy_loss", _clip_off)])
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
    assert len(report["numerics"]) == 5, "what ran before the deadline is reported"
    assert all("skipped" in run["error"] for run in report["train"]), report["train"]
    assert len(report["gen"]["rows"]) == 15 and all("skipped" in r["error"] for r in report["gen"]["rows"])
    assert "skipped: the overall --deadline_s had passed" in (report_dir / "gpu_check.md").read_text()


@pytest.fixture(scope="module")
def gen_speed():
    saved = list(sys.path)
    try:
        spec = importlib.util.spec_from_file_location("gen_speed", ROOT / "benchmarks" / "gen_speed.py")
        mod = importlib.util.module_from_spec(spec)
        sys.modules["gen_speed"] = mod
        spec.loader.exec_module(mod)
    finally:
        sys.path[:] = saved
    return mod


def test_floor_bytes_by_hand(gen_speed):
    # 1000 weights in bf16 + 2 layers x (K, V) x 2 KV heads x head_dim 4 x context 10 x batch 3 x 2 B
    assert gen_speed.floor_bytes(1000, 2, 2, 4, 10, 3, 2) == 2000 + 1920
    # the docstring's Qwen2.5-1.5B row: B = 128, 1024 tokens, context 33 + 512 -> 5.088 GB a step
    assert gen_speed.floor_bytes(1_543_714_304, 28, 2, 128, 545, 128, 2) == 3_087_428_608 + 2_000_158_720
    assert gen_speed.nominal_bandwidth("NVIDIA H100 80GB HBM3") == 3.35e12
    assert gen_speed.nominal_bandwidth("NVIDIA H200") == 4.8e12
    assert gen_speed.nominal_bandwidth("NVIDIA H100 PCIe") == 2.0e12
    assert gen_speed.nominal_bandwidth("NVIDIA A100-SXM4-80GB") is None


@pytest.mark.parametrize("tied", [True, False])
def test_weights_a_step_reads(gen_speed, tied):
    """Every weight once; an untied input embedding is only gathered (B rows), so it is left out."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = Qwen2Config(vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tied)
    dims = gen_speed.model_dims(Qwen2ForCausalLM._from_config(cfg))
    assert dims["weights"] == TINY_WEIGHTS and dims["b"] == 4 and dims["head_dim"] == 16
    assert dims["weights_matmul"] == TINY_WEIGHTS - (2 * 2 * 64 + 64) - 2 * (64 + 32 + 32)  # no norms, biases


def test_forced_rows_that_end_early_fail(gen_speed, monkeypatch):
    """A forced row must decode the full length: with min_new_tokens dropped and an end set that
    random weights hit, the row reports failure."""
    from simple_grpo.models import build_tiny_model, build_tiny_tokenizer

    tok, model = build_tiny_tokenizer(), build_tiny_model().eval()
    info = {"dims": gen_speed.model_dims(model), "bandwidth": 1e10, "flops": 1e10}
    assert gen_speed.time_row(model, tok, "loop", 8, 16, False, True, info)["ok"]
    real = gen_speed.SampleSettings
    monkeypatch.setattr(gen_speed, "SampleSettings", lambda **kw: real(**{**kw, "min_new_tokens": 0}))
    monkeypatch.setattr(gen_speed, "eos_token_ids", lambda tok, model: list(range(160, 320)))
    row = gen_speed.time_row(model, tok, "loop", 8, 16, False, True, info)
    assert row["ok"] is False and "ended early" in row["error"], row
