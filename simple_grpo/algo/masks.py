"""Completion masks from lengths or the first EOS -- never from `token == pad_id`.

When pad == EOS (SmolLM2, Qwen, Llama-3 chat models) a mask built from `token != pad_id` would
drop the EOS token itself, and the model would never be taught to stop. Here the EOS that ends a
completion is *inside* the mask, and everything after it is outside.
"""
from __future__ import annotations

from collections.abc import Iterable

import torch


def mask_from_lengths(lengths_B: torch.Tensor, width: int) -> torch.Tensor:
    """[B] lengths -> [B, width] bool mask, True for positions < length."""
    assert lengths_B.dim() == 1, f"lengths must be [B], got {tuple(lengths_B.shape)}"
    assert lengths_B.numel() == 0 or int(lengths_B.max()) <= width, f"a length exceeds the width {width}"
    return torch.arange(width, device=lengths_B.device)[None, :] < lengths_B[:, None]


def lengths_from_eos(completion_ids_BC: torch.Tensor, eos_ids: int | Iterable[int]) -> torch.Tensor:
    """Length of each completion up to and including its first EOS; the full width when it has none
    (a truncated completion)."""
    assert completion_ids_BC.dim() == 2, f"completion ids must be [B, C], got {tuple(completion_ids_BC.shape)}"
    eos = torch.tensor(sorted({eos_ids} if isinstance(eos_ids, int) else set(eos_ids)),
                       device=completion_ids_BC.device)
    is_eos_BC = torch.isin(completion_ids_BC, eos)
    width = completion_ids_BC.shape[1]
    first_B = torch.where(is_eos_BC.any(1), is_eos_BC.int().argmax(1), width - 1)
    lengths_B = first_B + 1
    return torch.where(is_eos_BC.any(1), lengths_B, torch.full_like(lengths_B, width))


def truncated(completion_ids_BC: torch.Tensor, lengths_B: torch.Tensor,
              eos_ids: int | Iterable[int]) -> torch.Tensor:
    """[B] bool: the completion hit the length limit without emitting EOS (DAPO overlong filter)."""
    eos = torch.tensor(sorted({eos_ids} if isinstance(eos_ids, int) else set(eos_ids)),
                       device=completion_ids_BC.device)
    last_B = completion_ids_BC.gather(1, (lengths_B.clamp(min=1) - 1)[:, None]).squeeze(1)
    return (lengths_B == 0) | ~torch.isin(last_B, eos)
