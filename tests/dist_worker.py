"""Launched by tests/test_distributed.py under torchrun: one DeepSpeed ZeRO-2 step of
`train_on_batch` on a fixed batch, split over the ranks; each rank writes its parameters."""
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from simple_grpo.algo.losses import PRESETS  # noqa: E402
from simple_grpo.models import build_tiny_model  # noqa: E402
from simple_grpo.train import engine as eng  # noqa: E402
from simple_grpo.train.policy_step import train_on_batch  # noqa: E402
from simple_grpo.wire.codec import RolloutBatch  # noqa: E402


def fixed_batch(B=8, P=5, C=6, seed=0) -> RolloutBatch:
    g = torch.Generator().manual_seed(seed)
    c_lens = torch.randint(1, C + 1, (B,), generator=g)
    return RolloutBatch(prompt_ids=torch.randint(3, 250, (B, P), generator=g),
                        prompt_lens=torch.randint(1, P + 1, (B,), generator=g),
                        completion_ids=torch.randint(3, 250, (B, C), generator=g),
                        completion_lens=c_lens, rewards=torch.zeros(B),
                        advantages=torch.randn(B, generator=g),
                        ref_logprobs=-torch.rand(B, C, generator=g) * 5)


def main(out_dir: str, preset: str, iterations: int) -> None:
    dist = eng.init_distributed()
    torch.manual_seed(0)
    model = build_tiny_model(seed=1)
    B, micro = 8, 2
    per_rank = B // dist.world_size
    cfg = eng.ds_config(Path(__file__).resolve().parents[1] / "ds_config.json", micro_batch=micro,
                        grad_accum=per_rank // micro, world_size=dist.world_size, grad_clip=1.0, bf16=False)
    engine = eng.build_engine(model, lr=1e-2, weight_decay=0.0, warmup_steps=1, config=cfg)
    full = fixed_batch(B)
    sl = slice(dist.rank * per_rank, (dist.rank + 1) * per_rank)
    part = RolloutBatch(**{k: (v[sl] if isinstance(v, torch.Tensor) else v) for k, v in vars(full).items()})
    p = PRESETS[preset]
    loss_kw = dict(eps_low=p["eps_low"], eps_high=p["eps_high"], beta=0.04, kl=p["kl"], agg=p["agg"],
                   max_tokens=6, ratio_level=p["ratio_level"])
    train_on_batch(engine, part, micro_batch=micro, num_iterations=iterations, loss_kw=loss_kw,
                   eos_ids=[2], overlong_filter=False, temperature=1.0, world_size=dist.world_size,
                   device=dist.device)
    state = {k: v.detach().clone().contiguous() for k, v in engine.module.state_dict().items()}
    save_file(state, str(Path(out_dir) / f"rank{dist.rank}.safetensors"))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]))
