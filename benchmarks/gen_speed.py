"""Decode speed of each sampler engine against the memory-bandwidth floor of a decode step.

    OMP_NUM_THREADS=1 python benchmarks/gen_speed.py        # the bundled SmolLM2-135M, CPU, fp32, 16/64 x 64
    OMP_NUM_THREADS=1 python benchmarks/gen_speed.py --model=tiny --batches=4 --new_tokens=8   # seconds
    bash benchmarks/gpu_box.sh run --parts=gen   # benchmarks/gpu_check.py's part: Qwen2.5-1.5B shape, bf16

Engines, all through rollout.sample: `loop` (--sampler=loop, simple_grpo/gen/decode.py), `static`
(--sampler=static, simple_grpo/gen/decode_static.py: a fixed-shape step, a CUDA graph on a GPU,
compiled and recorded in an untimed call of the row's shape first; a timed call that records
the graph again, instead of replaying it, is a failed row) and `generate` (HF
model.generate). A row of batch B is B/8 prompts x G=8, as in a GRPO step, temperature 1, top_p 1. Forced rows: min_new_tokens = max_new_tokens, so every row
decodes the full length (checked). Variable rows end at different lengths: a real model at its own
EOS; a random-weight model, whose samples spread over the whole vocabulary, at any of an end set of
2V/n token ids (V: vocabulary, n: max new tokens), so a row ends with probability about 2/n a step.
tokens/s: generated tokens (each row up to its end) / seconds of the whole call, prefill included;
ms/step: those seconds / decode steps (the longest row's length).

The floor. A decode step reads every weight and every cached key and value at least once:
    bytes/step = b * W + layers * 2 (K, V) * kv_heads * head_dim * context * B * b
b: bytes per value (2 in bf16, 4 in fp32); W: the parameters a step reads (all of them but an
untied input embedding, of which a step gathers B rows); context: the mean cached length over the
steps, prompt width + steps / 2. floor ms/step = bytes/step / bandwidth, the bandwidth measured as
2 x the bytes of a large device-to-device copy (read + write) / its time, best of 5 (CUDA events
on a GPU); the nominal one is printed beside it for a known GPU. measured / floor is the ratio.
Beside it the compute floor: (2 * W_matmul * B + 4 * layers * heads * head_dim * context * B)
flops at the rate of a large square matmul in the run's dtype (a CPU step is bound by this one).

Arithmetic of the GPU rows (Qwen2.5-1.5B shape: hidden 1536, MLP 8960, 28 layers, 12 heads and
2 KV heads of 128, vocabulary 151936, tied embeddings; bf16, b = 2; prompt width 33 tokens):
    W = 151936 * 1536 + 28 * 46,797,824 + 1536 = 1,543,714,304 -> b * W = 3.087 GB a step
        (a layer: q 1536*1536 + 1536, k and v 1536*256 + 256 each, o 1536*1536, MLP 3*1536*8960, 2 norms)
    K and V of one cached position: 28 * 2 * 2 * 128 * 2 B = 28,672 B
    B = 16, 256 tokens:   context 33 + 128 = 161: 16 * 161 * 28,672 = 0.074 GB -> 3.161 GB a step
    B = 128, 1024 tokens: context 33 + 512 = 545: 128 * 545 * 28,672 = 2.000 GB -> 5.088 GB a step
    floor at 3.35 TB/s (H100 SXM nominal): 0.94 ms and 1.52 ms; at 4.8 TB/s (H200): 0.66 and 1.06 ms.
A decode step is launch-bound instead: the table's first line counts the non-view aten ops of a
step (about one kernel launch each on a GPU; tens per layer), and at a few microseconds a launch
that alone is several times the floor; measured / floor shows by how much.
"""
from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

from simple_grpo.gen.rollout import SampleSettings, eos_token_ids, sample  # noqa: E402

NOMINAL_TBS = (("H200", 4.8), ("H100 NVL", 3.9), ("H100 PCIe", 2.0), ("H100", 3.35))  # H100: SXM, HBM3
G = 8  # completions per prompt in a row


def floor_bytes(weights: int, layers: int, kv_heads: int, head_dim: int, context: float, batch: int,
                b: int) -> float:
    """Bytes a decode step reads at least: the weights once, the cached K and V of every row once."""
    return b * weights + layers * 2 * kv_heads * head_dim * context * batch * b


def model_dims(model) -> dict:
    """What the floors need: layers, heads, KV heads, head_dim, bytes per value, W (parameters a
    step reads) and W_matmul (weights of the linear layers, the LM head included)."""
    cfg = model.config.get_text_config()
    params = {id(p): p for p in model.parameters()}
    weights = sum(p.numel() for p in params.values())
    emb_in, emb_out = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    if emb_in is not emb_out:
        weights -= emb_in.numel()  # gathered: B rows a step
    linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    heads = cfg.num_attention_heads
    return {"layers": cfg.num_hidden_layers, "heads": heads, "kv_heads": cfg.num_key_value_heads or heads,
            "head_dim": getattr(cfg, "head_dim", None) or cfg.hidden_size // heads, "weights": weights,
            "weights_matmul": linear, "b": emb_out.element_size()}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _best_seconds(fn, device: torch.device, reps: int) -> float:
    """Best of `reps` timings of fn() (CUDA events on a GPU), after one untimed call."""
    fn()
    best = float("inf")
    for _ in range(reps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            best = min(best, start.elapsed_time(end) / 1e3)
        else:
            t = time.perf_counter()
            fn()
            best = min(best, time.perf_counter() - t)
    return best


def copy_bandwidth(device: torch.device, nbytes: int, reps: int = 5) -> float:
    """Bytes/s of memory traffic of a large copy: 2 * nbytes (read + write) / its best time."""
    src = torch.ones(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    return 2 * nbytes / _best_seconds(lambda: dst.copy_(src), device, reps)


def matmul_rate(device: torch.device, dtype: torch.dtype, n: int, reps: int = 3) -> float:
    """Flop/s of an n x n x n matmul in `dtype`."""
    a, c = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    return 2 * n ** 3 / _best_seconds(lambda: a @ c, device, reps)


def nominal_bandwidth(device_name: str) -> float | None:
    """The vendor's memory bandwidth in bytes/s of a GPU named like one of NOMINAL_TBS, else None."""
    hit = next((tbs for key, tbs in NOMINAL_TBS if key in device_name), None)
    return None if hit is None else hit * 1e12


class _CountOps(TorchDispatchMode):
    """Counts the aten ops that are not views (about one kernel launch each on a GPU): all of them
    (n) and those inside the first decoder layer's forward (n_layer)."""

    def __init__(self, layer: torch.nn.Module | None):
        super().__init__()
        self.n = self.n_layer = 0
        self.inside = False
        self.hooks = [] if layer is None else [
            layer.register_forward_pre_hook(lambda *a: setattr(self, "inside", True)),
            layer.register_forward_hook(lambda *a: setattr(self, "inside", False))]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not func.is_view:
            self.n += 1
            self.n_layer += self.inside
        return func(*args, **(kwargs or {}))

    def __exit__(self, *exc):
        for h in self.hooks:
            h.remove()
        return super().__exit__(*exc)


def prompts(tok, n: int) -> list[str]:
    """n chat prompts ("What is a + b?"), rendered with the tokenizer's template."""
    return [tok.apply_chat_template([{"role": "user", "content": f"What is {i % 9 + 1} + {i // 9 % 9 + 1}?"}],
                                    tokenize=False, add_generation_prompt=True) for i in range(n)]


def end_ids(model, tok, new: int, random_weights: bool) -> list[int]:
    """The ids that end a variable row: the model's EOS ids, or for random weights an end set of
    2V/n ids at the top of the vocabulary (none of them a prompt token)."""
    if not random_weights:
        return eos_token_ids(tok, model)
    V = model.config.get_text_config().vocab_size
    k = max(1, min(V // 4, round(2 * V / new)))
    return list(range(V - k, V))


def _call(model, tok, engine: str, batch: int, new: int, eos: list[int], forced: bool):
    g = min(G, batch)
    assert batch % g == 0, f"batch {batch} is not a multiple of G={g}"
    s = SampleSettings(num_generations=g, max_new_tokens=new, min_new_tokens=new if forced else 0,
                       temperature=1.0, top_p=1.0, sampler=engine)
    return sample(model, tok, prompts(tok, batch // g), s, eos)


def ops_per_step(model, tok, engine: str) -> dict:
    """Non-view aten ops of one decode step of `engine` (batch 2, forced lengths): the count of a
    12-token call minus a 4-token one, over 8 (the prefill and the set-up cancel) -> {"step": all
    of them, "layer": those of one decoder layer}."""
    eos = eos_token_ids(tok, model)
    if engine == "static" and next(model.parameters()).device.type == "cuda":
        return "one CUDA graph replay a step (compiled; its kernels are not counted) + the sampling's ops"
    layer = next((m for m in model.modules() if type(m).__name__.endswith("DecoderLayer")), None)
    counts = []
    for new in (4, 12):
        with _CountOps(layer) as c:
            _call(model, tok, engine, 2, new, eos, forced=True)
        counts.append((c.n, c.n_layer))
    return {"step": (counts[1][0] - counts[0][0]) / 8, "layer": (counts[1][1] - counts[0][1]) / 8}


def time_row(model, tok, engine: str, batch: int, new: int, variable: bool, random_weights: bool,
             info: dict) -> dict:
    """One timed call -> a row with tokens/s, ms/step and both floors (`info`: bandwidth, flop rate, dims)."""
    device = next(model.parameters()).device
    d = info["dims"]
    eos = end_ids(model, tok, new, random_weights) if variable else eos_token_ids(tok, model)
    graphed = engine == "static" and device.type == "cuda"
    if graphed:  # compile and record the graph of this shape
        _call(model, tok, engine, batch, new, eos, forced=not variable)
    recorded = _graph_recordings()
    torch.manual_seed(0)
    _sync(device)
    t = time.perf_counter()
    prompt_ids, _, comp, lens = _call(model, tok, engine, batch, new, eos, forced=not variable)
    _sync(device)
    seconds = time.perf_counter() - t
    recorded = _graph_recordings() - recorded
    steps, width = comp.shape[1], prompt_ids.shape[1]
    context = width + steps / 2
    floor = floor_bytes(d["weights"], d["layers"], d["kv_heads"], d["head_dim"], context, batch, d["b"])
    flops = 2 * d["weights_matmul"] * batch + 4 * d["layers"] * d["heads"] * d["head_dim"] * context * batch
    row = {"engine": engine, "batch": batch, "new_tokens": new, "variable": variable, "ok": True,
           "steps": steps, "prompt_width": width, "context": context, "mean_len": float(lens.float().mean()),
           "min_len": int(lens.min()), "seconds": seconds, "tok_s": float(lens.sum()) / seconds,
           "ms_step": 1e3 * seconds / steps, "floor_bytes": floor, "floor_ms": 1e3 * floor / info["bandwidth"],
           "compute_ms": 1e3 * flops / info["flops"]}
    row["ratio"] = row["ms_step"] / row["floor_ms"]
    if graphed and recorded:  # the warm-up call's graph should replay (decode_static's kept cache)
        row.update(ok=False, error=f"the timed call recorded CUDA graph nodes again ({recorded} inputs' worth)")
    if not variable and not bool((lens == new).all()):
        row.update(ok=False, error=f"forced rows ended early (shortest {int(lens.min())} of {new})")
    return row


def _graph_recordings() -> int:
    """inductor's running count of the inputs of every CUDA graph recorded so far (grows with each
    recording; it stays put across a call whose graphs all replay)."""
    from torch._dynamo.utils import counters

    return int(counters["inductor"]["cudagraph_recorded_non_static_inputs"])


def measure_device(model, device_name: str, tiny: bool) -> dict:
    """Bandwidth (a large copy), matmul rate and the model's dims -> the `info` the rows need."""
    device, dtype = next(model.parameters()).device, next(model.parameters()).dtype
    gpu = device.type == "cuda"
    nbytes = (2 << 30) if gpu else (32 << 20) if tiny else (256 << 20)
    info = {"device_name": device_name, "dtype": str(dtype).replace("torch.", ""), "dims": model_dims(model),
            "bandwidth": copy_bandwidth(device, nbytes), "nominal": nominal_bandwidth(device_name),
            "flops": matmul_rate(device, dtype, 8192 if gpu else 256 if tiny else 1536)}
    if gpu:
        torch.cuda.empty_cache()
    return info


def plan(batches: list[int], news: list[int], variable: tuple[int, int] | None, engines: list[str]) -> list:
    """Rows in the order they run: every forced (batch, new) for each engine, then the variable set."""
    rows = [(e, b, n, False) for n in news for b in batches for e in engines]
    return rows + ([(e, *variable, True) for e in engines] if variable else [])


def _estimate_s(done: list[dict], engine: str, batch: int, new: int) -> float:
    """Seconds a row will take, from the engine's measured rows: ms/step at the same batch x 1.25,
    else the slowest ms/step scaled up by the batch ratio; 0 before any."""
    same = [r for r in done if r.get("ms_step") and r["engine"] == engine]
    at_b = [r["ms_step"] * 1.25 for r in same if r["batch"] == batch]
    per = max(at_b) if at_b else max((r["ms_step"] * max(1.0, batch / r["batch"]) for r in same), default=0.0)
    return per * new / 1e3


def run_rows(model, tok, info: dict, rows: list, *, random_weights: bool, time_left=lambda: math.inf,
             on_row=lambda row: None) -> list[dict]:
    """Warm each engine up and count its ops per step, then time each planned row; a row that would
    not end within time_left() is reported as skipped, one that raises as failed; on_row(row) after each."""
    out = []
    for engine in dict.fromkeys(r[0] for r in rows):
        try:
            info.setdefault("ops_per_step", {})[engine] = ops_per_step(model, tok, engine)
        except Exception as e:  # noqa: BLE001 - the count is a side line; the timings still run
            info.setdefault("ops_per_step", {})[engine] = f"{type(e).__name__}: {str(e)[:200]}"
    for engine, batch, new, variable in rows:
        row = {"engine": engine, "batch": batch, "new_tokens": new, "variable": variable}
        need = _estimate_s(out, engine, batch, new)
        if time_left() < max(5.0, need):
            row.update(ok=False, error=f"skipped: the overall --deadline_s had passed (or would, in ~{need:.0f} s)")
        else:
            try:
                row = time_row(model, tok, engine, batch, new, variable, random_weights, info)
            except Exception as e:  # noqa: BLE001 - a failed row, the others still run
                row.update(ok=False, error=f"{type(e).__name__}: {str(e)[:300]}")
        out.append(row)
        on_row(row)
    return out


def check_part(part: dict, make_model, tok, device_name: str, sizes: tuple, *, tiny: bool, save,
               time_left) -> None:
    """benchmarks/gpu_check.py's part: fills `part` ({"rows": [...], "info": {...}}) and calls save()
    after each row; `sizes`: (batches, new tokens, (B, N) of the variable set or None)."""
    rows = plan(*sizes, ["loop", "static", "generate"])
    if time_left() < 5:
        part["rows"] = [{"engine": e, "batch": b, "new_tokens": n, "variable": v, "ok": False,
                         "error": "skipped: the overall --deadline_s had passed"} for e, b, n, v in rows]
        return
    model = None
    try:
        model = make_model().eval()
        part["info"] = measure_device(model, device_name, tiny)
        run_rows(model, tok, part["info"], rows, random_weights=True, time_left=time_left,
                 on_row=lambda row: (part["rows"].append(row), save()))
    except Exception as e:  # noqa: BLE001 - a failed row, with the rows that ran
        part["rows"].append({"engine": "setup", "batch": "", "new_tokens": "", "variable": False, "ok": False,
                             "error": f"{type(e).__name__}: {str(e)[:300]}"})
    finally:
        cuda = model is not None and next(model.parameters()).device.type == "cuda"
        del model
        if cuda:
            torch.cuda.empty_cache()


def render_part(part: dict) -> str:
    """check_part's table, or its rows' errors when it stopped before measuring the device."""
    if "info" in part:
        return render(part["info"], part["rows"])
    return "\n".join(f"decode {r['engine']} {r['batch']}x{r['new_tokens']}: {r['error']}" for r in part["rows"])


def render(info: dict, rows: list[dict]) -> str:
    d, bw = info["dims"], info["bandwidth"]
    nominal = f", nominal {info['nominal'] / 1e12:.2f} TB/s" if info.get("nominal") else ""
    ops = "; ".join(f"{e} {n['step']:.0f} ({d['layers']} layers x {n['layer']:.0f} + "
                    f"{n['step'] - d['layers'] * n['layer']:.0f} outside them)" if isinstance(n, dict) else f"{e} {n}"
                    for e, n in info.get("ops_per_step", {}).items())
    lines = [f"decode speed on {info['device_name']}, {info['dtype']}: {d['layers']} layers, "
             f"{d['b'] * d['weights'] / 1e6:.1f} MB of weights a step, "
             f"{d['layers'] * 2 * d['kv_heads'] * d['head_dim'] * d['b']:,} B of K and V per cached position; "
             f"copy bandwidth {bw / 1e9:.1f} GB/s{nominal}; matmul {info['flops'] / 1e9:,.0f} GFLOP/s",
             f"non-view aten ops per decode step (about one kernel launch each on a GPU): {ops}", "",
             "| engine | batch | new tokens | row lengths | tokens/s | ms/step | floor ms/step (bandwidth) | "
             "measured / floor | compute floor ms/step |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        kind = "variable" if r["variable"] else "forced"
        if "ms_step" not in r:
            lines.append(f"| {r['engine']} | {r['batch']} | {r['new_tokens']} | {kind} | {r['error']} | | | | |")
            continue
        lens = f"mean {r['mean_len']:.0f}, min {r['min_len']}" if r["variable"] else "all full"
        lines.append(f"| {r['engine']} | {r['batch']} | {r['new_tokens']} | {lens} | {r['tok_s']:.1f} | "
                     f"{r['ms_step']:.2f} | {r['floor_ms']:.3f} | {r['ratio']:.1f} | {r['compute_ms']:.3f} |"
                     + ("" if r["ok"] else f" {r['error']}"))
    return "\n".join(lines)


@dataclass
class SpeedConfig:
    """benchmarks/gen_speed.py: decode tokens/s per sampler engine vs the bandwidth floor."""

    model: str = "smollm2-135m"
    """The bundled smollm2-135m, a model folder or hub name (real weights), or tiny (random weights)."""
    device: str = "cpu"
    """cpu or cuda."""
    dtype: str = "float32"
    """float32 or bfloat16 (the weights and the KV cache)."""
    threads: int = 1
    """torch threads on a CPU."""
    batches: str = "16,64"
    """Rows per call of the forced-length rows (B/8 prompts x G=8)."""
    new_tokens: str = "64"
    """New tokens of the forced-length rows (min_new_tokens = max_new_tokens)."""
    variable: str = "16x64"
    """BxN of the variable-length row set ("": none)."""
    engines: str = "loop,static,generate"
    """Sampler engines: loop (simple_grpo/gen/decode.py), static (simple_grpo/gen/decode_static.py),
    generate (HF model.generate)."""


def main(argv: list[str]) -> int:
    from simple_grpo.cli import parse_config
    from simple_grpo.models import build_tiny_model, build_tiny_tokenizer, load_model, load_tokenizer

    c = parse_config(SpeedConfig, argv, prog="benchmarks/gen_speed.py")
    torch.set_num_threads(c.threads)
    random_weights = c.model == "tiny"
    if random_weights:
        tok, model = build_tiny_tokenizer(), build_tiny_model().to(c.device)
    else:
        tok, model = load_tokenizer(c.model), load_model(c.model, c.dtype, c.device)
    model.eval()
    name = torch.cuda.get_device_name(model.device) if model.device.type == "cuda" else "cpu"
    info = measure_device(model, name, tiny=random_weights)
    variable = tuple(int(x) for x in c.variable.split("x")) if c.variable else None
    rows = plan([int(b) for b in c.batches.split(",")], [int(n) for n in c.new_tokens.split(",")], variable,
                c.engines.split(","))
    t = time.perf_counter()
    rows = run_rows(model, tok, info, rows, random_weights=random_weights,
                    on_row=lambda r: print(f"  {r['engine']} {r['batch']}x{r['new_tokens']}: "
                                           f"{r.get('tok_s', 0):.1f} tok/s", flush=True))
    print(render(info, rows))
    print(f"({time.perf_counter() - t:.0f} s)")
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
