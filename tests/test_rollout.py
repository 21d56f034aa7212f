"""Rollouts on a tiny model: dynamic sampling refills to a full batch of informative groups (and
counts what it did), the overlong filter masks exactly the truncated completions."""
import pytest
import torch

from simple_grpo.codec import RolloutBatch
from simple_grpo.policy_step import loss_mask
from simple_grpo.reward_registry import RewardSpec, register
from simple_grpo.rollout import SampleSettings, eos_token_ids, make_rollout, sample

G = 4


@register("test_flat_or_varied")
def flat_or_varied(completion: str, example: dict) -> float:
    """Constant for examples marked flat (a zero-variance group), varied otherwise."""
    return 1.0 if example["flat"] else float(len(set(completion)))


class InOrder:
    """A prompt stream that serves the examples in their order (the trainer only calls next_batch)."""

    def __init__(self, examples):
        self.examples, self.i = examples, 0

    def next_batch(self, n):
        out = self.examples[self.i:self.i + n]
        self.i += n
        return out


@pytest.fixture(scope="module")
def tok_model(tiny_model_dir):
    from simple_grpo.models import load_model, load_tokenizer

    return load_tokenizer(str(tiny_model_dir)), load_model(str(tiny_model_dir)).eval()


def roll(tok_model, flags, n_prompts, max_refill_rounds, dynamic=True, temperature=1.0):
    tok, model = tok_model
    examples = [{"question": f"q{i}", "answer": "0", "flat": f} for i, f in enumerate(flags)]
    stream = InOrder(examples)
    torch.manual_seed(0)
    return make_rollout(model, tok, stream, n_prompts,
                        SampleSettings(num_generations=G, max_new_tokens=6, temperature=temperature),
                        [RewardSpec("test_flat_or_varied")], system_render=lambda e: e["question"],
                        eos_ids=eos_token_ids(tok, model), dynamic_sampling=dynamic,
                        max_refill_rounds=max_refill_rounds)


@pytest.mark.parametrize("flags, n_prompts, rounds, refills, topped, questions", [
    # 2 wanted; the first round (q0 flat, q1 varied) keeps one, one refill round brings q2
    ([True, False, False, True], 2, 4, 1, 0, ["q1", "q2"]),
    # first round q0, q1 both flat; refill round takes q2 (flat) and q3 (varied); a second refill q4
    ([True, True, True, False, False, True], 2, 4, 2, 0, ["q3", "q4"]),
    # refills exhausted (bound 1): top up with a zero-variance group, counted
    ([True, False, True, True, True, True], 2, 1, 1, 1, ["q1", "q0"]),
])
def test_dynamic_sampling_refills_to_a_full_batch(tok_model, flags, n_prompts, rounds, refills, topped,
                                                  questions):
    r = roll(tok_model, flags, n_prompts, rounds)
    assert r.batch.batch_size == n_prompts * G, "the batch is always full"
    assert [e["question"] for e in r.examples] == questions
    assert r.stats["refill_rounds"] == refills
    assert r.stats["topped_up_groups"] == topped
    adv = r.batch.advantages.view(n_prompts, G)
    informative = (adv != 0).any(1).sum().item()
    assert informative == n_prompts - topped, "only topped-up groups have zero advantages"
    assert r.stats["zero_var_frac"] == sum(flags[:n_prompts]) / n_prompts  # first round only


def test_without_dynamic_sampling_flat_groups_stay(tok_model):
    r = roll(tok_model, [True, False], 2, 4, dynamic=False)
    assert [e["question"] for e in r.examples] == ["q0", "q1"]
    assert r.stats["refill_rounds"] == 0
    assert (r.batch.advantages.view(2, G)[0] == 0).all()


def test_batch_carries_the_sampling_temperature(tok_model):
    """The reference server scores a batch at its temperature (trainer's and workers' batches)."""
    assert roll(tok_model, [False], 1, 0, dynamic=False).batch.temperature == 1.0
    assert roll(tok_model, [False], 1, 0, dynamic=False, temperature=0.7).batch.temperature == 0.7


def test_overlong_filter_masks_exactly_the_truncated():
    EOS = 2
    comp = torch.tensor([[5, 6, EOS, EOS],   # ended with EOS: kept
                         [5, 6, 7, 8],       # no EOS within the limit: truncated, masked out
                         [EOS, EOS, EOS, EOS],  # immediate EOS: kept (length 1)
                         [5, 6, 7, EOS]])    # EOS at the last position: kept
    lens = torch.tensor([3, 4, 1, 4])
    batch = RolloutBatch(prompt_ids=torch.ones(4, 2, dtype=torch.long), prompt_lens=torch.full((4,), 2),
                         completion_ids=comp, completion_lens=lens, rewards=torch.zeros(4),
                         advantages=torch.ones(4))
    unfiltered = loss_mask(batch, [EOS], overlong_filter=False)
    filtered = loss_mask(batch, [EOS], overlong_filter=True)
    assert unfiltered.sum(1).tolist() == [3, 4, 1, 4]
    assert filtered.sum(1).tolist() == [3, 0, 1, 4]


def test_sampling_min_new_tokens_gives_fixed_lengths(tok_model):
    tok, model = tok_model
    s = SampleSettings(num_generations=3, max_new_tokens=5, min_new_tokens=5)
    _, p_lens, c_ids, c_lens = sample(model, tok, ["a", "bcd"], s, eos_token_ids(tok, model))
    assert c_ids.shape == (6, 5) and p_lens.tolist() == [1, 1, 1, 3, 3, 3]
    assert c_lens.tolist() == [5] * 6
