"""`--sampler=static`: the decode loop of simple_grpo/gen/decode.py with a fixed-shape decode step,
so that on a GPU the step can run as one CUDA graph replay (`torch.compile(mode="reduce-overhead")`)
instead of a few hundred eager kernel launches and the host syncs transformers' mask helpers make.

- The KV cache is preallocated for all N = n*G rows at its final width T (prompt width P +
  max_new_tokens, rounded up to a multiple of `width_multiple` when compiled, so that batches of
  nearby prompt widths share a compiled graph) and never changes shape: token t of the completions
  is written at slot P + t of every layer (`index_copy_` at a one-element index tensor updated in
  place), and each step attends over all T slots.
- The prompts are run once each (decode.prefill, stock DynamicCache) and their keys and values
  copied into the G rows of their group; the slots after them start at zero.
- Compiled, the cache's buffers are kept between calls (`keep_cache`), so every call's graph
  inputs sit at the addresses the CUDA graph recorded: the graph of a shape is recorded once per
  process, not once per call. Every element is written each call (prompt slots copied, the rest
  zeroed), so nothing of an earlier call is read. Cost, Qwen2.5-1.5B bf16 (28 layers x K and V x 2
  KV heads x 128 x 2 B = 28,672 B a slot): 128 rows x 1,344 slots = 4.9 GB held between calls.
- The attention mask is 4-D and built inside the step from tensors made once: a slot is attended
  when it holds a real prompt token or a new token at or before the current one. transformers
  hands a 4-D mask to the attention as it is, so no mask helper runs (and none reads the device).
- Sampling and recording are decode.sample_loop's, the same code as `--sampler=loop`: the same
  tokens under the same seed, the same log-probs (both kinds), EOS held back before
  min_new_tokens, pad after a row's first EOS, the end-of-rows check every `sync_every` tokens.
Only the attention width differs from the loop (masked slots add exact zeros), so logits agree to
rounding. Attention must be `sdpa` or `eager` (a 4-D mask); flash-attention's needs a 2-D one.
"""
from __future__ import annotations

import math

import torch
from transformers.cache_utils import DynamicLayer

from simple_grpo.errors import UserError
from simple_grpo.gen.decode import Decoded, _InPlaceLayer, prefill, sample_loop
from simple_grpo.hf_compat import cache_kwargs

_COMPILED: list = []  # forward_step under torch.compile, made on first use (dynamo keeps a graph per
#                        model and shape, each guarded)
_KEPT: dict[tuple, torch.Tensor] = {}  # (device, dtype, layer, "keys"/"values") -> the flat buffer a kept
#                                         cache's layer lives in, across calls (keep_cache)


def _kept_buffer(layer_index: int, name: str, like: torch.Tensor, shape: tuple) -> torch.Tensor:
    """A [shape] view of the start of the flat buffer kept for this layer's keys or values: the same
    address every call (grown, at a new address, only when a call needs more elements than any before)."""
    key = (str(like.device), like.dtype, layer_index, name)
    need = math.prod(shape)
    flat = _KEPT.get(key)
    if flat is None or flat.numel() < need:
        _KEPT.pop(key, None)  # the old one is freed before the larger one is allocated
        flat = _KEPT[key] = like.new_empty(need)
    return flat[:need].view(shape)


def release_kept_cache() -> int:
    """Free the kept cache buffers (keep_cache) -> bytes freed; the next kept call allocates anew (and
    a compiled step records its CUDA graph again, once)."""
    freed = sum(t.numel() * t.element_size() for t in _KEPT.values())
    _KEPT.clear()
    return freed


class _SlotLayer(_InPlaceLayer):
    """A cache layer of fixed width: `update` writes the step's keys/values at slot `self.slot_1`
    (a one-element tensor the decode loop advances in place) and returns the whole buffers."""

    slot_1: torch.Tensor

    def update(self, key_states, value_states, *args, **kwargs):
        self.buf_keys.index_copy_(2, self.slot_1, key_states)
        self.buf_values.index_copy_(2, self.slot_1, value_states)
        return self.buf_keys, self.buf_values


def static_cache(cache, repeat: int, width: int, slot_1: torch.Tensor, compiled: bool = False,
                 keep: bool = False):
    """The prefill's cache (n rows of P prompt slots) -> the same cache object holding fixed-width
    layers: n*repeat rows of `width` slots, the prompt's first, zeros after. `keep`: the layers live
    in buffers kept between calls (_KEPT), at the same addresses each call."""
    layers = getattr(cache, "layers", None)
    if not layers or any(type(layer) is not DynamicLayer for layer in layers):
        raise UserError("--sampler=static needs a model whose cache is transformers' DynamicCache with "
                        "full-attention layers only; use --sampler=loop or --sampler=generate")
    new = []
    for i, layer in enumerate(layers):
        P = layer.keys.shape[2]
        alloc = (lambda name, like, shape, i=i: _kept_buffer(i, name, like, shape)) if keep else None
        slot = _SlotLayer.take_over(layer, repeat, width - P, alloc)
        slot.buf_keys[:, :, P:].zero_()  # masked slots: zeros, never stale memory (NaN * 0 = NaN)
        slot.buf_values[:, :, P:].zero_()
        slot.keys, slot.values, slot.slot_1 = slot.buf_keys, slot.buf_values, slot_1
        for buf in (slot.buf_keys, slot.buf_values) if compiled else ():
            torch._dynamo.mark_static_address(buf)  # a fixed address, so a CUDA graph may mutate it
        new.append(slot)
    cache.layers = new
    return cache


def forward_step(model, cache, tok_N: torch.Tensor, pos_N1: torch.Tensor, slot_1: torch.Tensor,
                 prompt_N11T: torch.Tensor, new_T: torch.Tensor, masked: float | None) -> torch.Tensor:
    """One decode step at fixed shapes -> logits [N, V] (fp32) of the token after tok_N [N]:
    written at slot `slot_1`, at position pos_N1. Attended: the real prompt slots (prompt_N11T) and
    the new slots up to this one (new_T: a new slot's index, T at the prompt's and past-the-end ones).
    `masked`: None for a bool mask (sdpa), else the additive value of a masked slot (eager)."""
    mask_N11T = prompt_N11T | (new_T <= slot_1)
    if masked is not None:
        mask_N11T = torch.where(mask_N11T, 0.0, masked).to(model.dtype)
    out = model(input_ids=tok_N[:, None], attention_mask=mask_N11T, position_ids=pos_N1, use_cache=True,
                logits_to_keep=1, **cache_kwargs(cache))
    return out.logits[:, -1].float()


def compiled_step():
    """forward_step under torch.compile(mode="reduce-overhead"): CUDA graphs on a GPU. Each model and
    (rows, width) shape compiles once in a process; past dynamo's recompile limit it runs eager."""
    if not _COMPILED:
        _COMPILED.append(torch.compile(forward_step, mode="reduce-overhead", dynamic=False))
    return _COMPILED[0]


def _mask_value(model) -> float | None:
    impl = getattr(model.config, "_attn_implementation", None) or "eager"
    if impl == "sdpa":
        return None
    if impl == "eager":
        return torch.finfo(model.dtype).min
    raise UserError(f"--sampler=static builds a 4-D attention mask, which attn_implementation={impl!r} "
                    "does not take; load the model with sdpa or eager attention, or use --sampler=loop")


@torch.no_grad()
def decode_static(model, prompt_ids_nP: torch.Tensor, attn_nP: torch.Tensor, *, repeat: int,
                  max_new_tokens: int, min_new_tokens: int, eos_ids: list[int], pad_id: int,
                  temperature: float = 1.0, top_p: float = 1.0, greedy: bool = False,
                  record_logprobs: bool = False, sync_every: int | None = None,
                  compile: bool | None = None, width_multiple: int = 64,
                  keep_cache: bool | None = None) -> Decoded:
    """decode.decode's contract (row i*repeat + j is prompt i's j-th completion) with a static KV
    cache and a fixed-shape step; `compile` (default: on CUDA devices) wraps the step in
    torch.compile(mode="reduce-overhead"), compiled once per model and (N, T) shape. `keep_cache`
    (default: when compiled) keeps the cache's buffers between calls: a CUDA graph replays only at
    the addresses it recorded, so a new cache each call would record the step's graph again each
    call, and cudagraph trees keep every recording (each later replay first checks them all). The
    price: the cache's memory stays allocated between calls (release_kept_cache frees it)."""
    assert prompt_ids_nP.shape == attn_nP.shape, "prompt ids and attention mask differ in shape"
    assert max_new_tokens >= 1, "max_new_tokens must be at least 1"
    assert temperature > 0 or greedy, "temperature must be > 0 when sampling"
    device = prompt_ids_nP.device
    compile = device.type == "cuda" if compile is None else compile
    keep_cache = compile if keep_cache is None else keep_cache
    masked = _mask_value(model)
    P = attn_nP.shape[1]
    T = P + max_new_tokens
    if compile:
        T = -(-T // width_multiple) * width_multiple
    cache, logits_nV = prefill(model, prompt_ids_nP, attn_nP, 1, in_place=False)
    slot_1 = torch.full((1,), P, dtype=torch.long, device=device)  # where the next token is written
    cache = static_cache(cache, repeat, T, slot_1, compile, keep_cache)
    logits_NV = logits_nV.repeat_interleave(repeat, 0)
    pos_N1 = attn_nP.sum(1).repeat_interleave(repeat, 0)[:, None]  # position of the next token
    prompt_N11T = torch.zeros(pos_N1.shape[0], 1, 1, T, dtype=torch.bool, device=device)
    prompt_N11T[:, 0, 0, :P] = attn_nP.bool().repeat_interleave(repeat, 0)
    span_T = torch.arange(T, device=device)
    new_T = torch.where((span_T >= P) & (span_T < P + max_new_tokens), span_T, T)
    step = compiled_step() if compile else forward_step
    cuda = device.type == "cuda"

    def forward(tok_N: torch.Tensor, t: int) -> torch.Tensor:
        if cuda and compile:
            torch.compiler.cudagraph_mark_step_begin()  # the last step's outputs are consumed
        logits = step(model, cache, tok_N, pos_N1, slot_1, prompt_N11T, new_T, masked)
        if cuda and compile:
            logits = logits.clone()  # outlive the next replay, which reuses the graph's output memory
        slot_1.add_(1)
        pos_N1.add_(1)
        return logits

    return sample_loop(logits_NV, forward, max_new_tokens=max_new_tokens, min_new_tokens=min_new_tokens,
                       eos_ids=eos_ids, pad_id=pad_id, temperature=temperature, top_p=top_p, greedy=greedy,
                       record_logprobs=record_logprobs, sync_every=sync_every)
