"""Two data-parallel ranks (torchrun, gloo, real DeepSpeed ZeRO-2) apply the same gradient as one
process with gradient accumulation, and both equal the plain autograd gradient of the full batch's
loss; the trainer script runs on two ranks under the NCCL-style collective guard."""
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from simple_grpo.train.engine import free_port, standalone_env

WORKER = Path(__file__).with_name("dist_worker.py")
sys.path.insert(0, str(WORKER.parent))
import dist_worker as dw  # noqa: E402


def launch(nproc: int, out: Path) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    env = standalone_env(OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu")
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
           "--master_addr=127.0.0.1", f"--master_port={free_port()}", str(WORKER), str(out)]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Every case of dist_worker.CASES, run once as 1 process (accumulation over 4 micro-batches)
    and once as 2 ranks (2 micro-batches each)."""
    root = tmp_path_factory.mktemp("dist")
    return {1: launch(1, root / "one"), 2: launch(2, root / "two")}


def reference_update(agg: str, iterations: int, overlong_filter: bool) -> dict[str, torch.Tensor]:
    """-LR * the plain autograd gradient of the full batch's loss (one backward, no micro-batches,
    no DeepSpeed), `iterations` SGD steps; denominators counted by hand over the whole batch."""
    from simple_grpo.algo.logprobs import completion_logprobs
    from simple_grpo.algo.losses import policy_loss
    from simple_grpo.algo.masks import mask_from_lengths

    model = dw.build_tiny_model(seed=1)
    init = {k: v.detach().clone() for k, v in model.state_dict().items()}
    batch = dw.fixed_batch()
    inputs = (batch.prompt_ids, batch.prompt_lens, batch.completion_ids, batch.completion_lens)
    mask_BC = mask_from_lengths(batch.completion_lens, dw.C)
    if overlong_filter:
        mask_BC[list(dw.TRUNCATED_ROWS)] = False
    num_seqs = int(mask_BC.any(1).sum())
    num_tokens = num_seqs * dw.C if agg == "seq-mean-token-sum-norm" else float(mask_BC.sum())
    with torch.no_grad():
        old_BC = completion_logprobs(model, *inputs) if iterations > 1 else None
    for _ in range(iterations):
        logp_BC = completion_logprobs(model, *inputs)
        loss, _ = policy_loss(logp_BC, old_BC, batch.ref_logprobs, batch.advantages, mask_BC,
                              num_tokens=num_tokens, num_seqs=num_seqs, **dict(dw.LOSS_KW, agg=agg))
        model.zero_grad()
        loss.backward()
        with torch.no_grad():
            for p in model.parameters():
                p -= dw.LR * p.grad
    return {k: v.detach() - init[k] for k, v in model.state_dict().items()}


def update(folder: Path, case: str, rank: int) -> dict[str, torch.Tensor]:
    init = load_file(str(folder / f"{case}.init.rank{rank}.safetensors"))
    final = load_file(str(folder / f"{case}.rank{rank}.safetensors"))
    return {k: final[k] - init[k] for k in init}


def relative_error(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> float:
    num = sum(float((got[k].double() - want[k].double()).pow(2).sum()) for k in want)
    den = sum(float(want[k].double().pow(2).sum()) for k in want)
    return (num / den) ** 0.5


def test_the_batch_splits_unequally_over_two_ranks():
    """The premise of the cases: rank 0 and rank 1 hold different token and sequence counts."""
    from simple_grpo.algo.masks import mask_from_lengths, truncated

    batch = dw.fixed_batch()
    kept_BC = mask_from_lengths(batch.completion_lens, dw.C) & \
        ~truncated(batch.completion_ids, batch.completion_lens, [dw.EOS])[:, None]
    tokens, seqs = kept_BC.view(2, -1, dw.C).sum((1, 2)), kept_BC.any(1).view(2, -1).sum(1)
    assert tokens[0] != tokens[1] and seqs.tolist() == [4, 1], (tokens, seqs)


@pytest.mark.parametrize("budget, counts", [(12, [3, 4]), (16, [3, 2])])
def test_budgeted_ranks_hold_unequal_micro_batch_counts(budget, counts):
    """The premise of the *_budget cases: re-ordered rows, and one rank needs filler passes."""
    from simple_grpo.algo import packing

    plans = [packing.plan(dw.rank_slice(dw.fixed_batch(), r, 2), micro_batch=dw.MICRO, max_tokens=budget)
             for r in range(2)]
    assert [len(p) for p in plans] == counts
    assert any(torch.cat([mb.rows for mb in p]).tolist() != list(range(4)) for p in plans), "rows sorted"


@pytest.mark.parametrize("case", list(dw.CASES))
def test_two_ranks_apply_the_full_batch_gradient(case, runs):
    """The update DeepSpeed applied (SGD: -LR * gradient) equals the full-batch autograd gradient,
    for one process accumulating 4 micro-batches and for 2 ranks accumulating 2 each. A uniform
    scale (a missing world-size factor, DeepSpeed dividing by the accumulation steps) or per-rank
    denominators (token / sequence counts not summed over ranks) are errors of 25% or more."""
    want = reference_update(*dw.CASES[case])
    one, r0, r1 = update(runs[1], case, 0), update(runs[2], case, 0), update(runs[2], case, 1)
    moved = [k for k in want if float(want[k].abs().max()) > 0]
    assert len(moved) == len(want), f"every parameter has a gradient: {set(want) - set(moved)}"
    for k in want:
        assert torch.equal(r0[k], r1[k]), f"{k}: ranks disagree"
    err_one, err_two = relative_error(one, want), relative_error(r0, want)
    assert err_one < 1e-4, f"{case}: 1 process vs the full-batch gradient: relative error {err_one:.3g}"
    assert err_two < 1e-4, f"{case}: 2 ranks vs the full-batch gradient: relative error {err_two:.3g}"


@pytest.mark.parametrize("case", list(dw.CASES))
def test_token_mean_metrics_of_two_ranks_are_the_whole_batch_ones(case, runs):
    """kl, ratio_mean and the clip fractions of a 2-rank step are token means over the whole batch,
    as one process computes them: rank 1 holds fewer loss tokens than rank 0 (the overlong filter),
    so a mean of the ranks' own means is off."""
    import json

    one, two = (json.loads((runs[n] / "metrics.json").read_text())[case] for n in (1, 2))
    assert one["kl"] > 0.1, "a KL of its own size on each rank"
    for k in ("kl", "ratio_mean", "clip_low_frac", "clip_high_frac"):
        assert two[k] == pytest.approx(one[k], rel=1e-5, abs=1e-7), (k, one[k], two[k])
    assert two["loss_tokens"] == one["loss_tokens"], "tokens in the loss, summed over the ranks"
    if case.endswith("_budget"):  # the mean of the ranks' micro-batch counts (3 and 4, or 3 and 2)
        assert two["micro_batches"] in (3.5, 2.5) and 0 < two["pad_frac"] < 1


def test_trainer_script_on_two_ranks(tiny_model_dir, tmp_path):
    """`torchrun --nproc_per_node 2 grpo_ref_split.py`: both ranks train, evaluate half the held-out
    prompts each, checkpoint and export;
    every collective comes from simple_grpo/train/collectives.py or DeepSpeed and carries only tensors on
    the rank's device (tests/strict_collectives.py guards each call the way NCCL would)."""
    import json
    import re

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
        assert rank["calls"].get("collectives.all_reduce", 0) >= 2 * 3 + 2, rank  # + 2 shared evaluations
        assert rank["calls"].get("collectives.all_gather", 0) >= 2 * 2 + 1, rank  # + the ref server's URL
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == [0, 1, 2], "rank 0 alone writes the metrics"
    assert rows[1]["kl"] == 0.0 and "eval_accuracy" in rows[2]
    evaluated = re.findall(r"\[rank(\d)\] evaluated (\d+) held-out", r.stdout + r.stderr)
    assert sorted(evaluated) == [("0", "2"), ("0", "2"), ("1", "2"), ("1", "2")], evaluated  # 4 split in 2
    trained = [json.loads(line) for line in (tmp_path / "batches.jsonl").read_text().splitlines()]
    assert [t["producer"] for t in trained] == [f"trainer-{t['rank']}" for t in trained], \
        "each rank trains its own batch back from the queue (its prefetched passes are kept)"
    ckpts = sorted(p.name for p in (tmp_path / "checkpoints").iterdir() if p.name.startswith("step-"))
    assert ckpts == ["step-000001", "step-000002"]
    shards = list((tmp_path / "checkpoints" / "step-000002").glob("*optim_states.pt"))
    assert len(shards) == 2, "ZeRO-2 optimizer state is partitioned over the 2 ranks"
    assert (tmp_path / "final" / "model.safetensors").exists()


TIMEOUT_PROGRAM = """
import sys, time, torch
sys.path.insert(0, sys.argv[1])
from simple_grpo.train import engine
dist = engine.init_distributed("gloo", timeout_min=0.05)  # 3 s
if dist.rank == 1:
    time.sleep(8)  # a rank that does not come to the collective (in time)
t = time.monotonic()
try:
    torch.distributed.all_reduce(torch.ones(1))
except RuntimeError:
    print(f"rank0 gave up after {time.monotonic() - t:.1f} s", flush=True)
"""


def test_dist_timeout_bounds_a_collective(tmp_path):
    """--dist_timeout reaches the process group: a collective whose peer never comes fails after
    it (3 s here; the default is 60 minutes, NCCL's own 10)."""
    import re

    env = standalone_env(OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu")
    root = Path(__file__).resolve().parents[1]
    program = tmp_path / "timeout_program.py"
    program.write_text(TIMEOUT_PROGRAM)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
           f"--master_port={free_port()}", str(program), str(root)]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    m = re.search(r"rank0 gave up after ([\d.]+) s", r.stdout)
    assert m, (r.stdout + r.stderr)[-3000:]
    assert 2.0 <= float(m[1]) < 7.0, m[0]
