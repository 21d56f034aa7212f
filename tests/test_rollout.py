"""Rollouts on a tiny model: dynamic sampling refills to a full batch of informative groups (and
counts what it did), topped-up groups stay outside the loss (the real train_on_batch: the same
gradient as without them), the overlong filter masks exactly the truncated completions."""
import pytest
import torch

from simple_grpo.algo.advantages import group_advantages
from simple_grpo.algo.masks import truncated
from simple_grpo.models import build_tiny_model
from simple_grpo.train.policy_step import loss_mask
from simple_grpo.gen.reward_registry import RewardSpec, register
from simple_grpo.gen.rollout import SampleSettings, eos_token_ids, make_rollout, sample
from simple_grpo.wire.codec import RolloutBatch
from test_eos_rollout import InOrder

G = 4


@register("test_flat_or_varied")
def flat_or_varied(completion: str, example: dict) -> float:
    """Constant for examples marked flat (a zero-variance group), varied otherwise."""
    return 1.0 if example["flat"] else float(len(set(completion)))


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
    assert r.stats["topped_up_frac"] == topped / n_prompts  # of the rows
    assert (r.batch.loss_rows is None) == (topped == 0)  # None: every row is in the loss
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
    from simple_grpo.common.config import TrainConfig, resolve
    from simple_grpo.gen.rollout import dynamic_filter_metric

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


# --- DAPO's top-ups: flat in correctness, what differs is the length penalty alone

G8 = 8
_topup = {"acc": 0, "len": 0}


@register("test_topup_correct")
def topup_correct(completion: str, example: dict) -> float:
    """A fake correctness reward: 0.0 for every completion of a 'flat' example, else 0/1 by row."""
    _topup["acc"] += 1
    return 0.0 if example["flat"] else float(_topup["acc"] % 2)


@register("test_topup_overlong")
def topup_overlong(completion: str, example: dict) -> float:
    """A fake soft overlong punishment: -0.005 for the last of every G8 completions, else 0."""
    _topup["len"] += 1
    return -0.005 if _topup["len"] % G8 == 0 else 0.0


def test_topped_up_rows_get_zero_advantage_and_leave_the_loss(tok_model):
    """Filtered on correctness with no refill round left, q1 (every completion wrong, the last one
    just inside the overlong zone) tops the batch up. Its rewards [0]*7 + [-0.005] would give the
    advantages [0.353]*7 + [-2.473] (the length penalty alone, over its std): noise. Its rows get
    advantage 0 and loss_rows False: no loss token, no sequence in any count."""
    tok, model = tok_model
    _topup.update(acc=0, len=0)
    examples = [{"question": f"q{i}", "answer": "0", "flat": flat} for i, flat in enumerate([False, True])]
    torch.manual_seed(0)
    r = make_rollout(model, tok, InOrder(examples), 2, SampleSettings(num_generations=G8, max_new_tokens=4),
                     [RewardSpec("test_topup_correct"), RewardSpec("test_topup_overlong")],
                     system_render=lambda e: e["question"], eos_ids=eos_token_ids(tok, model),
                     dynamic_sampling=True, max_refill_rounds=0, filter_metric="test_topup_correct")
    b = r.batch
    assert [e["question"] for e in r.examples] == ["q0", "q1"]
    assert r.stats["topped_up_groups"] == 1 and r.stats["topped_up_frac"] == 0.5
    assert b.rewards[G8:].tolist() == pytest.approx([0.0] * 7 + [-0.005])
    noise = group_advantages(b.rewards[G8:].view(1, G8).double()).view(-1)  # what they would get
    assert noise.tolist() == pytest.approx([0.3534] * 7 + [-2.4735], abs=1e-4)
    assert b.advantages[G8:].tolist() == [0.0] * G8  # exactly
    kept = group_advantages(b.rewards[:G8].view(1, G8).double()).float().view(-1)
    assert torch.equal(b.advantages[:G8], kept) and (kept != 0).all()  # q0 keeps its advantages
    assert b.loss_rows.tolist() == [True] * G8 + [False] * G8
    mask = loss_mask(b, truncated(b.completion_ids, b.completion_lens, eos_token_ids(tok, model)), False)
    assert mask.sum(1).tolist() == b.completion_lens[:G8].tolist() + [0] * G8


# the real train_on_batch in a DeepSpeed engine on the tiny model, plain SGD (lr 1, no clipping):
# the update is -gradient, so equal parameters after the step mean equal gradients
P, C = 3, 4


def _rows(n: int, seed: int, adv: list[float]) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return dict(prompt_ids=torch.randint(3, 300, (n, P), generator=g), prompt_lens=torch.full((n,), P),
                completion_ids=torch.randint(3, 300, (n, C), generator=g),
                completion_lens=torch.randint(1, C + 1, (n,), generator=g), rewards=torch.zeros(n),
                advantages=torch.tensor(adv), ref_logprobs=-torch.rand(n, C, generator=g) - 5.0)


def _sgd_step(batch: RolloutBatch, agg: str) -> dict[str, torch.Tensor]:
    """Parameters after one train_on_batch (micro-batches of 4 rows, beta 0.04) from fixed weights."""
    import deepspeed

    from simple_grpo.train import engine as eng
    from simple_grpo.train.policy_step import train_on_batch

    model = build_tiny_model(seed=1)
    cfg = eng.ds_config("ds_config.json", micro_batch=4, grad_accum=batch.batch_size // 4, world_size=1,
                        grad_clip=0.0, bf16=False)
    engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=1.0),
                                      config=cfg)
    loss_kw = dict(eps_low=0.2, eps_high=0.2, beta=0.04, kl="k3", agg=agg, max_tokens=C, ratio_level="token")
    train_on_batch(engine, batch, micro_batch=4, num_iterations=1, loss_kw=loss_kw, eos_ids=[2],
                   overlong_filter=False, temperature=1.0, world_size=1, device=torch.device("cpu"))
    return {k: v.detach().clone() for k, v in engine.module.state_dict().items()}


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean"])
def test_topped_up_rows_change_no_gradient(dist_env, agg):
    """4 informative rows, then 4 topped-up rows (advantage 0, loss_rows False; their micro-batch
    still runs forward and backward): the same SGD update, bit for bit, as the 4 rows alone. Counted
    in the denominators (token-mean: 4 rows' tokens more; seq-mean: 4 sequences more) or in the KL
    term, they would shrink or shift it."""
    real = _rows(4, seed=0, adv=[1.0, -0.5, 0.25, -0.75])
    extra = _rows(4, seed=1, adv=[0.0] * 4)
    both = RolloutBatch(**{k: torch.cat([real[k], extra[k]]) for k in real},
                        loss_rows=torch.tensor([True] * 4 + [False] * 4))
    alone = _sgd_step(RolloutBatch(**real), agg)
    topped = _sgd_step(both, agg)
    start = build_tiny_model(seed=1).state_dict()
    assert sum(not torch.equal(alone[k], start[k]) for k in start) >= 10, "the step moved no weight"
    for k in alone:
        assert torch.equal(topped[k], alone[k]), f"{k}: the topped-up rows changed the gradient"


@pytest.mark.parametrize("loss_rows, frac", [
    (None, 0.0),  # nothing topped up: every row in the loss
    (torch.tensor([True, True, True, False]), 0.25),  # one of 4 rows outside the loss
    (torch.tensor([False] * 4), 1.0),  # a batch of top-ups only
])
def test_batch_stats_log_the_topped_up_fraction_of_the_trained_batch(loss_rows, frac):
    from simple_grpo.train.loop import batch_stats

    batch = RolloutBatch(**_rows(4, seed=0, adv=[0.0] * 4), loss_rows=loss_rows)
    assert batch_stats(batch, weight_version=0, eval_reward="correct")["topped_up_frac"] == frac


def test_a_batch_is_sampled_under_the_seed_of_its_stream_position(tok_model):
    """make_rollout seeds each batch's sampling by where the stream stands: the same position gives
    the same completions whatever ran before (the overlap sampler draws what the trainer's rank
    would), another position other ones, and the caller's RNG is left as it was."""
    from simple_grpo.gen.data import PromptStream

    tok, model = tok_model
    stream = PromptStream([{"question": f"q{i}", "answer": "0", "flat": False} for i in range(8)], seed=3)

    def one():
        return make_rollout(model, tok, stream, 2, SampleSettings(num_generations=G, max_new_tokens=6),
                            [RewardSpec("test_flat_or_varied")], system_render=lambda e: e["question"],
                            eos_ids=eos_token_ids(tok, model)).batch.completion_ids

    start = stream.state_dict()
    torch.manual_seed(1)
    a = one()
    after = torch.get_rng_state()
    torch.manual_seed(2)  # another RNG state before the same position
    stream.load_state_dict(start)
    b = one()
    assert torch.equal(a, b)
    torch.manual_seed(1)
    stream.load_state_dict(start)
    stream.next_batch(2)  # the next position: other draws
    c = one()
    assert not torch.equal(a, c)
    torch.manual_seed(1)
    stream.load_state_dict(start)
    one()
    assert torch.equal(torch.get_rng_state(), torch.manual_seed(1).get_state())  # untouched by sampling
    assert torch.equal(after, torch.manual_seed(1).get_state())


def test_rank_streams_give_each_rank_its_own_prompts():
    """The overlap sampler's streams take one example from each rank's PromptStream in turn, so
    part r of a step's batch (groups r, r + N, ...) is what rank r draws; state round-trips."""
    from simple_grpo.gen.data import PromptStream, RankStreams

    examples = [{"question": f"q{i}"} for i in range(10)]
    ranks = [PromptStream(examples, seed=5, rank=r, world_size=2) for r in range(2)]
    both = RankStreams(examples, seed=5, world_size=2)
    assert both.next_batch(4) == [next(ranks[0]), next(ranks[1]), next(ranks[0]), next(ranks[1])]
    saved = both.state_dict()
    three = both.next_batch(3)
    assert three == [next(ranks[0]), next(ranks[1]), next(ranks[0])]
    again = RankStreams(examples, seed=5, world_size=2)
    again.load_state_dict(saved)
    assert again.next_batch(3) == three and again.state_dict() == both.state_dict()
    one = RankStreams(examples, seed=5, world_size=1)
    assert one.sampling_seed() == PromptStream(examples, seed=5).sampling_seed()  # one rank: its seed
