"""The sampling loop behind `rollout.sample`: KV-cached decoding of a batch of left-padded prompts.

Why not `model.generate`: on a CPU it spends about a tenth of each decode step drawing one
exponential random number per vocabulary entry (`torch.multinomial`) and another tenth copying the
whole KV cache (`torch.cat`) to append one token. Here:
- each distinct prompt is run once and its KV cache (and its last-position logits) repeated for
  its G rows: the rows of a group share the prompt;
- sampling is inverse-CDF with one uniform number per row (`torch.searchsorted` into the float64
  cumulative distribution), exactly distributed as softmax(logits / temperature) after top-p;
- the cache is preallocated for the longest completion and filled in place.
The semantics follow `generate(do_sample=..., temperature, top_p, top_k=0, min_new_tokens,
max_new_tokens, eos_token_id, pad_token_id)`: EOS is forbidden before `min_new_tokens`; a row stops
at its first EOS and is padded with `pad_id` after it; decoding stops when every row has stopped.
Greedy decoding is bit-identical to `generate(do_sample=False)` (tests/test_decode.py).
With `record_logprobs` each sampled token's log-prob is taken under the distribution it was drawn
from: log_softmax of logits / T, EOS at -inf before `min_new_tokens`, top-p applied (the
renormalised nucleus). That is the behaviour policy pi_sampler of importance weights
pi_trainer / pi_sampler (truncated IS); with top_p < 1 it exceeds the trainer's whole-vocabulary
log-prob by -log Z per token (Z: the nucleus mass), and the weights must see that. Beside it the
same token's log-prob under the whole tempered softmax, log_softmax(logits / T) (no EOS mask, no
nucleus), is recorded: what the trainer's forward computes with the sampler's weights, the old
policy of a late batch's ratio (simple_grpo/train/offpolicy.py), which then starts at 1.
`model.generate` stays available as `--sampler=generate` for models whose forward the loop does
not fit (e.g. caches other than HF's DynamicCache).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers.cache_utils import DynamicLayer

from simple_grpo.algo.logprobs import token_logprobs
from simple_grpo.hf_compat import cache_kwargs, output_cache


@dataclass
class Decoded:
    completion_ids_NC: torch.Tensor  # [N, C] C <= max_new_tokens, pad after each row's first EOS
    logprobs_NC: torch.Tensor | None  # [N, C] log-prob of each sampled token under the distribution it
    #                                   was drawn from (logits / T, EOS mask, top-p); 0 after a row's end
    full_logprobs_NC: torch.Tensor | None = None  # [N, C] the same tokens under log_softmax(logits / T)


class _InPlaceLayer(DynamicLayer):
    """A DynamicCache layer whose keys/values live in a preallocated buffer: appending a token writes
    one slot instead of copying the whole cache (DynamicLayer's torch.cat)."""

    @classmethod
    def take_over(cls, layer: DynamicLayer, repeat: int, extra: int, alloc=None) -> "_InPlaceLayer":
        """`layer`'s keys/values [n, H, L, D], each row repeated `repeat` times, room for `extra`;
        `alloc(name, like, shape)` gives each buffer (default: a new one like the layer's)."""
        new = cls()
        new.__dict__.update(layer.__dict__)
        n, H, L, _ = layer.keys.shape
        for name in ("keys", "values"):
            src = getattr(layer, name)
            shape = (n, repeat, H, L + extra, src.shape[-1])
            buf = src.new_empty(shape) if alloc is None else alloc(name, src, shape)
            buf[:, :, :, :L] = src[:, None]
            setattr(new, "buf_" + name, buf.view(n * repeat, H, L + extra, src.shape[-1]))
        new.length = L
        new.keys, new.values = new.buf_keys[:, :, :L], new.buf_values[:, :, :L]
        return new

    def update(self, key_states, value_states, *args, **kwargs):
        n = key_states.shape[-2]
        assert self.length + n <= self.buf_keys.shape[2], "decode cache overflow"
        self.buf_keys[:, :, self.length:self.length + n] = key_states
        self.buf_values[:, :, self.length:self.length + n] = value_states
        self.length += n
        self.keys = self.buf_keys[:, :, :self.length]
        self.values = self.buf_values[:, :, :self.length]
        return self.keys, self.values


def prefill(model, ids_nP: torch.Tensor, attn_nP: torch.Tensor, repeat: int, extra: int = 0, *,
            in_place: bool = True):
    """Run each prompt once -> (cache holding every prompt token, repeated `repeat` times per prompt,
    with room for `extra` more tokens written in place unless `in_place` is False (the stock
    layers, for `generate`); logits of the last prompt position [n*repeat, V])."""
    pos_nP = (attn_nP.cumsum(1) - 1).clamp(min=0)
    out = model(input_ids=ids_nP, attention_mask=attn_nP, position_ids=pos_nP, use_cache=True,
                logits_to_keep=1)
    cache = output_cache(out)
    if in_place and all(type(layer) is DynamicLayer for layer in getattr(cache, "layers", [None])):
        cache.layers = [_InPlaceLayer.take_over(layer, repeat, extra) for layer in cache.layers]
    elif repeat > 1:
        cache.batch_repeat_interleave(repeat)
    return cache, out.logits[:, -1].float().repeat_interleave(repeat, 0)


def top_p_filter(scores_NV: torch.Tensor, top_p: float) -> torch.Tensor:
    """Keep the smallest set of most likely tokens whose probability reaches `top_p` (at least one);
    the rest get -inf."""
    if top_p >= 1.0:
        return scores_NV
    sorted_NV, order_NV = scores_NV.sort(-1, descending=True)
    probs_NV = sorted_NV.softmax(-1)
    before_NV = probs_NV.cumsum(-1) - probs_NV  # mass of the strictly more likely tokens
    drop_NV = before_NV >= top_p
    drop_NV[:, 0] = False
    return scores_NV.masked_fill(drop_NV.scatter(-1, order_NV, drop_NV), float("-inf"))


def inverse_cdf_sample(scores_NV: torch.Tensor) -> torch.Tensor:
    """One token per row drawn from softmax(scores) with one uniform number per row -> [N]."""
    cdf_NV = scores_NV.float().softmax(-1).cumsum(-1, dtype=torch.float64)
    u_N1 = torch.rand(scores_NV.shape[0], 1, dtype=torch.float64, device=scores_NV.device)
    idx_N = torch.searchsorted(cdf_NV, u_N1 * cdf_NV[:, -1:], right=True).squeeze(1)
    return idx_N.clamp(max=scores_NV.shape[1] - 1)


@torch.no_grad()
def decode(model, prompt_ids_nP: torch.Tensor, attn_nP: torch.Tensor, *, repeat: int,
           max_new_tokens: int, min_new_tokens: int, eos_ids: list[int], pad_id: int,
           temperature: float = 1.0, top_p: float = 1.0, greedy: bool = False,
           record_logprobs: bool = False, sync_every: int | None = None) -> Decoded:
    """Sample `repeat` completions for each of n prompts; row i*repeat + j is prompt i's j-th.

    Whether every row has ended is read on the host only every `sync_every` tokens (default: every
    token on CPUs, where it is free; every 16 on GPUs, where each read stalls the launch queue). The
    extra steps only pad finished rows and are cut off: the tokens are the same either way."""
    assert prompt_ids_nP.shape == attn_nP.shape, "prompt ids and attention mask differ in shape"
    assert max_new_tokens >= 1, "max_new_tokens must be at least 1"
    assert temperature > 0 or greedy, "temperature must be > 0 when sampling"
    cache, logits_NV = prefill(model, prompt_ids_nP, attn_nP, repeat, max_new_tokens)
    attn_NT = attn_nP.repeat_interleave(repeat, 0)
    attn_NT = torch.cat([attn_NT, attn_NT.new_ones(attn_NT.shape[0], max_new_tokens)], 1)
    P = attn_nP.shape[1]
    pos_N1 = attn_nP.sum(1).repeat_interleave(repeat, 0)[:, None]  # position of the next token

    def forward(tok_N: torch.Tensor, t: int) -> torch.Tensor:
        nonlocal cache
        out = model(input_ids=tok_N[:, None], attention_mask=attn_NT[:, :P + t + 1], position_ids=pos_N1 + t,
                    use_cache=True, logits_to_keep=1, **cache_kwargs(cache))
        cache = output_cache(out)
        return out.logits[:, -1].float()

    return sample_loop(logits_NV, forward, max_new_tokens=max_new_tokens, min_new_tokens=min_new_tokens,
                       eos_ids=eos_ids, pad_id=pad_id, temperature=temperature, top_p=top_p, greedy=greedy,
                       record_logprobs=record_logprobs, sync_every=sync_every)


def sample_loop(logits_NV: torch.Tensor, forward, *, max_new_tokens: int, min_new_tokens: int,
                eos_ids: list[int], pad_id: int, temperature: float = 1.0, top_p: float = 1.0,
                greedy: bool = False, record_logprobs: bool = False, sync_every: int | None = None) -> Decoded:
    """The sampling steps of `decode` (and of gen/decode_static.py): from the logits of the last
    prompt position [N, V], draw a token per row, record its log-probs, then `forward(tok_N, t)`
    -> the next step's logits [N, V] (t: the index of tok_N among the new tokens)."""
    device = logits_NV.device
    eos_E = torch.tensor(eos_ids, dtype=torch.long, device=device)
    N = logits_NV.shape[0]
    tokens, logps, full_logps = [], [], []
    done_N = torch.zeros(N, dtype=torch.bool, device=device)
    ended_at = torch.full((), max_new_tokens, dtype=torch.long, device=device)  # first step all done
    sync_every = sync_every or (16 if device.type == "cuda" else 1)
    for t in range(max_new_tokens):
        scores_NV = tempered_NV = logits_NV if greedy or temperature == 1.0 else logits_NV / temperature
        if t < min_new_tokens and len(eos_ids):
            scores_NV = scores_NV.index_fill(1, eos_E, float("-inf"))
        if not greedy:
            scores_NV = top_p_filter(scores_NV, top_p)  # the distribution sampled and recorded
        tok_N = scores_NV.argmax(-1) if greedy else inverse_cdf_sample(scores_NV)
        tok_N = torch.where(done_N, torch.full_like(tok_N, pad_id), tok_N)
        tokens.append(tok_N)
        if record_logprobs:  # pad after a row's end may lie outside the nucleus: 0, not -inf
            logp_N = token_logprobs(scores_NV[:, None], tok_N[:, None])[:, 0]
            logps.append(logp_N.masked_fill(done_N, 0.0))
            full_N = token_logprobs(tempered_NV[:, None], tok_N[:, None])[:, 0]
            full_logps.append(full_N.masked_fill(done_N, 0.0))
        done_N |= torch.isin(tok_N, eos_E)
        ended_at = torch.where(done_N.all() & (ended_at == max_new_tokens), t + 1, ended_at)
        if t + 1 == max_new_tokens or ((t + 1) % sync_every == 0 and int(ended_at) < max_new_tokens):
            break
        logits_NV = forward(tok_N, t)
    width = int(ended_at)  # one host read: steps after every row ended are cut
    if not record_logprobs:
        return Decoded(torch.stack(tokens, 1)[:, :width], None)
    return Decoded(torch.stack(tokens, 1)[:, :width], torch.stack(logps, 1)[:, :width],
                   torch.stack(full_logps, 1)[:, :width])
