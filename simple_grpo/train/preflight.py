"""`python grpo_ref_split.py --check [the run's options]`: what this launch needs and what it has,
before anything slow. It loads no weights (the model is built from its config on the meta device),
starts no server and joins no process group; under `torchrun` / `deepspeed` rank 0 prints it for
the node's ranks (WORLD_SIZE, LOCAL_WORLD_SIZE).

One table: ranks and devices; per training device, the memory the weights, gradients, optimizer
states, activations and sampling's KV cache need (from the model's config, ZeRO-2 shards over the
ranks) against what is free; the reference server (reachable, the same model, the token) or where
one would start; /dev/shm; flash-attn; the publish size against the server's limit; disk for
checkpoints. A blocker is one line with its fix, and the exit code is 2; warnings do not block.

Memory arithmetic per training device, P parameters (T of them trained: all, or LoRA's adapters),
b bytes per weight (2 in bf16, 4 in fp32), W ranks, S = prompt + --max_new_tokens positions (the
prompt: the longest of the task's training prompts, up to 100,000 of them, rendered and tokenized
as the trainer does; 256 tokens assumed when the tokenizer or the task cannot be read),
m = --micro_batch_size rows, hidden H, L layers:
  weights P*b; gradients 4*T/W (ZeRO-2's fp32 partition) + the reduce bucket (5e7 elements, b each);
  AdamW 12*T/W (fp32 master, two moments; 0 with --offload_optimizer); activations
  34*S*m*H*L*b/2 (sdpa or flash, no S^2 term), with --gradient_checkpointing 2*S*m*H*L*b/2 + one
  layer's; logits --max_logits_mb; sampling (the trainer generating) 2*L*kv_heads*head_dim*S*rows*b.
The activation term is the coarse one (Korthikanti et al. 2022, per layer 34*S*m*H bytes in 16-bit).
"""
from __future__ import annotations

import importlib.util
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

PROMPT_TOKENS = 256  # the prompt length assumed when the task's prompts cannot be measured
PROMPT_SAMPLE = 100_000  # training prompts measured (a seeded sample of larger tasks)
PROMPT_RENDERED = 32  # of them, the longest questions rendered with the chat template
GiB = 2**30


@dataclass
class Row:
    what: str
    need: str
    have: str
    status: str = "ok"  # ok | info | WARN | BLOCKER
    fix: str = ""


def model_shape(cfg) -> dict:
    """Parameter count and the shape numbers of --model, from its config on the meta device."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from simple_grpo import models

    if cfg.model == models.BUNDLED and not models.bundled_converted():
        gguf = models.bundled_gguf()  # not converted yet: its config from the GGUF's header
        conf = AutoConfig.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    else:
        conf = AutoConfig.from_pretrained(models.resolve_model_path(cfg.model), **models.hub_options(cfg))
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(conf)
    params = sum(p.numel() for p in model.parameters())  # tied weights once
    linear = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    lora = sum(cfg.lora_r * (m.in_features + m.out_features) for m in linear
               if not m.out_features == getattr(conf, "vocab_size", -1))  # all-linear minus the head
    text = conf.get_text_config() if hasattr(conf, "get_text_config") else conf
    heads = text.num_attention_heads
    return {"params": params, "trained": lora if cfg.lora_r > 0 else params, "hidden": text.hidden_size,
            "layers": text.num_hidden_layers, "kv_heads": getattr(text, "num_key_value_heads", None) or heads,
            "head_dim": getattr(text, "head_dim", None) or text.hidden_size // heads,
            "vocab": text.vocab_size}


def prompt_tokens(cfg) -> tuple[int | None, str]:
    """The longest training prompt in tokens -> (tokens, where the number comes from). Every example
    (up to PROMPT_SAMPLE, a seeded sample of larger tasks) has its question (and its own system
    prompt, if any) tokenized; the PROMPT_RENDERED longest are rendered (system prompt, chat
    template) and tokenized as the trainer does, since the template adds the same text around
    every question. (None, why) when the tokenizer or the task cannot be read (a model folder
    holding only its config)."""
    import random

    from transformers import AutoTokenizer

    from simple_grpo import models
    from simple_grpo.errors import UserError
    from simple_grpo.gen import data

    try:
        if cfg.model == models.BUNDLED and not models.bundled_converted():
            gguf = models.bundled_gguf()  # not converted yet: the tokenizer from the GGUF
            tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        else:
            tok = models.load_tokenizer(cfg.model, **models.hub_options(cfg))
        examples = data.load_examples(cfg.task, "train", seed=cfg.seed, question_field=cfg.question_field,
                                      answer_field=cfg.answer_field)
        if len(examples) > PROMPT_SAMPLE:
            examples = random.Random(cfg.seed).sample(examples, PROMPT_SAMPLE)
        texts = [ex["question"] + " " + ex.get("_system_prompt", "") for ex in examples]
        sizes = [len(ids) for ids in tok(texts, add_special_tokens=False).input_ids]
        top = sorted(range(len(examples)), key=lambda i: -sizes[i])[:PROMPT_RENDERED]
        render = data.prompt_renderer(tok, cfg.system_prompt, cfg.chat_template_kwargs)
        longest = max(len(tok(render(examples[i]), add_special_tokens=False).input_ids) for i in top)
    except (UserError, OSError, ValueError) as e:  # the launch itself says these in full
        why = (str(e).splitlines() or [type(e).__name__])[0][:240]
        return None, why
    return longest, f"the longest of {len(examples):,} of the task's prompts"  # all, up to the sample


def memory_need(cfg, shape: dict, world: int, bytes_per_weight: int,
                prompt: int = PROMPT_TOKENS) -> dict[str, float]:
    """Bytes per training device, by part (module docstring), for prompts of `prompt` tokens."""
    P, T, H, L, b = shape["params"], shape["trained"], shape["hidden"], shape["layers"], bytes_per_weight
    S, m = prompt + cfg.max_new_tokens, cfg.micro_batch_size
    per_layer = 34 * S * m * H * b / 2
    act = (2 * S * m * H * L * b / 2 + per_layer) if cfg.gradient_checkpointing else per_layer * L
    rows = cfg.prompts_per_step // max(world, 1) * cfg.num_generations
    sampling = 2 * L * shape["kv_heads"] * shape["head_dim"] * S * rows * b if cfg.generate_locally else 0.0
    return {"weights": P * b, "gradients": 4 * T / world + min(5e7, T) * b,
            "optimizer": 0.0 if cfg.offload_optimizer else 12 * T / world,
            "activations": act + (cfg.max_logits_mb << 20), "sampling KV cache": sampling}


def _free_ram() -> float:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return float(line.split()[1]) * 1024
    except OSError:
        pass
    return float("nan")


def _gb(x: float) -> str:
    return f"{x / GiB:.1f} GiB"


def device_rows(cfg, shape: dict, world: int, local: int) -> list[Row]:
    from simple_grpo.models import resolve_dtype
    from simple_grpo.train import ref_process

    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    kind = "cuda" if gpus else "cpu"
    b = resolve_dtype(cfg.dtype, kind).itemsize
    rows = [Row("ranks and devices", f"{world} rank(s), {local} on this node",
                f"{gpus} GPU(s)" if gpus else f"CPU, {os.cpu_count()} cores", "info")]
    backend = ("nccl" if gpus else "gloo") if cfg.dist_backend == "auto" else cfg.dist_backend
    if gpus and "nccl" in backend and local > gpus:
        rows.append(Row("a GPU per rank (NCCL)", f"{local}", f"{gpus}", "BLOCKER",
                        "fewer ranks per node, or --dist_backend=gloo (slow)"))
    prompt, measured = prompt_tokens(cfg)
    assumed = prompt is None  # the launch reads the tokenizer and the task too: it would stop there
    if assumed:
        prompt, measured = PROMPT_TOKENS, f"{PROMPT_TOKENS} assumed ({measured})"
    rows.append(Row("prompt tokens (memory estimate)", measured, f"{prompt:,} + --max_new_tokens "
                    f"{cfg.max_new_tokens} positions a row", "WARN" if assumed else "info",
                    "the launch renders prompts the same way: fix what the row says" if assumed else ""))
    need = memory_need(cfg, shape, world, b, prompt)
    total = sum(need.values())
    parts = ", ".join(f"{k} {_gb(v)}" for k, v in need.items() if v)
    if gpus:
        free = min(torch.cuda.mem_get_info(i)[0] for i in range(min(local, gpus)))
        where = "free on the emptiest training GPU"
    else:
        free = _free_ram() / max(local, 1)
        where = f"of available RAM per rank ({local} rank(s))"
    ok = not free < total
    rows.append(Row(f"memory per training {kind}", f"{_gb(total)} ({parts}; {shape['params'] / 1e9:.2f}B "
                    f"params, {b}-byte weights)", f"{_gb(free)} {where}", "ok" if ok else "BLOCKER",
                    "" if ok else "--gradient_checkpointing, a smaller --micro_batch_size, --lora_r=16, "
                    "--offload_optimizer or more ranks (docs/gpus.md#fitting-a-model-on-your-gpus)"))
    needs_ref = (cfg.beta > 0 and cfg.lora_r == 0) or cfg.overlap == "true"
    if needs_ref and not cfg.ref_url:
        try:
            device = ref_process.place(cfg.ref_device, local, gpus)
            copies = 2 if cfg.overlap == "true" else 1  # the sampler's policy beside the reference
            rows.append(Row("reference server (started by the trainer)",
                            f"{_gb(copies * shape['params'] * b)} on {device}",
                            _gb(torch.cuda.mem_get_info(torch.device(device))[0]) + " free"
                            if device.startswith("cuda") else "CPU RAM", "info"))
        except Exception as e:  # noqa: BLE001 -- place() raises UserError with its fix
            rows.append(Row("reference server (started by the trainer)", "a device", "none left",
                            "BLOCKER", str(e)))
    return rows


def server_rows(cfg, shape: dict) -> list[Row]:
    from simple_grpo.wire.client import RefClient, RefServerAuthError, RefServerError, RefServerUnavailable

    if not cfg.ref_url:
        return []
    client = RefClient(cfg.ref_url, token=cfg.ref_token, retries=0, timeout=5.0)
    try:
        health = client.health()
    except RefServerAuthError:
        return [Row("reference server", cfg.ref_url, "answers", "ok"),
                Row("token", "the server's", "refused", "BLOCKER", "--ref_token (or GRPO_REF_TOKEN)")]
    except (RefServerUnavailable, RefServerError) as e:
        why = " ".join(str(e).split())[-80:]
        return [Row("reference server", cfg.ref_url, "unreachable", "BLOCKER",
                    f"start ref_server.py there, or fix --ref_url (...{why})")]
    rows = [Row("reference server", cfg.ref_url, f"serves {health.get('model')} on {health.get('device')}")]
    if Path(str(health.get("model"))).name != Path(cfg.model).name:
        rows.append(Row("the same model", cfg.model, str(health.get("model")), "WARN",
                        "names differ: the trainer compares the weights themselves at start"))
    try:
        client.stats()
        rows.append(Row("token", "accepted" if health.get("auth") else "none needed", "ok"))
    except RefServerAuthError:
        rows.append(Row("token", "the server's", "refused", "BLOCKER", "--ref_token (or GRPO_REF_TOKEN)"))
    if cfg.publish_every > 0:
        b = 2 if cfg.publish_dtype in ("bfloat16", "auto") and torch.cuda.is_available() else 4
        size, limit = shape["trained"] * b if cfg.lora_r > 0 else shape["params"] * b, health.get("max_weights_bytes")
        ok = limit is None or size <= limit
        rows.append(Row("publish size (workers' weights)", f"{size / 2**20:,.0f} MiB",
                        f"server limit {limit / 2**20:,.0f} MiB" if limit else "no limit",
                        "ok" if ok else ("BLOCKER" if not cfg.generate_locally else "WARN"),
                        "" if ok else "restart the server without --max_weights_mb (auto), or "
                        "--publish_dtype=bfloat16"))
    return rows


def host_rows(cfg, shape: dict, world: int, run_dir: Path) -> list[Row]:
    rows = []
    if os.path.isdir("/dev/shm"):
        free = shutil.disk_usage("/dev/shm").free
        low = world > 1 and torch.cuda.is_available() and free < 512 * 2**20
        rows.append(Row("/dev/shm", "512 MiB for NCCL with several ranks" if world > 1 else "-",
                        f"{free / 2**20:,.0f} MiB free", "WARN" if low else "ok",
                        "docker run --shm-size=8g (or --ipc=host)" if low else ""))
    flash = importlib.util.find_spec("flash_attn") is not None
    wants = cfg.attn_implementation == "flash_attention_2"
    rows.append(Row("flash-attn", "--attn_implementation=flash_attention_2" if wants else "optional (sdpa otherwise)",
                    "installed" if flash else "not installed", "BLOCKER" if wants and not flash else "ok",
                    "pip install -r requirements-gpu.txt, or --attn_implementation=sdpa" if wants and not flash else ""))
    if cfg.save_every >= 0:
        one = shape["params"] * 2 + 12 * shape["trained"]  # bf16/fp32 weights + fp32 master and moments
        keep = (cfg.keep_last or 1) + 1  # the new one is written before the oldest is deleted
        folder = run_dir
        while not folder.exists() and folder != folder.parent:
            folder = folder.parent
        free = shutil.disk_usage(folder).free
        status = "BLOCKER" if free < one else ("WARN" if free < keep * one else "ok")
        rows.append(Row("disk for checkpoints", f"{_gb(one)} each, {keep} at once (--keep_last)",
                        f"{_gb(free)} free in {folder}", status,
                        "" if status == "ok" else "free space, another --run_dir, or a lower --keep_last"))
    return rows


def report(cfg, run_dir: Path) -> tuple[list[Row], int]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("LOCAL_SIZE", str(world))))
    shape = model_shape(cfg)
    rows = device_rows(cfg, shape, world, local) + server_rows(cfg, shape) + host_rows(cfg, shape, world, run_dir)
    return rows, 2 if any(r.status == "BLOCKER" for r in rows) else 0


def run(cfg, run_dir: Path) -> dict:
    """The options' own checks (divisibility, inputs, the run folder), then the table (rank 0
    prints it); exit 2 on a blocker, each blocker one line with its fix."""
    import sys

    from simple_grpo.common.config import derive
    from simple_grpo.errors import UserError
    from simple_grpo.train import inputs, loop

    derive(cfg, int(os.environ.get("WORLD_SIZE", "1")))
    if not cfg.overwrite:  # --overwrite would remove the folder's run: only the launch does that
        loop.claim_run_dir(run_dir, cfg.resume, False, rank=1)
    inputs.check_inputs(cfg, run_dir)
    rows, code = report(cfg, run_dir)
    if int(os.environ.get("RANK", "0")) != 0:
        sys.exit(code)
    widths = [max(len(getattr(r, k)) for r in rows + [Row("check", "needs", "has", "status")])
              for k in ("what", "need", "have", "status")]
    for r in [Row("check", "needs", "has", "status")] + rows:
        print("  ".join(getattr(r, k).ljust(w) for k, w in zip(("what", "need", "have", "status"), widths)))
    lines = [f"{r.what}: {r.have}, needs {r.need}: {r.fix}" for r in rows if r.status == "BLOCKER"]
    for line in lines[1:]:  # the first is the error line of the exit
        print(f"grpo_ref_split.py: error: {line}", file=sys.stderr)
    if lines:
        raise UserError(lines[0])
    print("[check] nothing blocks this launch", flush=True)
    return {"check": "ok", "blockers": 0}
