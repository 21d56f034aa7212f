"""Two data-parallel ranks (torchrun, gloo, real DeepSpeed ZeRO-2) take the same step as one
process on the full batch, and end with identical parameters on both ranks."""
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from simple_grpo.train.engine import free_port, standalone_env

WORKER = Path(__file__).with_name("dist_worker.py")


def launch(nproc: int, out: Path, preset: str, iterations: int) -> None:
    out.mkdir(parents=True, exist_ok=True)
    env = standalone_env(OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu")
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
           "--master_addr=127.0.0.1", f"--master_port={free_port()}", str(WORKER), str(out), preset, str(iterations)]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]


@pytest.mark.parametrize("preset, iterations", [
    ("dapo", 1),      # token-mean: divides by the step's token count over both ranks
    ("grpo", 2),      # seq-mean-token-mean with two passes (old log-probs recorded first)
    ("dr_grpo", 1),   # constant normaliser B * max_tokens with B over both ranks
])
def test_two_ranks_equal_one_process(preset, iterations, tmp_path):
    launch(1, tmp_path / "one", preset, iterations)
    launch(2, tmp_path / "two", preset, iterations)
    single = load_file(str(tmp_path / "one" / "rank0.safetensors"))
    r0 = load_file(str(tmp_path / "two" / "rank0.safetensors"))
    r1 = load_file(str(tmp_path / "two" / "rank1.safetensors"))
    init_changed = False
    for k in single:
        assert torch.equal(r0[k], r1[k]), f"{k}: ranks disagree"
        assert torch.allclose(r0[k], single[k], atol=1e-5, rtol=0), \
            f"{k}: 2-rank step differs from the full-batch step by {(r0[k] - single[k]).abs().max()}"
    from simple_grpo.models import build_tiny_model
    init = build_tiny_model(seed=1).state_dict()
    init_changed = all(not torch.equal(init[k], single[k]) for k in single)
    assert init_changed, "the step must change every parameter"


def test_trainer_script_on_two_ranks(tiny_model_dir, tmp_path):
    """`torchrun --nproc_per_node 2 grpo_ref_split.py`: both ranks train, checkpoint and export;
    every collective comes from simple_grpo/train/collectives.py or DeepSpeed and carries only tensors on
    the rank's device (tests/strict_collectives.py guards each call the way NCCL would)."""
    import json

    env = standalone_env(OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu")
    root = Path(__file__).resolve().parents[1]
    args = [f"--model={tiny_model_dir}", f"--run_dir={tmp_path}", "--steps=2", "--prompts_per_step=2",
            "--num_generations=4", "--micro_batch_size=2", "--max_new_tokens=6", "--eval_every=2",
            "--eval_prompts=4", "--save_every=1", "--preset=grpo", "--lr=1e-3"]
    log = tmp_path / "collectives.jsonl"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
           f"--master_port={free_port()}", str(root / "tests" / "strict_collectives.py"), str(log),
           str(root / "grpo_ref_split.py"), *args]
    r = subprocess.run(cmd, env=env, cwd=root, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    seen = [json.loads(line) for line in log.read_text().splitlines()]
    assert len(seen) == 2, "both ranks ran under the guard"
    for rank in seen:  # the counts, step by step: token counts, metric averages, eval, checkpoints
        assert rank["calls"].get("collectives.all_reduce", 0) >= 2 * 3, rank
        assert rank["calls"].get("collectives.all_gather", 0) >= 2 * 2, rank
        assert rank["calls"].get("collectives.broadcast", 0) >= 2, rank  # the ref port, evaluations
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == [0, 1, 2], "rank 0 alone writes the metrics"
    assert rows[1]["kl"] == 0.0 and "eval_accuracy" in rows[2]
    ckpts = sorted(p.name for p in (tmp_path / "checkpoints").iterdir() if p.name.startswith("step-"))
    assert ckpts == ["step-000001", "step-000002"]
    shards = list((tmp_path / "checkpoints" / "step-000002").glob("*optim_states.pt"))
    assert len(shards) == 2, "ZeRO-2 optimizer state is partitioned over the 2 ranks"
    assert (tmp_path / "final" / "model.safetensors").exists()
