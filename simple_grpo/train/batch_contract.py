"""The batch contract (simple_grpo/wire/contract.py) of a TrainConfig: the trainer computes the one
it expects and every producer (the trainer's own rollouts, each generation worker) the one it
uploads, from the same config fields, so a worker started with other options is told apart.

`model_id` names the base model: it is computed once when the model is loaded, before any update
(a worker's later weight downloads and a resumed trainer's checkpoint do not change it)."""
from __future__ import annotations

import hashlib
import json

import torch

from simple_grpo.wire.contract import BatchContract

# field -> the trainer options a worker must share for it ("start workers with the trainer's ...")
FIXES: dict[str, str] = {
    "scale": "--preset and --scale",
    "rewards": "--rewards, --preset and --overlong_reward",
    "dynamic_sampling": "--preset and --dynamic_sampling",
    "filter_metric": "--filter_metric and --eval_reward",
    "max_new_tokens": "--max_new_tokens",
    "min_new_tokens": "--min_new_tokens",
    "top_p": "--top_p",
    "temperature": "--temperature",
    "group_size": "--num_generations",
    "overlong_cache": "--overlong_cache and --max_new_tokens",
    "model": "--model",
}


def model_id(model) -> str:
    """16 hex digits of the sha256 of models.fingerprint(model) (architecture sizes and 64 embedding
    values), the values rounded to bfloat16 so an fp32 and a bf16 copy of one checkpoint agree (an
    fp16 copy may not: fp16 then bf16 rounds twice). A PEFT-wrapped model gives its base's."""
    from simple_grpo.models import fingerprint

    fp = fingerprint(model)
    probe = torch.tensor(fp["probe"], dtype=torch.float32).bfloat16().float().tolist()
    text = json.dumps({"arch": fp["arch"], "probe": probe}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def rewards_text(specs) -> str:
    """The reward specs in order as "name:weight,..." (weights as Python floats: 1 -> 1.0)."""
    return ",".join(f"{s.name}:{float(s.weight)!r}" for s in specs)


def overlong_cache(cfg) -> int:
    """--overlong_cache, or the default reward_registry.soft_overlong_punishment takes for None."""
    from simple_grpo.train.reward_registry import DEFAULT_OVERLONG_CACHE_FRACTION

    if cfg.overlong_cache is not None:
        return int(cfg.overlong_cache)
    return max(1, round(DEFAULT_OVERLONG_CACHE_FRACTION * cfg.max_new_tokens))


def expected_contract(cfg, specs, model: str) -> BatchContract:
    """The contract of batches made with resolved config `cfg`, reward specs `specs`
    (loop.reward_specs(cfg)) and a model whose `model_id` is `model`. Without dynamic sampling
    the filter metric is "off" (it changes nothing then)."""
    from simple_grpo.train.config import dynamic_filter_metric

    dynamic = bool(cfg.dynamic_sampling)
    return BatchContract(scale=str(cfg.scale), rewards=rewards_text(specs), dynamic_sampling=dynamic,
                         filter_metric=dynamic_filter_metric(cfg, specs) if dynamic else "off",
                         max_new_tokens=int(cfg.max_new_tokens), min_new_tokens=int(cfg.min_new_tokens),
                         top_p=float(cfg.top_p), temperature=float(cfg.temperature),
                         group_size=int(cfg.num_generations), overlong_cache=overlong_cache(cfg),
                         model=model)
