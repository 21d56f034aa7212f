"""Per-token log-probabilities of completion tokens, for the policy and for the reference model.

Batch layout used everywhere (it is what `generate` returns for left-padded prompts):
    prompt_ids_BP      [B, P]  prompts left-padded to width P; row i's prompt is its last p_i tokens
    completion_ids_BC  [B, C]  completions right-padded to width C; row i's completion is its first c_i
The model sees `cat(prompt, completion)` with an attention mask and position ids built from those
lengths, so padding never changes a real token's log-prob. The result is [B, C], aligned with the
completion, exactly 0 beyond each completion's length.

Memory: logits are only computed for the completion positions (`logits_to_keep`) and rows are
processed in chunks so that one chunk's fp32 logits stay under `max_logits_bytes`; the
log-softmax is `gather - logsumexp`, never a full-vocabulary log_softmax copy.
"""
from __future__ import annotations

import torch

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
                        temperature: float = 1.0, max_logits_bytes: int = 1 << 30) -> torch.Tensor:
    """log p(completion token | prefix) for every completion token -> [B, C] float32.

    Differentiable when called with grad enabled (the trainer), cheap under inference_mode
    (the reference server)."""
    B, C = completion_ids_BC.shape
    if B == 0 or C == 0:
        return torch.zeros(B, C, dtype=torch.float32, device=completion_ids_BC.device)
    vocab = model.get_output_embeddings().weight.shape[0]
    rows = max(1, int(max_logits_bytes // ((C + 1) * vocab * 4)))
    ids_BT, attn_BT, pos_BT = sequence_inputs(prompt_ids_BP, prompt_lens_B, completion_ids_BC,
                                              completion_lens_B)
    out = []
    for s in range(0, B, rows):
        logits_bCV = model(input_ids=ids_BT[s:s + rows], attention_mask=attn_BT[s:s + rows],
                           position_ids=pos_BT[s:s + rows], logits_to_keep=C + 1,
                           use_cache=False).logits[:, :-1]  # position t predicts token t+1
        out.append(token_logprobs(logits_bCV, completion_ids_BC[s:s + rows], temperature))
    logp_BC = torch.cat(out, 0)
    return torch.where(mask_from_lengths(completion_lens_B, C), logp_BC, 0.0)


def token_logprobs(logits_BCV: torch.Tensor, ids_BC: torch.Tensor, temperature: float = 1.0):
    """log_softmax(logits / temperature)[ids] without materialising the full log_softmax."""
    logits_BCV = logits_BCV.float()
    if temperature != 1.0:
        logits_BCV = logits_BCV / temperature
    picked_BC = logits_BCV.gather(-1, ids_BC.unsqueeze(-1)).squeeze(-1)
    return picked_BC - torch.logsumexp(logits_BCV, dim=-1)
