"""benchmarks/presets.py in its --smoke mode: a tiny model, 2 presets x 2 seeds of 2 steps each, each
a real grpo_ref_split.py subprocess; the table has a row per preset and the three images are PNGs
written into --out (never into images/)."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from simple_grpo.train.engine import standalone_env

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_presets_bench_smoke_writes_table_and_curves(tmp_path):
    images_before = {p.name: p.stat().st_mtime_ns for p in (ROOT / "images").glob("*")}
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "presets.py"), "--smoke", f"--out={tmp_path}"],
                       cwd=ROOT, env=standalone_env(OMP_NUM_THREADS="1"), capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    table = (tmp_path / "presets.md").read_text()
    rows = [line for line in table.splitlines() if line.startswith("| ") and not line.startswith("| preset")]
    assert [row.split(" | ")[0] for row in rows] == ["| grpo", "| dr_grpo"], table
    for row in rows:
        assert row.endswith("| 2/2 |"), row
        accuracy = row.split(" | ")[2]
        assert " -> " in accuracy and "n/a" not in accuracy, row
    assert "| grpo | 0.04 |" in table and "| dr_grpo | 0 |" in table and "n/a (beta 0)" in rows[1]
    for name in ("returns.png", "kl.png", "length.png"):
        png = (tmp_path / name).read_bytes()
        assert png[:4] == b"\x89PNG" and len(png) > 1000, name
    report = json.loads((tmp_path / "presets.json").read_text())
    assert sorted(report["runs"]) == ["dr_grpo-s0", "dr_grpo-s1", "grpo-s0", "grpo-s1"]
    for run in report["runs"].values():
        assert run["ok"] and sorted(run["curves"]["accuracy"]) == ["1", "2"]
        assert 0.0 <= run["acc_before"] <= 1.0 and 0.0 <= run["acc_after"] <= 1.0
        assert not (Path(run["run_dir"]) / "final").exists(), "final/ is removed unless --keep_final"
    assert {p.name: p.stat().st_mtime_ns for p in (ROOT / "images").glob("*")} == images_before
