"""Activation ("gradient") checkpointing of the decoder layers that keeps the shared-prompt KV cache.

    grad_ckpt.enable(model)   # before deepspeed.initialize (--gradient_checkpointing=true)

Each decoder layer's forward is wrapped in `torch.utils.checkpoint.checkpoint(use_reentrant=False)`
when it runs with gradients: the forward keeps only each layer's inputs, and backward runs the
layer again to get its activations back. Forward passes without gradients (sampling, old
log-probs, evaluation) run the layers as they are, KV cache included.

Why not transformers' own `gradient_checkpointing_enable`: under it a layer that runs with
gradients drops its KV cache (`use_cache=False`, `cache=None`), because a cache that is appended to
inside a checkpointed layer would be appended to again when backward recomputes the layer. The
shared-prompt path of simple_grpo/algo/logprobs.py needs the cache: it runs each prompt once and its
completions on top of the prompt's keys/values. Its cache layers (`_PrefixLayer`) have an `update`
without side effects (they return cat(prefix, new) and store nothing), so running a layer twice is
harmless, and here the cache is passed through to the checkpointed layer unchanged. The layers are
found as transformers' `GradientCheckpointingLayer`s (every decoder layer of its models), whose
own checkpointing flag stays off.
"""
from __future__ import annotations

import functools

import torch
from torch.utils.checkpoint import checkpoint


def decoder_layers(model) -> list[torch.nn.Module]:
    """The outermost GradientCheckpointingLayer modules of `model` (its decoder layers)."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    found: list[torch.nn.Module] = []
    inside: set[str] = set()
    for name, module in model.named_modules():
        if any(name.startswith(prefix + ".") for prefix in inside):
            continue
        if isinstance(module, GradientCheckpointingLayer):
            found.append(module)
            inside.add(name)
    return found


def _checkpointed(forward):
    @functools.wraps(forward)
    def run(*args, **kwargs):
        if torch.is_grad_enabled():
            return checkpoint(forward, *args, use_reentrant=False, **kwargs)
        return forward(*args, **kwargs)

    run.simple_grpo_checkpointed = True
    return run


def enable(model) -> int:
    """Checkpoint every decoder layer of `model` in forward passes with gradients -> layers wrapped.
    Idempotent; raises ValueError for a model without recognisable decoder layers."""
    layers = decoder_layers(model)
    if not layers:
        raise ValueError(f"{type(model).__name__} has no transformers GradientCheckpointingLayer to "
                         f"checkpoint")
    for layer in layers:
        if not getattr(layer.forward, "simple_grpo_checkpointed", False):
            layer.forward = _checkpointed(layer.forward)  # an instance attribute: hooks stay outside
    return len(layers)


def is_enabled(model) -> bool:
    """Whether `enable` wrapped this model's decoder layers."""
    return any(getattr(layer.forward, "simple_grpo_checkpointed", False) for layer in decoder_layers(model))
