"""Conformance: every preset's gradient of one step, however the step is laid out, equals the
full-batch gradient.

    python benchmarks/conformance.py            # the table (about a minute on 2 CPU cores)
    python benchmarks/conformance.py --json=F   # also the raw numbers

For each preset (simple_grpo/algo/losses.py PRESETS) one optimizer step of the real
policy_step.train_on_batch runs on a fixed batch of 8 rows through a real DeepSpeed ZeRO-2 engine
(torchrun, gloo) built from the trainer's own DeepSpeed config, with plain SGD at lr 1 so that the
update is exactly minus the gradient DeepSpeed applied. The layouts (the table's columns):

    1 rank, no accumulation     one micro-batch of all 8 rows
    1 rank, micro-batch 1       8 micro-batches, gradient accumulation over 8
    2 ranks, no accumulation    4 rows per rank, one micro-batch each
    2 ranks, micro-batch 1      4 micro-batches per rank, accumulation over 4
    late batch                  1 rank; the batch comes from a generation worker one version
                                 late, sampled with identical weights and top_p < 1 (its recorded
                                 nucleus log-probs exceed the trainer's by 0.1 nats a token): bypass
                                 (--tis=off), pi_old = its whole-softmax log-probs
    1 rank, by tokens           --max_tokens_per_micro_batch=12: rows sorted by length, cut and
                                 trimmed (5 micro-batches)
    2 ranks, by tokens          the same on 2 ranks; 3 vs 2 micro-batches, so rank 1 runs a
                                 zero-loss filler pass and the boundary is set by hand

Each cell is the largest absolute difference, over every parameter, between that update and the
plain autograd gradient of the whole batch's loss (one backward, no micro-batches, no DeepSpeed,
denominators counted by hand). The ranks hold unequal token and sequence counts (rows outside the
loss on rank 1), so a per-rank denominator, a missing world-size factor, DeepSpeed's division by
the accumulation steps or a nucleus log-prob as pi_old each shows as an error of the gradient's
own size. The token-mean metrics of the 2-rank step (kl, ratio_mean, clip fractions; reduced
over ranks by train/loop.average) are compared with the 1-rank step's as well.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from simple_grpo.algo.losses import PRESETS  # noqa: E402
from simple_grpo.wire.codec import RolloutBatch  # noqa: E402

B, P, C, EOS = 8, 5, 6, 2
OUT_OF_LOSS = (5, 6)  # rows outside the loss (dynamic sampling's top-ups), both on rank 1 of 2
NUCLEUS_GAP = 0.1  # nats a token by which a late batch's recorded nucleus log-probs exceed the trainer's
LOSS_KEYS = ("eps_low", "eps_high", "beta", "kl", "agg", "ratio_level", "pg_loss", "tau_pos", "tau_neg",
             "clip_ratio_c")
# name -> (ranks, micro-batch rows, late)
LAYOUTS = {"1 rank, no accumulation": (1, 8, False), "1 rank, micro-batch 1": (1, 1, False),
           "2 ranks, no accumulation": (2, 4, False), "2 ranks, micro-batch 1": (2, 1, False),
           "late batch": (1, 8, True), "1 rank, by tokens": (1, 8, False, 12),
           "2 ranks, by tokens": (2, 4, False, 12)}
METRICS = ("kl", "ratio_mean", "clip_low_frac", "clip_high_frac")


def loss_kw(preset: str) -> dict:
    return {k: PRESETS[preset][k] for k in LOSS_KEYS} | {"max_tokens": C}


def fixed_batch() -> RolloutBatch:
    """8 rows of unequal lengths, each ending with EOS; rows OUT_OF_LOSS outside the loss; advantages
    of both signs; random reference log-probs (a KL of every size)."""
    g = torch.Generator().manual_seed(0)
    lens_B = torch.randint(1, C + 1, (B,), generator=g)
    ids_BC = torch.randint(3, 250, (B, C), generator=g)
    ids_BC[torch.arange(B), lens_B - 1] = EOS
    loss_rows_B = torch.ones(B, dtype=torch.bool)
    loss_rows_B[list(OUT_OF_LOSS)] = False
    return RolloutBatch(prompt_ids=torch.randint(3, 250, (B, P), generator=g),
                        prompt_lens=torch.randint(1, P + 1, (B,), generator=g), completion_ids=ids_BC,
                        completion_lens=lens_B, rewards=torch.zeros(B),
                        advantages=torch.randn(B, generator=g).masked_fill(~loss_rows_B, 0.0),
                        ref_logprobs=-4 - torch.rand(B, C, generator=g) * 3, loss_rows=loss_rows_B,
                        meta={"producer": "trainer-0"})


def late(batch: RolloutBatch, model) -> RolloutBatch:
    """The batch as a generation worker's, sampled one version ago with `model`'s weights and
    top_p < 1: whole-softmax log-probs equal to the trainer's, nucleus ones NUCLEUS_GAP above."""
    from simple_grpo.algo.logprobs import completion_logprobs
    from simple_grpo.algo.masks import mask_from_lengths

    with torch.no_grad():
        full_BC = completion_logprobs(model, batch.prompt_ids, batch.prompt_lens, batch.completion_ids,
                                      batch.completion_lens)
    m_BC = mask_from_lengths(batch.completion_lens, C)
    return RolloutBatch(**{**vars(batch), "meta": {"producer": "gen-0"}, "weight_version": 0,
                           "gen_logprobs_full": torch.where(m_BC, full_BC, 0.0),
                           "gen_logprobs": torch.where(m_BC, full_BC + NUCLEUS_GAP, 0.0)})


def rank_slice(batch: RolloutBatch, rank: int, world: int) -> RolloutBatch:
    n = B // world
    sl = slice(rank * n, (rank + 1) * n)
    return RolloutBatch(**{k: (v[sl] if isinstance(v, torch.Tensor) else v) for k, v in vars(batch).items()})


def worker(out_dir: Path) -> None:
    """Under torchrun: every preset x this world size's layouts; writes each rank's update and the
    step's metrics (reduced over ranks)."""
    import deepspeed
    from safetensors.torch import save_file

    from simple_grpo.models import build_tiny_model
    from simple_grpo.train import engine as eng
    from simple_grpo.train.loop import average
    from simple_grpo.train.policy_step import train_on_batch

    dist = eng.init_distributed()
    metrics = {}
    for preset in PRESETS:
        for name, (ranks, micro, is_late, *budget) in LAYOUTS.items():
            if ranks != dist.world_size:
                continue
            model = build_tiny_model(seed=1)
            init = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
            batch = late(fixed_batch(), model) if is_late else fixed_batch()
            per_rank = B // ranks
            cfg = eng.ds_config(ROOT / "ds_config.json", micro_batch=micro, grad_accum=per_rank // micro,
                                world_size=ranks, grad_clip=0.0, bf16=False)
            opt = torch.optim.SGD(model.parameters(), lr=1.0, momentum=0.0, weight_decay=0.0)
            engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=cfg)
            m, _ = train_on_batch(engine, rank_slice(batch, dist.rank, ranks), micro_batch=micro,
                                  num_iterations=1, loss_kw=loss_kw(preset), eos_ids=[EOS], overlong_filter=False,
                                  temperature=1.0, world_size=ranks, device=dist.device,
                                  weight_version=1 if is_late else 0, max_tokens=(budget or [0])[0])
            metrics[f"{preset}|{name}"] = average(m, dist)
            update = {k: (v.detach() - init[k]).contiguous() for k, v in engine.module.state_dict().items()}
            save_file(update, str(out_dir / f"{preset}|{name}|rank{dist.rank}.safetensors"))
    if dist.rank == 0:
        (out_dir / f"metrics{dist.world_size}.json").write_text(json.dumps(metrics))


def reference_gradient(preset: str) -> dict[str, torch.Tensor]:
    """The plain autograd gradient of the whole batch's loss (the fresh trainer batch)."""
    from simple_grpo.algo.logprobs import completion_logprobs
    from simple_grpo.algo.losses import policy_loss
    from simple_grpo.algo.masks import mask_from_lengths
    from simple_grpo.models import build_tiny_model

    model, batch, kw = build_tiny_model(seed=1), fixed_batch(), loss_kw(preset)
    mask_BC = mask_from_lengths(batch.completion_lens, C) & batch.loss_rows[:, None]
    num_seqs = int(mask_BC.any(1).sum())
    num_tokens = num_seqs * C if kw["agg"] == "seq-mean-token-sum-norm" else float(mask_BC.sum())
    logp_BC = completion_logprobs(model, batch.prompt_ids, batch.prompt_lens, batch.completion_ids,
                                  batch.completion_lens)
    loss, _ = policy_loss(logp_BC, None, batch.ref_logprobs, batch.advantages, mask_BC,
                          num_tokens=num_tokens, num_seqs=num_seqs, **kw)
    loss.backward()
    return {k: p.grad.detach().clone() for k, p in model.named_parameters()}


def launch(nproc: int, out: Path) -> None:
    from simple_grpo.train.engine import free_port, standalone_env

    env = standalone_env(OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu")
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--master_addr=127.0.0.1",
           f"--master_port={free_port()}", __file__, f"--worker={out}"]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    if r.returncode != 0:
        raise RuntimeError(f"torchrun --nproc_per_node={nproc} failed:\n{r.stderr[-3000:]}")


def measure(out: Path) -> dict:
    """-> {"cells": {preset: {layout: max abs gradient difference}}, "grad_max": {preset: max |g|},
    "metrics": {preset: {layout: {metric: value}}}}."""
    from safetensors.torch import load_file

    out.mkdir(parents=True, exist_ok=True)
    launch(1, out)
    launch(2, out)
    metrics = {**json.loads((out / "metrics1.json").read_text()), **json.loads((out / "metrics2.json").read_text())}
    result = {"cells": {}, "grad_max": {}, "metrics": {}}
    for preset in PRESETS:
        want = reference_gradient(preset)
        result["grad_max"][preset] = max(float(g.abs().max()) for g in want.values())
        result["cells"][preset], result["metrics"][preset] = {}, {}
        for name, (ranks, *_) in LAYOUTS.items():
            diff = 0.0
            for rank in range(ranks):
                got = load_file(str(out / f"{preset}|{name}|rank{rank}.safetensors"))  # update = -1 x gradient
                diff = max(diff, *(float((-got[k].double() - want[k].double()).abs().max()) for k in want))
            result["cells"][preset][name] = diff
            m = metrics[f"{preset}|{name}"]
            result["metrics"][preset][name] = {k: m[k] for k in METRICS if k in m}
    return result


def table(result: dict) -> str:
    names = list(LAYOUTS)
    lines = ["| preset | max \\|g\\| | " + " | ".join(names) + " |", "|---|---|" + "---|" * len(names)]
    for preset, cells in result["cells"].items():
        lines.append(f"| {preset} | {result['grad_max'][preset]:.2e} | "
                     + " | ".join(f"{cells[n]:.1e}" for n in names) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--out", default="out/conformance", help="folder for the ranks' updates")
    ap.add_argument("--json", help="also write the raw numbers here")
    args = ap.parse_args()
    if args.worker:
        return worker(Path(args.worker))
    result = measure(Path(args.out))
    print(table(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
