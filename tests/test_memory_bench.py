"""benchmarks/memory.py in its tiny CPU mode: every variant is a row of the table, measured through
the trainer's own pieces in a fresh process each, and is what its name says (layers checkpointed,
adapter parameters, activations kept for backward); a bad variant name is one line."""
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

from simple_grpo.train.engine import standalone_env

ROOT = Path(__file__).resolve().parents[1]


def run_bench(*args, timeout=300):
    return subprocess.run([sys.executable, str(ROOT / "benchmarks" / "memory.py"), *args], cwd=ROOT,
                          env=standalone_env(OMP_NUM_THREADS="1"), capture_output=True, text=True,
                          timeout=timeout)


def mem_bench():
    """benchmarks/memory.py as the module `memory_bench` (dataclasses look their module up)."""
    if "memory_bench" not in sys.modules:
        spec = importlib.util.spec_from_file_location("memory_bench", ROOT / "benchmarks" / "memory.py")
        mod = importlib.util.module_from_spec(spec)
        sys.modules["memory_bench"] = mod
        spec.loader.exec_module(mod)
    return sys.modules["memory_bench"]


@pytest.mark.slow
def test_tiny_cpu_table_has_a_measured_row_per_variant(tmp_path):
    variants = ["full", "full+gc", "lora"]  # +offload: tests/test_engine.py (its first build is slow)
    r = run_bench("--device=cpu", "--shape=tiny", "--G=4", "--completion_tokens=8", "--prompt_tokens=8",
                  f"--variants={','.join(variants)}", "--jobs=3", f"--out={tmp_path / 'mem'}")
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    rows = [line for line in r.stdout.splitlines() if line.startswith("| ") and "---" not in line][1:]
    assert [row.split(" | ")[0][2:] for row in rows] == variants, r.stdout
    results = json.loads((tmp_path / "mem.json").read_text())["results"]
    for v in variants:  # each one ran (the trainer has every option) and measured a real peak
        assert results[v]["status"] == "ok", results[v]
        assert results[v]["peak_gib"] > 0 and results[v]["before_step_gib"] > 0
    full, gc, lora = (results[v] for v in variants)
    # each variant is what its name says, read back from the model it trained
    mem = mem_bench()
    _, hidden, inter, layers, heads, kv, _, _ = mem.SHAPES["tiny"]
    assert [x["checkpointed_layers"] for x in (full, gc, lora)] == [0, layers, 0]
    kv_dim = hidden // heads * kv  # r x (in + out) per linear: q, k, v, o, gate, up, down
    per_layer = mem.MemoryConfig().lora_r * (2 * (hidden + hidden) + 2 * (hidden + kv_dim) + 3 * (hidden + inter))
    assert lora["adapter_params"] == lora["trainable_params"] == layers * per_layer, lora
    assert full["adapter_params"] == gc["adapter_params"] == 0
    assert full["trainable_params"] == gc["trainable_params"] > lora["trainable_params"]
    # checkpointing keeps only what is outside the decoder layers for backward (an exact count of
    # saved bytes, not an RSS peak, so it holds at this shape): about a tenth of full's here
    assert 0 < gc["saved_for_backward_mib"] < full["saved_for_backward_mib"] / 4, (full, gc)
    assert "| full | " in r.stdout and "| 1.00 |" in r.stdout, "the ratio column against full"
    assert (tmp_path / "mem.md").read_text().strip() == r.stdout.strip()


def test_unknown_variant_is_one_line():
    r = run_bench("--shape=tiny", "--variants=full,qlora", timeout=120)
    assert r.returncode == 2 and "unknown variant 'qlora'" in r.stderr and "Traceback" not in r.stderr


def test_a_variant_the_trainer_lacks_is_na_not_a_crash(monkeypatch):
    """Where the trainer has no option for a variant (an older checkout without --lora_r), its row
    says so; an OOM is a row with its reason."""
    from simple_grpo.errors import UserError

    mem = mem_bench()

    def lacks(c, variant):
        raise UserError("unknown option(s) --lora_r; see --help")

    monkeypatch.setattr(mem, "trainer_config", lacks)
    c = mem.MemoryConfig(shape="tiny")
    got = mem.run_child(c, "lora")
    assert got["status"] == "n/a" and "--lora_r" in got["reason"]
    oom = {"status": "OOM", "reason": "OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB"}
    table = mem.render(c, {"lora": got, "full+offload": oom})
    assert "| lora | n/a (not available) |" in table and "| full+offload | OOM |" in table


@pytest.mark.slow
def test_the_reference_in_flight_keeps_two_micro_batch_graphs(tmp_path):
    """The real path: while the server scores the batch, the forward passes of 2 micro-batches run
    ahead and their graphs stay alive; without a server one at a time."""
    peaks = {}
    for flight in ("true", "false"):
        r = run_bench("--device=cpu", "--shape=tiny", "--G=8", "--micro_batch_size=2", "--completion_tokens=8",
                      "--prompt_tokens=8", "--variants=full", f"--ref_in_flight={flight}",
                      f"--out={tmp_path / flight}")
        assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
        peaks[flight] = json.loads((tmp_path / f"{flight}.json").read_text())["results"]["full"]["saved_for_backward_mib"]
    assert 1.8 < peaks["true"] / peaks["false"] < 2.2, peaks
