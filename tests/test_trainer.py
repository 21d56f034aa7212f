"""The trainer end to end on a tiny model: presets update every parameter, resume is bit-exact,
KL starts at 0 against a real reference-server subprocess (at temperature 1 and at the sampling
temperature), bad input exits with code 2."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from simple_grpo.train.engine import standalone_env
from simple_grpo.gen.reward_registry import register

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import grpo_ref_split  # noqa: E402


@register("test_distinct_chars")
def distinct_chars(completion: str, example: dict) -> float:
    """Varies across random completions, so advantages are non-zero even for a random model."""
    return len(set(completion)) / 10.0


def tiny_args(model_dir, run_dir, **kw) -> list[str]:
    args = dict(model=model_dir, run_dir=run_dir, steps=2, prompts_per_step=2, num_generations=4,
                micro_batch_size=4, max_new_tokens=8, eval_every=0, lr=1e-3, warmup_steps=1,
                rewards="test_distinct_chars", save_every=0, plot_every=0, samples_every=1)
    args.update(kw)
    return [f"--{k}={v}" for k, v in args.items()]


def final_weights(run_dir) -> dict[str, torch.Tensor]:
    return load_file(str(Path(run_dir) / "final" / "model.safetensors"))


def read_metrics(run_dir) -> list[dict]:
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("preset", ["grpo", "dr_grpo", "dapo", "gspo", "cispo", "sapo"])
def test_two_steps_of_each_preset_change_every_parameter(preset, tiny_model_dir, tmp_path):
    extra = {"eps_low": 0.2, "eps_high": 0.2} if preset == "gspo" else {}  # GSPO's 3e-4 clips a lr-1e-3 step
    grpo_ref_split.main(tiny_args(tiny_model_dir, tmp_path, preset=preset, **extra))
    before = load_file(str(Path(tiny_model_dir) / "model.safetensors"))
    after = final_weights(tmp_path)
    assert before.keys() == after.keys()
    unchanged = [k for k in before if torch.equal(before[k], after[k])]
    assert not unchanged, f"{preset}: parameters not updated: {unchanged}"
    rows = read_metrics(tmp_path)
    assert [r["step"] for r in rows] == [1, 2]
    for r in rows:
        for key in ("reward_mean", "kl", "loss", "step_seconds", "clip_low_frac", "clip_high_frac",
                    "ratio_mean", "completion_len_mean", "truncated_frac", "lr", "weight_version"):
            assert key in r and r[key] is not None and abs(r[key]) < 1e6, (preset, key, r.get(key))
    assert (tmp_path / "samples.jsonl").exists() and (tmp_path / "config.json").exists()


def test_max_logits_mb_reaches_every_training_pass(tiny_model_dir, tmp_path, monkeypatch):
    from simple_grpo.algo import logprobs

    budgets = []  # the real chunk planner, recording the budget of each log-prob pass

    def spy(rows, seq_len, hidden, vocab, max_logits_bytes, *a, **kw):
        budgets.append(max_logits_bytes)
        return plan(rows, seq_len, hidden, vocab, max_logits_bytes, *a, **kw)

    plan = logprobs.plan_chunks
    monkeypatch.setattr(logprobs, "plan_chunks", spy)
    # num_iterations=2: the old log-probs pass too; dr_grpo: beta 0, so no server process
    grpo_ref_split.main(tiny_args(tiny_model_dir, tmp_path, preset="dr_grpo", num_iterations=2,
                                  max_logits_mb=1))
    # 2 steps x (1 old-log-prob pass + 2 training passes) x 2 micro-batches of 4
    assert budgets == [1 << 20] * 12


def test_resume_is_bit_exact(tiny_model_dir, tmp_path):
    straight, split = tmp_path / "straight", tmp_path / "split"
    common = dict(preset="dapo", save_every=2)
    grpo_ref_split.main(tiny_args(tiny_model_dir, straight, steps=4, **common))
    grpo_ref_split.main(tiny_args(tiny_model_dir, split, steps=2, **common))
    grpo_ref_split.main(tiny_args(tiny_model_dir, split, steps=4, resume="true", **common))
    a, b = final_weights(straight), final_weights(split)
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs after resume"
    assert [r["step"] for r in read_metrics(split)] == [1, 2, 3, 4], "no duplicated metric lines"
    assert [r["reward_mean"] for r in read_metrics(split)] == [r["reward_mean"] for r in read_metrics(straight)]


def test_kl_is_zero_at_step_one_with_real_ref_server_and_grows(tiny_model_dir, tmp_path):
    # beta > 0 and no --ref_url: the trainer starts `python ref_server.py` as a child process
    grpo_ref_split.main(tiny_args(tiny_model_dir, tmp_path, preset="grpo", steps=3, beta=0.04))
    kl = [r["kl"] for r in read_metrics(tmp_path)]
    assert kl[0] == 0.0, f"policy == reference at the first step, KL must be exactly 0, got {kl[0]}"
    assert kl[-1] > 0.0, "after updates the policy has moved away from the reference"


def test_kl_is_zero_at_step_one_at_the_sampling_temperature(tiny_model_dir, tmp_path):
    # the reference child scores log_softmax(logits / 0.7), as the trainer scores its policy
    grpo_ref_split.main(tiny_args(tiny_model_dir, tmp_path, preset="grpo", steps=1, beta=0.04,
                                  temperature=0.7))
    (row,) = read_metrics(tmp_path)
    assert row["kl"] < 1e-6, f"policy == reference at the first step, KL must be 0, got {row['kl']}"


def run_cli(*args, timeout=120):
    env = standalone_env(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return subprocess.run([sys.executable, str(ROOT / "grpo_ref_split.py"), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


# the real command line for a few (tests/test_inputs.py has the whole table, in-process)
@pytest.mark.parametrize("args, message", [
    (["--model=/no/such/model"], "does not exist"),                           # missing model
    (["--stepz=3"], "unknown option"),                                       # typo in an option
    (["--ref_url=http://127.0.0.1:9", "--ref_timeout=1"], "127.0.0.1:9"),     # unreachable ref server
    # ... found before any model loads: this model folder does not even exist
    (["--ref_url=http://127.0.0.1:9", "--ref_timeout=1", "--model=/no/such/model"], "127.0.0.1:9"),
    (["--attn_implementation=flash_attention_2"], "--attn_implementation=flash_attention_2 needs"),
])
def test_bad_input_is_one_line_and_exit_code_2(args, message, tiny_model_dir, tmp_path):
    base = [f"--model={tiny_model_dir}", f"--run_dir={tmp_path}", "--eval_every=0"]
    r = run_cli(*base, *args)
    assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
    assert message in r.stderr, r.stderr[-2000:]
    assert "Traceback" not in r.stderr, r.stderr[-2000:]


def test_a_reference_server_that_dies_at_start_up_is_one_line_in_seconds(tiny_model_dir, tmp_path):
    """The auto-started server exits at once (a device it cannot use): the trainer says so in one
    line as soon as it looks, not after --ref_timeout (300 s) of 'waiting for ref server'."""
    import time

    t = time.monotonic()
    r = run_cli(f"--model={tiny_model_dir}", f"--run_dir={tmp_path}", "--eval_every=0", "--beta=0.04",
                "--ref_device=gpu", "--ref_timeout=300", timeout=240)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert "the reference server this run started" in r.stderr and "exited with code" in r.stderr, r.stderr[-2000:]
    assert time.monotonic() - t < 120, "told at once, not after --ref_timeout"


def test_a_server_with_another_model_is_one_line(tiny_model_dir, ref_server, tmp_path):
    """Same architecture, other weights (a base model vs its fine-tune): refused at start, not a
    silently wrong KL."""
    from simple_grpo.errors import UserError
    from simple_grpo.models import save_tiny_model

    other = save_tiny_model(tmp_path / "other", seed=1)
    srv = ref_server()  # serves tiny_model_dir
    with pytest.raises(UserError, match=r"another model than --model=.*other weights"):
        grpo_ref_split.main(tiny_args(other, tmp_path / "run", ref_url=srv.url, beta=0.04))
    grpo_ref_split.main(tiny_args(tiny_model_dir, tmp_path / "same", ref_url=srv.url, beta=0.04, steps=1))


def test_help_lists_options():
    r = run_cli("--help")
    assert r.returncode == 0
    for name in ("--model=", "--preset=", "--steps=", "--prompts_per_step=", "--num_generations=",
                 "--max_new_tokens=", "--min_new_tokens=", "--beta=", "--lr=", "--seed=", "--run_dir=",
                 "--ref_url=", "--resume=", "--mode="):
        assert name in r.stdout, name


def test_ref_server_child_dies_with_the_trainer(tiny_model_dir):
    import time

    parent = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; sys.path.insert(0, sys.argv[1]);"
        "from simple_grpo.train.ref_process import RefProcess;"
        "p = RefProcess(sys.argv[2], extra=['--torch_threads=1']); print(p.proc.pid, flush=True);"
        "time.sleep(600)"), str(ROOT), str(tiny_model_dir)], stdout=subprocess.PIPE, text=True)
    child = int(parent.stdout.readline())
    parent.kill()  # kill -9: no atexit, no cleanup in the parent
    parent.wait()
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            os.kill(child, 0)
        except ProcessLookupError:
            return
        time.sleep(0.2)
    os.kill(child, 9)
    pytest.fail("the reference server outlived its trainer")
