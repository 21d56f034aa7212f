"""The off-policy correction in whole runs: a trainer fed by a generation worker process over real
HTTP with --tis=token reports TIS metrics on every step, late ones included; a LoRA run with
--lora_dropout=0.5 keeps the fresh batches' logprob_mismatch at numerical noise on every step."""
from __future__ import annotations

import sys
from pathlib import Path

from test_docs import undocumented_metrics
from test_workers import SMALL, _rows, _spawn, _wait_for

from simple_grpo.gen.reward_registry import register
from simple_grpo.wire.client import RefClient

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import grpo_ref_split  # noqa: E402



@register("test_varied_chars")
def varied_chars(completion: str, example: dict) -> float:
    """Differs across random completions: non-zero advantages even for a random model."""
    return len(set(completion)) / 10.0


TIS_KEYS = ("tis_weight_mean", "tis_clipped_frac", "tis_masked_frac", "tis_ratio_max")


def test_worker_run_with_tis_reports_it_on_every_step(tiny_model_dir, ref_server, tmp_path):
    """The worker fills the queue before the trainer starts, so most steps train late batches
    (before: only fresh batches got TIS, late ones reported none)."""
    srv = ref_server(queue_size=3)
    client = RefClient(srv.url)
    common = [f"--model={tiny_model_dir}", f"--ref_url={srv.url}", "--rewards=overlong"] + \
        [f"--{k}={v}" for k, v in SMALL.items()]
    worker = _spawn(common + ["--mode=generate", "--worker_index=4"], tmp_path / "worker.log")
    run = tmp_path / "run"
    try:
        _wait_for(lambda: client.stats()["batches_in"] >= 3, 240, "a full queue", [worker])
        grpo_ref_split.main(common + [f"--run_dir={run}", "--steps=5", "--generate_locally=false",
                                      "--tis=token", "--tis_cap=2", "--eval_every=0", "--save_every=0",
                                      "--plot_every=0", "--lr=1e-3", "--warmup_steps=1",
                                      "--max_staleness=-1", "--ref_timeout=120"])
    finally:
        worker.kill()
        worker.wait()
    steps = _rows(run / "metrics.jsonl")
    assert [r["step"] for r in steps] == [1, 2, 3, 4, 5]
    late = [r for r in steps if r["batch_staleness"] > 0]
    assert len(late) >= 2, [r["batch_staleness"] for r in steps]
    for r in steps:
        missing = [k for k in TIS_KEYS if k not in r]
        assert not missing, f"step {r['step']} (staleness {r['batch_staleness']}) lacks {missing}"
        assert 0 < r["tis_weight_mean"] <= 2.0 and r["tis_masked_frac"] == 0.0
        assert r["offpolicy_token_frac"] == float(r["batch_staleness"] > 0)
        assert r["ratio_max"] == 1.0  # one pass: pi_old is the training forward's value
    assert all("logprob_mismatch" in r for r in steps if r["batch_staleness"] == 0)
    assert not undocumented_metrics(steps), "metrics missing from docs/metrics.md"  # publishing, TIS


def test_lora_dropout_leaves_the_mismatch_at_noise(tiny_model_dir, tmp_path):
    """--lora_dropout=0.5 with adapters that move (lr 1e-2): pi_old, TIS and the mismatch run
    without dropout, so a fresh batch's |pi_old - pi_sampler| stays < 1e-3 on every step (before:
    it grew with the adapters, as dropout masks reached the no-grad passes)."""
    run = tmp_path / "run"
    args = dict(model=tiny_model_dir, run_dir=run, steps=4, lora_r=8, lora_dropout=0.5, lora_alpha=32,
                tis="token", lr=1e-2, warmup_steps=1, eval_every=0, save_every=-1, plot_every=0,
                rewards="test_varied_chars", beta=0.04, **SMALL)
    grpo_ref_split.main([f"--{k}={v}" for k, v in args.items()])
    steps = _rows(run / "metrics.jsonl")
    assert len(steps) == 4
    assert all(r["logprob_mismatch"] < 1e-3 for r in steps), [r["logprob_mismatch"] for r in steps]
    assert all(abs(r["tis_weight_mean"] - 1.0) < 1e-3 for r in steps)
    assert steps[-1]["grad_norm"] > 0 and any(r["ratio_max"] > 1.0 for r in steps), \
        "the training forward keeps its dropout (ratio pi / pi_old != 1)"
