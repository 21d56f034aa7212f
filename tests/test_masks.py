"""Completion masks come from lengths / the first EOS, never from token == pad_id."""
import pytest
import torch

from simple_grpo.algo.masks import lengths_from_eos, mask_from_lengths, truncated
from simple_grpo.models import build_tiny_tokenizer

EOS = 2  # also the pad id, as in SmolLM2 / Qwen chat models


@pytest.mark.parametrize("row, length, is_truncated", [
    ([5, 6, EOS, EOS, EOS], 3, False),  # EOS then padding that equals EOS: the first EOS is kept
    ([5, 6, 7, 8, 9], 5, True),         # no EOS: ran into max_new_tokens, whole row, truncated
    ([EOS, EOS, EOS, EOS, EOS], 1, False),  # immediate EOS: a length-1 completion, still trained
    ([5, 6, 7, 8, EOS], 5, False),      # EOS exactly at the last position: not truncated
])
def test_lengths_from_first_eos(row, length, is_truncated):
    ids = torch.tensor([row])
    L = lengths_from_eos(ids, EOS)
    assert L.tolist() == [length]
    assert truncated(ids, L, EOS).tolist() == [is_truncated]
    mask = mask_from_lengths(L, ids.shape[1])
    assert mask.sum().item() == length
    if not is_truncated:
        assert ids[0][mask[0]][-1].item() == EOS, "the EOS token must be inside the mask"
    naive = ids != EOS  # the bug this module exists to avoid
    assert not torch.equal(mask, naive) or is_truncated


def test_several_eos_ids():
    ids = torch.tensor([[5, 9, 2, 7], [5, 2, 9, 7]])
    assert lengths_from_eos(ids, [2, 9]).tolist() == [2, 2]


def test_with_real_tokenizer_pad_equals_eos():
    tok = build_tiny_tokenizer()
    assert tok.pad_token_id == tok.eos_token_id
    completion = tok("4</answer>").input_ids + [tok.eos_token_id] + [tok.pad_token_id] * 3
    L = lengths_from_eos(torch.tensor([completion]), tok.eos_token_id)
    assert L.item() == len(completion) - 3
    assert mask_from_lengths(L, len(completion))[0, L.item() - 1], "EOS is trained"
