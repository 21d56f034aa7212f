"""Rollouts on a tiny model: dynamic sampling refills to a full batch of informative groups (and
counts what it did), the overlong filter masks exactly the truncated completions."""
import pytest
import torch

from simple_grpo.algo.masks import truncated
from simple_grpo.train.policy_step import loss_mask
from simple_grpo.train.reward_registry import RewardSpec, register
from simple_grpo.train.rollout import SampleSettings, eos_token_ids, make_rollout, sample
from simple_grpo.wire.codec import RolloutBatch

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
    unfiltered = loss_mask(batch, truncated(comp, lens, [EOS]), overlong_filter=False)
    filtered = loss_mask(batch, truncated(comp, lens, [EOS]), overlong_filter=True)
    assert unfiltered.sum(1).tolist() == [3, 4, 1, 4]
    assert filtered.sum(1).tolist() == [3, 0, 1, 4]


def test_sampling_min_new_tokens_gives_fixed_lengths(tok_model):
    tok, model = tok_model
    s = SampleSettings(num_generations=3, max_new_tokens=5, min_new_tokens=5)
    _, p_lens, c_ids, c_lens = sample(model, tok, ["a", "bcd"], s, eos_token_ids(tok, model))
    assert c_ids.shape == (6, 5) and p_lens.tolist() == [1, 1, 1, 3, 3, 3]
    assert c_lens.tolist() == [5] * 6


_calls = {"acc": 0, "fmt": 0}


def _alternating(name: str) -> float:
    """0, 1, 0, 1, ... per call: a group of G=4 consecutive completions always varies."""
    _calls[name] += 1
    return float(_calls[name] % 2)


@register("test_filter_acc")
def filter_acc(completion: str, example: dict) -> float:
    """A fake correctness reward: 1.0 for every completion of an acc_flat example, else 0/1."""
    return 1.0 if example["acc_flat"] else _alternating("acc")


@register("test_filter_fmt")
def filter_fmt(completion: str, example: dict) -> float:
    """A fake format reward: 1.0 for every completion of a fmt_flat example, else 0/1."""
    return 1.0 if example["fmt_flat"] else _alternating("fmt")


# (acc_flat, fmt_flat) per prompt: q0 correctness flat but format varies (its total varies too);
# q1 correctness varies, format flat; q2 both vary; q3 both flat. Total = acc + 0.25 * fmt.
FILTER_FLAGS = [(True, False), (False, True), (False, False), (True, True)]


@pytest.mark.parametrize("metric, questions, refills, zero_var", [
    # DAPO / verl: filter on correctness -> q0 (flat accuracy) is dropped, one refill brings q2
    ("test_filter_acc", ["q1", "q2"], 1, 1 / 2),
    # the weighted total (the old behaviour): q0's total varies through the format reward, kept
    ("reward", ["q0", "q1"], 0, 0.0),
    # any reward by name, unweighted: q1 has a flat format reward -> dropped, q2 refills
    ("test_filter_fmt", ["q0", "q2"], 1, 1 / 2),
])
def test_dynamic_sampling_filters_on_the_chosen_metric(tok_model, metric, questions, refills, zero_var):
    tok, model = tok_model
    examples = [{"question": f"q{i}", "answer": "0", "acc_flat": a, "fmt_flat": f}
                for i, (a, f) in enumerate(FILTER_FLAGS)]
    torch.manual_seed(0)
    r = make_rollout(model, tok, InOrder(examples), 2, SampleSettings(num_generations=G, max_new_tokens=4),
                     [RewardSpec("test_filter_acc", 1.0), RewardSpec("test_filter_fmt", 0.25)],
                     system_render=lambda e: e["question"], eos_ids=eos_token_ids(tok, model),
                     dynamic_sampling=True, max_refill_rounds=4, filter_metric=metric)
    assert [e["question"] for e in r.examples] == questions
    assert r.stats["refill_rounds"] == refills
    assert r.stats["zero_var_frac"] == zero_var  # first round, flat in the filter metric
    # advantages still come from the weighted total of every reward
    totals = [a + 0.25 * f for a, f in zip(r.breakdown["test_filter_acc"], r.breakdown["test_filter_fmt"])]
    assert r.batch.rewards.tolist() == pytest.approx(totals)


def test_unknown_filter_metric_is_a_user_error(tok_model):
    from simple_grpo.errors import UserError

    tok, model = tok_model
    with pytest.raises(UserError, match="filter metric 'correct'"):
        make_rollout(model, tok, InOrder([{"question": "q", "answer": "0", "flat": False}]), 1,
                     SampleSettings(num_generations=G, max_new_tokens=4), [RewardSpec("test_flat_or_varied")],
                     system_render=lambda e: e["question"], eos_ids=eos_token_ids(tok, model),
                     dynamic_sampling=True, filter_metric="correct")


@pytest.mark.parametrize("overrides, rewards, expected", [
    # the default ('auto') makes --preset=dapo filter on correctness: --eval_reward, a reward here
    (dict(preset="dapo"), ["correct_lenient", "overlong"], "correct_lenient"),
    (dict(preset="dapo", eval_reward="correct"), ["format", "correct", "overlong"], "correct"),
    # 'auto' with the eval reward not among the rewards: the weighted total
    (dict(preset="dapo"), ["test_filter_fmt"], "reward"),
    # explicit choices are kept
    (dict(filter_metric="reward"), ["correct_lenient"], "reward"),
    (dict(filter_metric="test_filter_fmt"), ["test_filter_acc", "test_filter_fmt"], "test_filter_fmt"),
    # a name that is not a configured reward: UserError at start-up
    (dict(filter_metric="format"), ["correct_lenient"], None),
])
def test_filter_metric_default_and_choices(overrides, rewards, expected):
    from simple_grpo.errors import UserError
    from simple_grpo.train.config import TrainConfig, dynamic_filter_metric, resolve

    cfg = resolve(TrainConfig(**overrides))
    specs = [RewardSpec(name) for name in rewards]
    if expected is None:
        with pytest.raises(UserError, match="--filter_metric=format"):
            dynamic_filter_metric(cfg, specs)
    else:
        assert dynamic_filter_metric(cfg, specs) == expected


class _FakeEngine:
    """What train_on_batch calls on a DeepSpeed engine; records each micro-batch's loss."""

    def __init__(self):
        self.losses = []

    def backward(self, loss, scale_wrt_gas=False):
        self.losses.append(float(loss.detach()))

    def step(self):
        pass

    def get_global_grad_norm(self):
        return 0.0

    def get_lr(self):
        return [0.0]


@pytest.mark.parametrize("agg, expected", [
    # rows (EOS=2): 0 [5, EOS] A=1 kept (2 tokens) | 1 truncated A=5 dropped | 2 [5, 6, EOS] A=-0.5
    # kept (3 tokens) | 3 truncated A=7 dropped.  On-policy (ratio 1): pg_t = -A.
    # per-sequence mean over the 2 kept rows: (-1 + 0.5) / 2 = -0.25  (counting all 4 rows: -0.125)
    ("seq-mean-token-mean", -0.25),
    # token-mean: (2 * -1 + 3 * 0.5) / 5 tokens = -0.1 (dropped rows have no tokens either way)
    ("token-mean", -0.1),
    # Dr.GRPO: sum / (kept rows * max_tokens) = -0.5 / (2 * 3)  (counting all 4 rows: -0.5 / 12)
    ("seq-mean-token-sum-norm", -0.5 / 6),
])
def test_overlong_filtered_rows_do_not_count_as_sequences(monkeypatch, agg, expected):
    from simple_grpo.train import policy_step

    EOS = 2
    comp = torch.tensor([[5, EOS, EOS], [5, 6, 7], [5, 6, EOS], [5, 6, 7]])
    batch = RolloutBatch(prompt_ids=torch.ones(4, 2, dtype=torch.long), prompt_lens=torch.full((4,), 2),
                         completion_ids=comp, completion_lens=torch.tensor([2, 3, 3, 3]),
                         rewards=torch.zeros(4), advantages=torch.tensor([1.0, 5.0, -0.5, 7.0]))
    mask = loss_mask(batch, truncated(comp, batch.completion_lens, [EOS]), overlong_filter=True)
    assert policy_step.global_counts(mask, torch.device("cpu")) == (5.0, 2)  # tokens, kept rows
    monkeypatch.setattr(policy_step, "completion_logprobs",
                        lambda engine, p, pl, c, cl, **kw: torch.zeros(c.shape, requires_grad=True))
    engine = _FakeEngine()
    loss_kw = dict(eps_low=0.2, eps_high=0.2, beta=0.0, kl="k3", agg=agg, max_tokens=3, ratio_level="token")
    out, _ = policy_step.train_on_batch(engine, batch, micro_batch=2, num_iterations=1, loss_kw=loss_kw,
                                        eos_ids=[EOS], overlong_filter=True, temperature=1.0,
                                        world_size=1, device=torch.device("cpu"))
    assert len(engine.losses) == 2  # two micro-batches, their losses sum to the step's loss
    assert sum(engine.losses) == pytest.approx(expected, abs=1e-7)
    assert out["loss"] == pytest.approx(expected, abs=1e-7)
    assert out["truncated_frac"] == 0.5  # rows 1 and 3 ran into the limit: the trained batch's share
