"""Per-token log-probabilities of completion tokens, for the policy and for the reference model.

Batch layout used everywhere (it is what `generate` returns for left-padded prompts):
    prompt_ids_BP      [B, P]  prompts left-padded to width P; row i's prompt is its last p_i tokens
    completion_ids_BC  [B, C]  completions right-padded to width C; row i's completion is its first c_i
The model sees `cat(prompt, completion)` with an attention mask and position ids built from those
lengths, so padding never changes a real token's log-prob. The result is [B, C], aligned with the
completion, exactly 0 beyond each completion's length.

Shared prompts: the G completions of a group share one prompt, and a causal model's prompt states
do not depend on what follows. So each distinct prompt is run once (with gradients when training),
its keys/values are repeated for the group's rows, and only completion tokens are run per row. For
the default run (70-token prompts, 48-token completions, G = 8) this halves the tokens the
transformer processes; gradients still flow into the prompt states through the repeated cache.
The cache is `_PrefixLayer`s: `update` returns cat(prefix, new) and stores nothing, so a layer run
twice (activation checkpointing recomputes it in backward, simple_grpo/train/grad_ckpt.py) sees the
same cache both times.

Memory: the transformer body runs once per pass and yields final hidden states [B, C, H]; the LM
head, temperature and log-softmax run on the flattened completion tokens in chunks of at most
`max_logits_bytes` of fp32 logits (simple_grpo/algo/head_logprobs.py), and in training backward
recomputes each chunk's logits, so no [B, C, V] logits are kept for backward. Without gradients
(the reference server) rows are chunked only by the size of their hidden states, never by the
vocabulary (`plan_chunks`).
"""
from __future__ import annotations

import torch
from transformers.cache_utils import DynamicCache, DynamicLayer

from simple_grpo.algo.head_logprobs import head_logprobs, plan_chunks
from simple_grpo.algo.masks import mask_from_lengths
from simple_grpo.hf_compat import cache_kwargs


def sequence_inputs(prompt_ids_BP: torch.Tensor, prompt_lens_B: torch.Tensor,
                    completion_ids_BC: torch.Tensor, completion_lens_B: torch.Tensor):
    """-> (input_ids [B, P+C], attention_mask [B, P+C], position_ids [B, P+C])."""
    B, P = prompt_ids_BP.shape
    C = completion_ids_BC.shape[1]
    assert completion_ids_BC.shape[0] == B, "prompt and completion batch sizes differ"
    assert prompt_lens_B.shape == (B,) and completion_lens_B.shape == (B,), "lengths must be [B]"
    prompt_mask_BP = mask_from_lengths(prompt_lens_B, P).flip(1)  # left padding
    attn_BT = torch.cat([prompt_mask_BP, mask_from_lengths(completion_lens_B, C)], 1).long()
    pos_BT = (attn_BT.cumsum(1) - 1).clamp(min=0)
    return torch.cat([prompt_ids_BP, completion_ids_BC], 1), attn_BT, pos_BT


def packs(model) -> bool:
    """Whether `completion_logprobs` packs rows for `model`: its attention is flash-attention,
    whose varlen kernel runs the real tokens only (transformers cuts the packed sequence where the
    position ids restart)."""
    config = getattr(getattr(model, "module", model), "config", None)
    return getattr(config, "_attn_implementation", None) in PACKED_ATTENTION


PACKED_ATTENTION = ("flash_attention_2", "flash_attention_3")


def packed_inputs(prompt_ids_BP: torch.Tensor, prompt_lens_B: torch.Tensor,
                  completion_ids_BC: torch.Tensor, completion_lens_B: torch.Tensor):
    """The rows' real tokens one after another -> (input_ids [1, N], position_ids [1, N], restarting
    at 0 for each row, and predict_n: the index into N of the position predicting each completion
    token, row-major [n = sum c_i]), N = sum(p_i + c_i): no padding at all."""
    ids_BT, attn_BT, pos_BT = sequence_inputs(prompt_ids_BP, prompt_lens_B, completion_ids_BC, completion_lens_B)
    real_BT = attn_BT.bool()
    C = completion_ids_BC.shape[1]
    lens_B = prompt_lens_B + completion_lens_B
    starts_B = torch.cumsum(lens_B, 0) - lens_B
    predict_BC = (starts_B + prompt_lens_B - 1)[:, None] + torch.arange(C, device=lens_B.device)[None]
    predict_n = predict_BC[mask_from_lengths(completion_lens_B, C)]
    return ids_BT[real_BT][None], pos_BT[real_BT][None], predict_n


def completion_logprobs(model, prompt_ids_BP: torch.Tensor, prompt_lens_B: torch.Tensor,
                        completion_ids_BC: torch.Tensor, completion_lens_B: torch.Tensor, *,
                        temperature: float = 1.0, max_logits_bytes: int = 1 << 30,
                        share_prompts: bool = True, packed: bool | None = None) -> torch.Tensor:
    """log p(completion token | prefix) for every completion token -> [B, C] float32.

    Differentiable when called with grad enabled (the trainer), cheap under inference_mode
    (the reference server). `max_logits_bytes`: fp32 logits alive at once (forward and backward).
    `packed` (default `packs(model)`): each row chunk's real tokens as one sequence
    (`packed_inputs`, no attention mask): no padding runs, and no shared prompt pass either."""
    B, C = completion_ids_BC.shape
    if B == 0 or C == 0:
        return torch.zeros(B, C, dtype=torch.float32, device=completion_ids_BC.device)
    if not _plain_head(model):  # the model scales or soft-caps its logits: its own forward
        return _model_logits_logprobs(model, prompt_ids_BP, prompt_lens_B, completion_ids_BC,
                                      completion_lens_B, temperature, max_logits_bytes)
    head = model.get_output_embeddings()
    vocab, hidden = head.weight.shape
    rows, tokens = plan_chunks(B, prompt_ids_BP.shape[1] + C, hidden, vocab, max_logits_bytes,
                               grad=torch.is_grad_enabled())
    group_B = prompt_groups(prompt_ids_BP, prompt_lens_B)
    packed = packs(model) if packed is None else packed
    out = []
    for s in range(0, B, rows):
        sl = slice(s, s + rows)
        mask_bC = mask_from_lengths(completion_lens_B[sl], C)
        if packed:
            ids_1N, pos_1N, predict_n = packed_inputs(prompt_ids_BP[sl], prompt_lens_B[sl],
                                                      completion_ids_BC[sl], completion_lens_B[sl])
            hidden_nH = final_hidden(model, input_ids=ids_1N, position_ids=pos_1N, use_cache=False)[0, predict_n]
            logp_N = head_logprobs(hidden_nH, head.weight, head.bias, completion_ids_BC[sl][mask_bC],
                                   temperature, tokens)
            out.append(torch.zeros(mask_bC.shape, dtype=torch.float32,
                                   device=logp_N.device).masked_scatter(mask_bC, logp_N))
            continue
        if share_prompts and int(group_B[sl].unique().numel()) < len(group_B[sl]) \
                and _prefix_cache(model) is not None:
            hidden_bCH = _shared_prompt_hidden(model, prompt_ids_BP[sl], prompt_lens_B[sl],
                                               completion_ids_BC[sl], completion_lens_B[sl])
        else:
            ids_bT, attn_bT, pos_bT = sequence_inputs(prompt_ids_BP[sl], prompt_lens_B[sl],
                                                      completion_ids_BC[sl], completion_lens_B[sl])
            hidden_bCH = final_hidden(model, input_ids=ids_bT, attention_mask=attn_bT,
                                      position_ids=pos_bT, use_cache=False)[:, -C - 1:-1]
        logp_N = head_logprobs(hidden_bCH[mask_bC], head.weight, head.bias,
                               completion_ids_BC[sl][mask_bC], temperature, tokens)
        out.append(torch.zeros(mask_bC.shape, dtype=torch.float32,
                               device=logp_N.device).masked_scatter(mask_bC, logp_N))
    return torch.cat(out, 0)


def final_hidden(model, **inputs) -> torch.Tensor:
    """The model's final (normed) hidden states [b, T, H], the LM head's input.

    With gradients the call goes through `model` itself (a DeepSpeed engine registers its backward
    hooks on the outputs of its own forward), asking for the hidden states and one position's
    logits; without, through the decoder alone, which keeps no per-layer hidden states."""
    if torch.is_grad_enabled():
        return model(**inputs, output_hidden_states=True, logits_to_keep=1).hidden_states[-1]
    return model.get_decoder()(**inputs).last_hidden_state


def _plain_head(model) -> bool:
    """Whether the logits are exactly `lm_head(hidden)` (not scaled or soft-capped, as Gemma 2's)."""
    cfg = _hf_config(model).get_text_config()
    return all(getattr(cfg, name, None) in (None, plain) for name, plain in (
        ("final_logit_softcapping", None), ("logit_scale", 1.0), ("logits_scaling", 1.0)))


def _model_logits_logprobs(model, prompt_ids_BP, prompt_lens_B, completion_ids_BC, completion_lens_B,
                           temperature: float, max_logits_bytes: int) -> torch.Tensor:
    """[B, C] from the model's own logits (whatever its head does to them), in row chunks of at most
    `max_logits_bytes` of fp32 logits; in training those logits stay alive until backward."""
    B, C = completion_ids_BC.shape
    vocab = model.get_output_embeddings().weight.shape[0]
    rows = max(1, int(max_logits_bytes // ((C + 1) * vocab * 4)))
    out = []
    for s in range(0, B, rows):
        sl = slice(s, s + rows)
        ids_bT, attn_bT, pos_bT = sequence_inputs(prompt_ids_BP[sl], prompt_lens_B[sl],
                                                  completion_ids_BC[sl], completion_lens_B[sl])
        logits_bCV = model(input_ids=ids_bT, attention_mask=attn_bT, position_ids=pos_bT,
                           logits_to_keep=C + 1, use_cache=False).logits[:, :-1]
        out.append(token_logprobs(logits_bCV, completion_ids_BC[sl], temperature))
    return torch.where(mask_from_lengths(completion_lens_B, C), torch.cat(out, 0), 0.0)


def _hf_config(model):
    """The transformers config of `model`, also through a DeepSpeed engine (whose `config` is its own)."""
    return getattr(model, "module", model).config


class _PrefixLayer(DynamicLayer):
    """A KV-cache layer for one forward pass that may be run twice (recomputed under activation
    checkpointing): `update` returns cat(prefix, new keys/values) and stores nothing, except that
    with `record` it keeps the first keys/values it is given in `recorded` (the prompt pass)."""

    def __init__(self, prefix: tuple[torch.Tensor, torch.Tensor] | None = None, record: bool = False):
        super().__init__()
        self.record, self.recorded = record, None
        if prefix is not None:
            self.keys, self.values = prefix
            self.device, self.is_initialized = prefix[0].device, True

    def update(self, key_states, value_states, *args, **kwargs):
        if self.record and self.recorded is None:
            self.recorded = (key_states, value_states)
        if not self.is_initialized:
            return key_states, value_states
        return torch.cat([self.keys, key_states], -2), torch.cat([self.values, value_states], -2)


def _prefix_cache(model, layers: list[_PrefixLayer] | None = None):
    """A DynamicCache for `model` made of `layers` (default: empty recording layers), or None when the
    model's cache has other layer kinds (sliding windows, ...): those use the plain path."""
    cache = DynamicCache(config=_hf_config(model))
    if not cache.layers or any(type(layer) is not DynamicLayer for layer in cache.layers):
        return None
    cache.layers = layers if layers is not None else [_PrefixLayer(record=True) for _ in cache.layers]
    return cache


def prompt_groups(prompt_ids_BP: torch.Tensor, prompt_lens_B: torch.Tensor) -> torch.Tensor:
    """[B] group index: consecutive rows with the same prompt share an index."""
    same_B = torch.zeros(prompt_ids_BP.shape[0], dtype=torch.bool)
    if prompt_ids_BP.shape[0] > 1:
        same_B[1:] = (prompt_ids_BP[1:] == prompt_ids_BP[:-1]).all(1).cpu() & \
            (prompt_lens_B[1:] == prompt_lens_B[:-1]).cpu()
    return torch.cumsum(~same_B, 0) - 1


def _shared_prompt_hidden(model, prompt_ids_bP, prompt_lens_b, completion_ids_bC, completion_lens_b):
    """Final hidden states predicting each completion token [b, C, H], each distinct prompt run once."""
    b, P = prompt_ids_bP.shape
    C = completion_ids_bC.shape[1]
    group_b = prompt_groups(prompt_ids_bP, prompt_lens_b).to(prompt_ids_bP.device)
    first_u = torch.nonzero(torch.cat([torch.ones(1, dtype=torch.bool, device=group_b.device),
                                       group_b[1:] != group_b[:-1]])).squeeze(1)
    p_attn_bP = mask_from_lengths(prompt_lens_b, P).flip(1).long()
    p_pos_bP = (p_attn_bP.cumsum(1) - 1).clamp(min=0)
    cache = _prefix_cache(model)
    prompt_uPH = final_hidden(model, input_ids=prompt_ids_bP[first_u], attention_mask=p_attn_bP[first_u],
                              position_ids=p_pos_bP[first_u], use_cache=True, **cache_kwargs(cache))
    first_b1H = prompt_uPH[:, -1:][group_b]  # the last prompt position predicts completion token 0
    recorded = [layer.recorded for layer in cache.layers]
    for layer in cache.layers:  # a recomputation in backward neither records nor keeps them again
        layer.record, layer.recorded = False, None
    if C == 1:
        return first_b1H
    # each prompt's keys/values repeated for its rows (differentiable: gradients reach the prompt)
    cache = _prefix_cache(model, [_PrefixLayer((k[group_b], v[group_b])) for k, v in recorded])
    c_attn_bC = mask_from_lengths(completion_lens_b, C).long()
    attn_bT = torch.cat([p_attn_bP, c_attn_bC[:, :-1]], 1)
    pos_bC = prompt_lens_b[:, None] + torch.arange(C - 1, device=prompt_lens_b.device)[None]
    rest_bCH = final_hidden(model, input_ids=completion_ids_bC[:, :-1], attention_mask=attn_bT,
                            position_ids=pos_bC, use_cache=True, **cache_kwargs(cache),
                            cache_position=torch.arange(P, P + C - 1, device=prompt_ids_bP.device))
    return torch.cat([first_b1H, rest_bCH], 1)


def token_logprobs(logits_BCV: torch.Tensor, ids_BC: torch.Tensor, temperature: float = 1.0):
    """log_softmax(logits / temperature)[ids] without materialising the full log_softmax."""
    logits_BCV = logits_BCV.float()
    if temperature != 1.0:
        logits_BCV = logits_BCV / temperature
    picked_BC = logits_BCV.gather(-1, ids_BC.unsqueeze(-1)).squeeze(-1)
    return picked_BC - torch.logsumexp(logits_BCV, dim=-1)
