"""Dropout only where it trains.

Sampling, the old policy's log-probs, TIS's pi_old and the reference (a LoRA run's adapter-off
pass) must see the policy itself, not one random mask of it: those passes run under `eval_mode`.
The training forward keeps whatever dropout is configured (--lora_dropout on the adapters' input;
the base model's own dropout unless --disable_dropout, the default, sets it to 0 as TRL's
`disable_dropout` does: a policy whose forward is random differs from the one that sampled).
"""
from __future__ import annotations

from contextlib import contextmanager

import torch

_ATTR_NAMES = ("attention_dropout", "attn_dropout", "dropout_rate")  # floats read in forward()
_LORA = "lora_dropout"  # PEFT's adapter dropout: --lora_dropout, left as configured


def active(module: torch.nn.Module) -> bool:
    """True when a training-mode forward of `module` would drop anything: an nn.Dropout with
    p > 0, or a float dropout rate an attention module reads in its forward."""
    if not isinstance(module, torch.nn.Module):  # a stand-in engine in tests: nothing to drop
        return False
    for m in module.modules():
        if isinstance(m, torch.nn.modules.dropout._DropoutNd) and m.p > 0:
            return True
        if any(isinstance(getattr(m, a, None), float) and getattr(m, a) > 0 for a in _ATTR_NAMES):
            return True
    return False


def disable(model: torch.nn.Module) -> int:
    """Set the base model's own dropout to 0 (nn.Dropout modules, attention dropout rates and the
    config's *dropout / *pdrop fields); LoRA's adapter dropout is kept. -> how many were > 0."""
    changed = 0
    for name, m in model.named_modules():
        if _LORA in name:
            continue
        if isinstance(m, torch.nn.modules.dropout._DropoutNd) and m.p > 0:
            m.p, changed = 0.0, changed + 1
        for a in _ATTR_NAMES:
            if isinstance(getattr(m, a, None), float) and getattr(m, a) > 0:
                setattr(m, a, 0.0)
                changed += 1
    config = getattr(model, "config", None)
    for key, value in (vars(config).items() if config is not None else ()):
        if (key.endswith("dropout") or key.endswith("pdrop")) and isinstance(value, float) and value > 0:
            setattr(config, key, 0.0)
    return changed


@contextmanager
def eval_mode(module: torch.nn.Module):
    """`module` in eval mode (no dropout) inside the block, its previous mode after."""
    was_training = module.training
    module.eval()
    try:
        yield module
    finally:
        module.train(was_training)
