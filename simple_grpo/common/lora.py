"""LoRA through PEFT (`--lora_r=N`): only small adapter matrices are trained, the base model stays
frozen.

    model = lora.wrap(model, cfg, seed)       # PeftModel; B = 0, so it computes exactly `model`
    lora.reference_logprobs(engine, batch, ...)  # the base model: the same weights, adapter off
    lora.adapter_state_dict(model)            # what is checkpointed and published (megabytes)
    lora.published_params(model, metadata)    # a worker: which of its tensors a file fills
    lora.export_options(model)                # final/: the merged model + final/adapter/ (PEFT)

The reference model of a LoRA run is its own base model: with no --ref_url, reference log-probs are
computed in the trainer with the adapter disabled (no second copy of the model, no server). Every
process that wraps with the same config and seed gets the same adapter, so trainer ranks and
generation workers agree before the first publish. Published files carry the metadata
`format=lora-adapter` and the adapter's settings, so a worker started without the trainer's LoRA
options fails with one line instead of loading a wrong model.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from simple_grpo.errors import UserError

ALL_LINEAR = "all-linear"  # PEFT: every linear layer except the output layer
ADAPTER_FORMAT = "lora-adapter"  # the `format` metadata of a published adapter
ADAPTER = "default"  # PEFT's adapter name
_FIX = "start workers with the trainer's --lora_r, --lora_alpha and --lora_target_modules"


def target_modules(spec: str) -> str | list[str]:
    """--lora_target_modules: 'all-linear' or comma-separated module names (q_proj,v_proj,...)."""
    spec = spec.strip()
    if spec == ALL_LINEAR:
        return spec
    names = [n.strip() for n in spec.split(",") if n.strip()]
    if not names:
        raise UserError(f"--lora_target_modules must be {ALL_LINEAR} or module names like "
                        f"q_proj,v_proj, got {spec!r}")
    return names


def wrap(model, cfg, seed: int):
    """`model` with a fresh LoRA adapter from cfg.lora_* (base weights frozen), initialised from
    `seed` without touching the caller's random streams."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                        target_modules=target_modules(cfg.lora_target_modules), task_type="CAUSAL_LM")
    cuda = [d for d in {p.device for p in model.parameters()} if d.type == "cuda"]
    with torch.random.fork_rng(devices=cuda):
        torch.manual_seed(seed)
        try:  # adapter weights in the base dtype: the trainer (DeepSpeed bf16) and workers agree
            return get_peft_model(model, config, autocast_adapter_dtype=False)
        except ValueError as e:  # e.g. target modules not found in the model
            first = str(e).strip().splitlines()[0]
            raise UserError(f"--lora_target_modules={cfg.lora_target_modules}: {first}") from None


def is_peft(module) -> bool:
    return getattr(getattr(module, "module", module), "peft_config", None) is not None


def adapter_state_dict(module) -> dict[str, torch.Tensor]:
    """The adapter's tensors by their names in `module` (a PeftModel)."""
    return {k: v for k, v in module.state_dict().items() if "lora_" in k}


def settings(module) -> dict:
    """r, alpha and the (resolved) target modules of a PeftModel's adapter."""
    c = module.peft_config[ADAPTER]
    targets = c.target_modules if isinstance(c.target_modules, str) else \
        sorted({t.rsplit(".", 1)[-1] for t in c.target_modules})  # the layer names, not every path
    return {"r": c.r, "lora_alpha": c.lora_alpha, "target_modules": targets}


def resume_settings(module) -> dict | None:
    """What a resumed run must match: `settings` plus the dropout (it changes training, not what a
    worker computes); None without LoRA. Saved with every checkpoint, checked by check_resume."""
    module = getattr(module, "module", module)
    if not is_peft(module):
        return None
    return {**settings(module), "lora_dropout": module.peft_config[ADAPTER].lora_dropout}


def check_resume(saved: dict | None, module) -> None:
    """UserError when the checkpoint's adapter settings differ from this run's: another
    --lora_alpha or --lora_dropout loads without a shape error but trains another model."""
    ours = resume_settings(module)
    if saved is None or ours is None:  # no LoRA, or a checkpoint from before settings were saved
        return
    diff = [k for k in ours if saved.get(k) != ours[k]]
    show = lambda v: f"{v:g}" if isinstance(v, float) else v  # noqa: E731
    if diff:
        raise UserError("the checkpoint's LoRA adapter was trained with " +
                        ", ".join(f"--{k}={show(saved.get(k))} (this run: {show(ours[k])})" for k in diff) +
                        ": resume with the run's --model and --lora_* options")


def publish_metadata(module) -> dict[str, str]:
    """Extra safetensors metadata of a published snapshot: the adapter marker, or nothing."""
    if not is_peft(module):
        return {}
    return {"format": ADAPTER_FORMAT, "lora": json.dumps(settings(module))}


def published_params(model, metadata: dict[str, str]) -> dict[str, torch.Tensor]:
    """The tensors of a worker's `model` that a published file with `metadata` fills: the adapter
    (a LoRA run) or the whole state dict; UserError when the file and the model do not match."""
    adapter = metadata.get("format") == ADAPTER_FORMAT
    if adapter and not is_peft(model):
        theirs = json.loads(metadata.get("lora", "{}"))
        raise UserError(f"the trainer publishes a LoRA adapter (r={theirs.get('r')}, "
                        f"alpha={theirs.get('lora_alpha')}) and this worker has no LoRA: {_FIX}")
    if not adapter and is_peft(model):
        raise UserError("the trainer publishes full weights (no LoRA) but this worker has "
                        "--lora_r > 0: start it with the trainer's options (--lora_r=0)")
    if not adapter:
        return model.state_dict()
    theirs, ours = json.loads(metadata.get("lora", "{}")), settings(model)
    if theirs != ours:
        raise UserError(f"the trainer's LoRA adapter {theirs} differs from this worker's {ours}: {_FIX}")
    return adapter_state_dict(model)


@torch.no_grad()
def reference_logprobs(engine, batch, *, micro_batch: int, temperature: float, device,
                       max_logits_bytes: int = 1 << 30, max_tokens: int = 0) -> torch.Tensor:
    """Reference log-probs [B, C] (CPU) of `batch`: the policy's base model, adapter disabled, over
    the trainer's micro-batches (packing.plan: fixed, or budgeted by `max_tokens`)."""
    from simple_grpo.algo import packing
    from simple_grpo.algo.logprobs import completion_logprobs

    from simple_grpo.common.dropout import eval_mode

    module = getattr(engine, "module", engine)
    parts = []
    with module.disable_adapter(), eval_mode(module):  # the base model, without dropout
        for mb in packing.plan(batch, micro_batch=micro_batch, max_tokens=max_tokens):
            parts.append((mb, completion_logprobs(  # no gradients: the module itself, not the engine
                module, *mb.inputs(batch, device), temperature=temperature,
                max_logits_bytes=max_logits_bytes)))
    return packing.scatter(parts, batch.batch_size, batch.completion_ids.shape[1])


@torch.no_grad()
def merged_state_dict(module) -> dict[str, torch.Tensor]:
    """The base model's state dict with each adapter merged in (W + B A * alpha / r) under the
    plain model's names, computed beside the model (which stays as it is)."""
    from peft.tuners.lora import LoraLayer

    base = module.get_base_model()
    out = {k.replace(".base_layer.", "."): v for k, v in base.state_dict().items() if "lora_" not in k}
    for name, layer in base.named_modules():
        if isinstance(layer, LoraLayer) and ADAPTER in layer.lora_A:
            out[f"{name}.weight"] = layer.base_layer.weight + layer.get_delta_weight(ADAPTER)
    return out


def export_options(model) -> dict:
    """checkpoint.export_pretrained's options for `model`: for a PeftModel, `save` writes the
    merged model (what from_pretrained loads) and the adapter in PEFT's format in adapter/."""
    module = getattr(model, "module", model)
    if not is_peft(module):
        return {}

    def save(folder: Path) -> None:
        module.get_base_model().save_pretrained(folder, state_dict=merged_state_dict(module))
        module.save_pretrained(Path(folder) / "adapter")

    return {"save": save}


def _frozen_names(module) -> set[str]:
    return {n for n, p in module.named_parameters(remove_duplicate=False) if not p.requires_grad}


def checkpoint_save_kwargs(engine) -> dict:
    """Frozen parameters (a LoRA run's base model) never change: DeepSpeed leaves them out of the
    checkpoint (--model has them), which is then adapter-sized. DeepSpeed's exclusion misses a
    second name of a tied frozen weight (lm_head = embeddings): the engine's module_state_dict
    is wrapped once to drop those too."""
    frozen = _frozen_names(engine.module)
    if not frozen:
        return {}
    if not getattr(engine, "_simple_grpo_slim", False):
        full = engine.module_state_dict

        def slim(*args, **kwargs):
            sd = full(*args, **kwargs)
            for name in frozen if kwargs.get("exclude_frozen_parameters") else ():
                sd.pop(name, None)
            return sd

        engine.module_state_dict, engine._simple_grpo_slim = slim, True
    return {"exclude_frozen_parameters": True}


def load_module(src: dict, dst) -> None:
    """DeepSpeed's custom_load_fn: load a checkpoint's module state; every trainable parameter
    must be in it and frozen ones may be missing, else a UserError (other --lora_* options)."""
    fix = "resume with the run's --model and --lora_* options"
    frozen = _frozen_names(dst)
    try:
        missing, unexpected = dst.load_state_dict(src, strict=False)
    except RuntimeError as e:  # shapes differ (another --lora_r)
        first = next((x.strip() for x in str(e).splitlines() if "size mismatch" in x), str(e)[:200])
        raise UserError(f"the checkpoint does not fit this model ({first}): {fix}") from None
    if unexpected or set(missing) - frozen:
        bad = sorted(unexpected)[:2] + sorted(set(missing) - frozen)[:2]
        raise UserError(f"the checkpoint does not fit this model ({len(unexpected)} unexpected, "
                        f"{len(set(missing) - frozen)} missing tensors, e.g. {bad}): {fix}")
