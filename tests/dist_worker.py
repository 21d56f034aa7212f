"""Launched by tests/test_distributed.py under torchrun: for every case in CASES, one optimizer step
of `train_on_batch` on a fixed batch split over the ranks, through a real DeepSpeed ZeRO-2 engine
built from the trainer's own DeepSpeed config (micro-batches, gradient accumulation > 1).

The optimizer is plain SGD (lr LR, no momentum, no weight decay, no clipping), so the update is
exactly -LR * gradient: the test reads the gradient DeepSpeed applied from the weights, which AdamW
would hide (its first step is about lr * sign(g), blind to a uniform scale). Each rank writes its
initial and final parameters per case, and rank 0 the step's metrics reduced over the ranks."""
import json
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from simple_grpo.models import build_tiny_model  # noqa: E402
from simple_grpo.train import engine as eng  # noqa: E402
from simple_grpo.train.loop import average  # noqa: E402
from simple_grpo.train.policy_step import train_on_batch  # noqa: E402
from simple_grpo.wire.codec import RolloutBatch  # noqa: E402

B, P, C, MICRO, EOS, LR = 8, 5, 6, 2, 2, 0.1
# name -> (aggregation, num_iterations, overlong filter): every aggregation mode with ranks that
# hold unequal token and (with the filter) unequal sequence counts; two passes record old log-probs
CASES = {
    "seq_mean_token_mean": ("seq-mean-token-mean", 1, True),
    "token_mean": ("token-mean", 1, True),
    "seq_mean_token_sum_norm": ("seq-mean-token-sum-norm", 1, True),
    "token_mean_two_passes": ("token-mean", 2, False),
    "seq_mean_token_mean_two_passes": ("seq-mean-token-mean", 2, True),
}
# the same cases with budgeted micro-batches (--max_tokens_per_micro_batch): rows re-ordered and
# trimmed, and (2 ranks) 3 vs 4 micro-batches at budget 12, 3 vs 2 at 16, so one rank runs fillers
BUDGETS = {"seq_mean_token_mean": 12, "token_mean": 12, "seq_mean_token_sum_norm": 12,
           "seq_mean_token_mean_two_passes": 16}
CASES.update({f"{name}_budget": CASES[name] for name in BUDGETS})
TRUNCATED_ROWS = (5, 6, 7)  # no EOS: the overlong filter drops them, all on rank 1 of 2
LOSS_KW = dict(eps_low=0.2, eps_high=0.28, beta=0.04, kl="k3", ratio_level="token", max_tokens=C,
               pg_loss="clip", tau_pos=1.0, tau_neg=1.05, clip_ratio_c=None)


def fixed_batch(seed: int = 0) -> RolloutBatch:
    """B rows; every row ends with EOS except TRUNCATED_ROWS (full width, no EOS). Lengths differ,
    so rank 0 (rows 0-3) and rank 1 (rows 4-7) of a 2-rank run hold different token counts."""
    g = torch.Generator().manual_seed(seed)
    lens_B = torch.randint(1, C + 1, (B,), generator=g)
    ids_BC = torch.randint(3, 250, (B, C), generator=g)
    for i in range(B):
        if i in TRUNCATED_ROWS:
            lens_B[i] = C
        else:
            ids_BC[i, lens_B[i] - 1] = EOS
    return RolloutBatch(prompt_ids=torch.randint(3, 250, (B, P), generator=g),
                        prompt_lens=torch.randint(1, P + 1, (B,), generator=g),
                        completion_ids=ids_BC, completion_lens=lens_B, rewards=torch.zeros(B),
                        advantages=torch.randn(B, generator=g),
                        ref_logprobs=-torch.rand(B, C, generator=g) * 5)


def rank_slice(batch: RolloutBatch, rank: int, world: int) -> RolloutBatch:
    n = B // world
    sl = slice(rank * n, (rank + 1) * n)
    return RolloutBatch(**{k: (v[sl] if isinstance(v, torch.Tensor) else v) for k, v in vars(batch).items()})


def sgd_engine(model, world_size: int):
    """The trainer's DeepSpeed config (ZeRO-2, accumulation over micro-batches), with plain SGD."""
    import deepspeed

    per_rank = B // world_size
    cfg = eng.ds_config(ROOT / "ds_config.json", micro_batch=MICRO, grad_accum=per_rank // MICRO,
                        world_size=world_size, grad_clip=0.0, bf16=False)
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.0, weight_decay=0.0)
    engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=cfg)
    return engine


def main(out_dir: str) -> None:
    dist = eng.init_distributed()
    metrics = {}
    for name, (agg, iterations, overlong_filter) in CASES.items():
        torch.manual_seed(0)
        model = build_tiny_model(seed=1)
        init = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
        engine = sgd_engine(model, dist.world_size)
        part = rank_slice(fixed_batch(), dist.rank, dist.world_size)
        budget = BUDGETS[name[:-len("_budget")]] if name.endswith("_budget") else 0
        m, _ = train_on_batch(engine, part, micro_batch=MICRO, num_iterations=iterations, max_tokens=budget,
                              loss_kw=dict(LOSS_KW, agg=agg), eos_ids=[EOS], overlong_filter=overlong_filter,
                              temperature=1.0, world_size=dist.world_size, device=dist.device)
        metrics[name] = average(m, dist)
        final = {k: v.detach().clone().contiguous() for k, v in engine.module.state_dict().items()}
        save_file(init, str(Path(out_dir) / f"{name}.init.rank{dist.rank}.safetensors"))
        save_file(final, str(Path(out_dir) / f"{name}.rank{dist.rank}.safetensors"))
    if dist.rank == 0:
        (Path(out_dir) / "metrics.json").write_text(json.dumps(metrics))


if __name__ == "__main__":
    main(sys.argv[1])
