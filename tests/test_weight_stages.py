"""benchmarks/weights.py --shape runs end to end at a tiny shape: every stage of every version has a
number, deltas follow the full file, and the box ends bit-identical to the trainer (the script
asserts it)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from simple_grpo.train.engine import standalone_env

ROOT = Path(__file__).resolve().parents[1]


def test_the_stage_table_at_a_tiny_shape():
    r = subprocess.run([sys.executable, "weights.py", "--shape=tiny", "--versions=2", "--lrs=1e-6,1e-5"],
                       cwd=ROOT / "benchmarks", env=standalone_env(OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT)),
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    rows = [line.split("|")[1:-1] for line in r.stdout.splitlines() if line.startswith("| 1e-0")]
    assert [(c[0].strip(), c[1].strip()) for c in rows] == [(lr, v) for lr in ("1e-06", "1e-05")
                                                           for v in ("1", "2", "3")]
    for cells in rows:
        if cells[1].strip() == "1":
            assert cells[2].strip() == "full"
            continue
        assert cells[2].strip().startswith("delta (")
        assert all(c.strip() != "-" and float(c.split("(")[0]) >= 0 for c in cells[4:]), cells
    assert "peak RSS" in r.stdout
