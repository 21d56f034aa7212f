"""Per-token log-probabilities of completion tokens, for the policy and for the reference model.

Batch layout used everywhere (it is what `generate` returns for left-padded prompts):
    prompt_ids_BP      [B, P]  prompts left-padded to width P; row i's prompt is its last p_i tokens
    completion_ids_BC  [B, C]  completions right-padded to width C; row i's completion is its first c_i
The model sees `cat(prompt, completion)` with an attention mask and position ids built from those
lengths, so padding never changes a real token's log-prob. The result is [B, C], aligned with the
completion, exactly 0 beyond each completion's length.

Shared prompts: the G completions of a group share one prompt, and a causal model's prompt states
do not depend on what follows. So each distinct prompt is run once (with gradients when training),
its KV cache is repeated for the group's rows, and only completion tokens are run per row. For
the default run (70-token prompts, 48-token completions, G = 8) this halves the tokens the
transformer processes; gradients still flow into the prompt states through the repeated cache.

Memory: logits are only computed for the completion positions (`logits_to_keep`) and rows are
processed in chunks so that one chunk's fp32 logits stay under `max_logits_bytes`; the
log-softmax is `gather - logsumexp`, never a full-vocabulary log_softmax copy.
"""
from __future__ import annotations

import torch

from simple_grpo.hf_compat import cache_kwargs, output_cache
from simple_grpo.masks import mask_from_lengths


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


def completion_logprobs(model, prompt_ids_BP: torch.Tensor, prompt_lens_B: torch.Tensor,
                        completion_ids_BC: torch.Tensor, completion_lens_B: torch.Tensor, *,
                        temperature: float = 1.0, max_logits_bytes: int = 1 << 30,
                        share_prompts: bool = True) -> torch.Tensor:
    """log p(completion token | prefix) for every completion token -> [B, C] float32.

    Differentiable when called with grad enabled (the trainer), cheap under inference_mode
    (the reference server)."""
    B, C = completion_ids_BC.shape
    if B == 0 or C == 0:
        return torch.zeros(B, C, dtype=torch.float32, device=completion_ids_BC.device)
    vocab = model.get_output_embeddings().weight.shape[0]
    rows = max(1, int(max_logits_bytes // ((C + 1) * vocab * 4)))
    group_B = prompt_groups(prompt_ids_BP, prompt_lens_B)
    out = []
    for s in range(0, B, rows):
        sl = slice(s, s + rows)
        if share_prompts and int(group_B[sl].unique().numel()) < len(group_B[sl]):
            logits_bCV = _shared_prompt_logits(model, prompt_ids_BP[sl], prompt_lens_B[sl],
                                               completion_ids_BC[sl], completion_lens_B[sl])
        else:
            ids_bT, attn_bT, pos_bT = sequence_inputs(prompt_ids_BP[sl], prompt_lens_B[sl],
                                                      completion_ids_BC[sl], completion_lens_B[sl])
            logits_bCV = model(input_ids=ids_bT, attention_mask=attn_bT, position_ids=pos_bT,
                               logits_to_keep=C + 1, use_cache=False).logits[:, :-1]
        out.append(token_logprobs(logits_bCV, completion_ids_BC[sl], temperature))
    logp_BC = torch.cat(out, 0)
    return torch.where(mask_from_lengths(completion_lens_B, C), logp_BC, 0.0)


def prompt_groups(prompt_ids_BP: torch.Tensor, prompt_lens_B: torch.Tensor) -> torch.Tensor:
    """[B] group index: consecutive rows with the same prompt share an index."""
    same_B = torch.zeros(prompt_ids_BP.shape[0], dtype=torch.bool)
    if prompt_ids_BP.shape[0] > 1:
        same_B[1:] = (prompt_ids_BP[1:] == prompt_ids_BP[:-1]).all(1).cpu() & \
            (prompt_lens_B[1:] == prompt_lens_B[:-1]).cpu()
    return torch.cumsum(~same_B, 0) - 1


def _shared_prompt_logits(model, prompt_ids_bP, prompt_lens_b, completion_ids_bC, completion_lens_b):
    """Logits predicting each completion token [b, C, V], each distinct prompt run only once."""
    b, P = prompt_ids_bP.shape
    C = completion_ids_bC.shape[1]
    group_b = prompt_groups(prompt_ids_bP, prompt_lens_b).to(prompt_ids_bP.device)
    first_u = torch.nonzero(torch.cat([torch.ones(1, dtype=torch.bool, device=group_b.device),
                                       group_b[1:] != group_b[:-1]])).squeeze(1)
    p_attn_bP = mask_from_lengths(prompt_lens_b, P).flip(1).long()
    p_pos_bP = (p_attn_bP.cumsum(1) - 1).clamp(min=0)
    out = model(input_ids=prompt_ids_bP[first_u], attention_mask=p_attn_bP[first_u],
                position_ids=p_pos_bP[first_u], use_cache=True, logits_to_keep=1)
    cache = output_cache(out)
    cache.reorder_cache(group_b)  # repeat each prompt's keys/values for its rows (differentiable)
    first_bV = out.logits[:, -1][group_b]  # the last prompt position predicts completion token 0
    if C == 1:
        return first_bV[:, None]
    c_attn_bC = mask_from_lengths(completion_lens_b, C).long()
    attn_bT = torch.cat([p_attn_bP, c_attn_bC[:, :-1]], 1)
    pos_bC = prompt_lens_b[:, None] + torch.arange(C - 1, device=prompt_lens_b.device)[None]
    rest_bCV = model(input_ids=completion_ids_bC[:, :-1], attention_mask=attn_bT, position_ids=pos_bC,
                     use_cache=True, **cache_kwargs(cache),
                     cache_position=torch.arange(P, P + C - 1, device=prompt_ids_bP.device)).logits
    return torch.cat([first_bV[:, None], rest_bCV], 1)


def token_logprobs(logits_BCV: torch.Tensor, ids_BC: torch.Tensor, temperature: float = 1.0):
    """log_softmax(logits / temperature)[ids] without materialising the full log_softmax."""
    logits_BCV = logits_BCV.float()
    if temperature != 1.0:
        logits_BCV = logits_BCV / temperature
    picked_BC = logits_BCV.gather(-1, ids_BC.unsqueeze(-1)).squeeze(-1)
    return picked_BC - torch.logsumexp(logits_BCV, dim=-1)
