"""benchmarks/gpu_check.py in its CPU mode (`--device=cpu --tiny`): the same path the GPU run takes
(numerics, ref_server.py + one trainer rank, two guarded trainer ranks), so the script cannot rot
between the sessions that have a GPU."""
import json
import subprocess
import sys
from pathlib import Path

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
    assert report["server"]["compute_s_per_call"] > 0
    table = (tmp_path / "gpu_check.md").read_text()
    assert "| train_1rank | yes |" in table and "| train_2ranks | yes |" in table
