"""EOS through the real rollout, with pad == EOS (as in SmolLM2 / Qwen chat models).

A random tiny model almost never samples EOS, so the first-EOS bookkeeping (lengths, masks, the
EOS token's own loss, DAPO's truncation flag) would go untested. `eos_prone_model` makes the tiny
model emit EOS at every step with a chosen probability; the tests below drive it through
`make_rollout` (both samplers), the log-probs and the loss, and the trainer end to end."""
from __future__ import annotations

import pytest
import torch

from simple_grpo.algo.logprobs import completion_logprobs
from simple_grpo.algo.losses import policy_loss
from simple_grpo.algo.masks import mask_from_lengths, truncated
from simple_grpo.models import build_tiny_model, build_tiny_tokenizer
from simple_grpo.train.policy_step import loss_mask
from simple_grpo.gen.reward_registry import (COMPLETION_TOKENS_KEY, RewardSpec, register,
                                               soft_overlong_punishment)
from simple_grpo.gen.rollout import SampleSettings, eos_token_ids, make_rollout

P_EOS = 0.2  # target probability of EOS at every step
MAX_NEW = 8  # a completion without EOS after 8 tokens is truncated (about 1 in 4 rows)
G = 4
QUESTIONS = ["What is 2+2?", "hi", "Name a colour.", "x"]


def eos_prone_model(p_eos: float, seed: int = 0, dim: int = 0, const: float = 1.0):
    """-> (tokenizer, model): the tiny model, emitting EOS with probability about `p_eos` (a bit
    less) at every step, whatever the context; the other tokens stay close to uniform.

    Hidden dimension `dim` is `const` in every token embedding, and no layer writes to it (the rows
    of o_proj and down_proj that output it are zero), so the residual stream carries it unchanged.
    It dominates the final RMSNorm, which maps it to about sqrt(hidden). The embeddings are tied to
    the LM head: every token's logit gains the same sqrt(hidden) * const (no effect on the softmax)
    except EOS, whose embedding carries extra weight in `dim` to make its logit log(p/(1-p)*(V-1))."""
    tok = build_tiny_tokenizer()
    assert tok.pad_token_id == tok.eos_token_id, "the tiny tokenizer pads with EOS"
    model = build_tiny_model(vocab_size=((len(tok) + 63) // 64) * 64, seed=seed).eval()
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight, "tied"
    V, H = model.get_input_embeddings().weight.shape
    with torch.no_grad():
        emb_VH = model.get_input_embeddings().weight
        emb_VH[:, dim] = const
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight[dim] = 0
            layer.mlp.down_proj.weight[dim] = 0
        eos_logit = torch.log(torch.tensor(p_eos / (1 - p_eos) * (V - 1)))
        emb_VH[tok.eos_token_id, dim] += eos_logit / H ** 0.5
    return tok, model


@register("test_eos_token_count")
def token_count(completion: str, example: dict) -> float:
    """The length the trainer reports to rewards: varies with where EOS fell."""
    return float(example[COMPLETION_TOKENS_KEY])


class InOrder:
    """A prompt stream that serves the examples in their order; each batch's sampling seed is
    where the stream stands (as PromptStream's)."""

    def __init__(self, examples):
        self.examples, self.i = examples, 0

    def next_batch(self, n):
        self.i += n
        return self.examples[self.i - n:self.i]

    def sampling_seed(self):
        return self.i


def first_eos_lengths(ids_NC: torch.Tensor, eos: int) -> list[int]:
    """By hand: up to and including the first EOS; the full width without one."""
    return [row.index(eos) + 1 if eos in row else len(row) for row in ids_NC.tolist()]


@pytest.fixture(scope="module")
def tok_model():
    return eos_prone_model(P_EOS)


@pytest.fixture(scope="module", params=["loop", "generate"])
def rolled(request, tok_model):
    """A real rollout: sampling (recording its log-probs), decoding, scoring (token count + DAPO
    overlong), advantages."""
    tok, model = tok_model
    examples = [{"question": q, "answer": "0"} for q in QUESTIONS]
    torch.manual_seed(0)
    r = make_rollout(model, tok, InOrder(examples), len(QUESTIONS),
                     SampleSettings(num_generations=G, max_new_tokens=MAX_NEW, sampler=request.param),
                     [RewardSpec("test_eos_token_count"), RewardSpec("overlong")],
                     system_render=lambda e: e["question"], eos_ids=eos_token_ids(tok, model),
                     record_logprobs=True)
    return tok, model, r


def test_the_model_emits_eos_at_about_the_chosen_rate(tok_model):
    tok, model = tok_model
    ids_1T = tok("Some prompt, then a few more tokens.", return_tensors="pt").input_ids
    with torch.no_grad():
        p_T = model(input_ids=ids_1T).logits[0].softmax(-1)[:, tok.eos_token_id]
    assert ((p_T > P_EOS / 2) & (p_T < P_EOS)).all(), p_T  # the same at every position


def test_lengths_are_first_eos_inclusive(rolled):
    tok, _, r = rolled
    eos = tok.eos_token_id
    ids_NC, lens_N = r.batch.completion_ids, r.batch.completion_lens
    C = ids_NC.shape[1]
    hand_N = first_eos_lengths(ids_NC, eos)
    assert lens_N.tolist() == hand_N
    ended = [n for n, row in zip(hand_N, ids_NC.tolist()) if eos in row]
    assert len(ended) >= len(hand_N) // 2, "most rows end with EOS"
    assert len(set(ended)) >= 3 and min(ended) < C, "at various positions before the width"
    assert len(ended) < len(hand_N), "some rows are truncated"
    for row, n in zip(ids_NC.tolist(), hand_N):
        assert all(t == eos for t in row[n:]), "padded with pad == EOS after the end"
        assert (row[n - 1] == eos) == (eos in row), "the last counted token is the EOS, if any"
    mask_NC = mask_from_lengths(lens_N, C)
    assert mask_NC.sum(1).tolist() == hand_N
    assert all(mask_NC[i, n - 1] for i, n in enumerate(hand_N)), "the EOS token is in the mask"


def test_rewards_and_stats_see_the_lengths(rolled):
    tok, _, r = rolled
    ids_NC = r.batch.completion_ids
    hand_N = first_eos_lengths(ids_NC, tok.eos_token_id)
    assert r.breakdown["test_eos_token_count"] == [float(n) for n in hand_N]
    assert r.breakdown["overlong"] == [soft_overlong_punishment(n, MAX_NEW) for n in hand_N]
    assert r.completions == [tok.decode(row[:n], skip_special_tokens=True)
                             for row, n in zip(ids_NC.tolist(), hand_N)]
    assert r.stats["completion_len_mean"] == pytest.approx(sum(hand_N) / len(hand_N))
    assert (r.batch.advantages != 0).any(), "the lengths vary within groups"


def test_truncated_flags_exactly_the_rows_without_eos(rolled):
    tok, model, r = rolled
    eos = tok.eos_token_id
    trunc_N = truncated(r.batch.completion_ids, r.batch.completion_lens, eos_token_ids(tok, model))
    assert trunc_N.tolist() == [eos not in row for row in r.batch.completion_ids.tolist()]


@pytest.mark.parametrize("overlong_filter", [
    False,  # every row trains, the EOS token included
    True,  # DAPO: truncated rows drop out entirely, rows that ended with EOS keep their EOS
])
def test_the_eos_token_gets_a_gradient(rolled, overlong_filter):
    tok, model, r = rolled
    b = r.batch
    eos = tok.eos_token_id
    trunc_N = truncated(b.completion_ids, b.completion_lens, eos_token_ids(tok, model))
    mask_NC = loss_mask(b, trunc_N, overlong_filter)
    logp_NC = completion_logprobs(model, b.prompt_ids, b.prompt_lens, b.completion_ids, b.completion_lens)
    logp_NC.retain_grad()
    loss, _ = policy_loss(logp_NC, None, None, b.advantages, mask_NC)
    loss.backward()
    model.zero_grad(set_to_none=True)
    grad_NC, logp_NC = logp_NC.grad, logp_NC.detach()
    torch.testing.assert_close(b.gen_logprobs, logp_NC, atol=1e-4, rtol=0)  # the sampler's, EOS too
    rows = zip(b.completion_ids.tolist(), first_eos_lengths(b.completion_ids, eos), b.advantages.tolist())
    for i, (row, n, adv) in enumerate(rows):  # n: the length by hand
        assert (grad_NC[i, n:] == 0).all() and (logp_NC[i, n:] == 0).all(), "nothing past the length"
        ended = eos in row
        if ended:  # the EOS is scored like any token: log p(EOS) at about log P_EOS
            assert -3.0 < float(logp_NC[i, n - 1]) < -1.0, (i, n, logp_NC[i])
        trains = adv != 0 and (ended or not overlong_filter)
        assert (grad_NC[i] != 0).tolist() == [trains and t < n for t in range(len(row))], (i, n, grad_NC[i])


def test_trainer_end_to_end_stops_at_eos(tmp_path):
    """The whole trainer on the EOS-prone model: lengths below the limit, some rows truncated
    (about 12 s, mostly the trainer's start-up, as in test_trainer.py)."""
    import json
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import grpo_ref_split

    tok, model = eos_prone_model(P_EOS)
    model.save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    args = dict(model=tmp_path / "model", run_dir=tmp_path / "run", steps=2, prompts_per_step=4,
                num_generations=4, micro_batch_size=8, max_new_tokens=MAX_NEW, eval_every=0, lr=1e-4,
                warmup_steps=1, rewards="test_eos_token_count", save_every=0, plot_every=0)
    grpo_ref_split.main([f"--{k}={v}" for k, v in args.items()])
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2
    for row in rows:
        assert 1 <= row["completion_len_mean"] < MAX_NEW - 2, row
        assert 0 < row["truncated_frac"] < 1, row
