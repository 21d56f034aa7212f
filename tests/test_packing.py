"""Budgeted micro-batches (--max_tokens_per_micro_batch, simple_grpo/algo/packing.py): the plan
(rows sorted by length, cut under the budget, trimmed to their own widths), and the same gradient as
one micro-batch holding the whole batch through the real train_on_batch in a DeepSpeed engine with
plain SGD, for each aggregation, two passes, TIS and the LoRA reference."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
import dist_worker as dw  # noqa: E402
from test_correction import _engine, _lora_model, _params  # noqa: E402

from simple_grpo.algo import packing  # noqa: E402
from simple_grpo.algo.logprobs import completion_logprobs  # noqa: E402
from simple_grpo.algo.tis import TISSettings  # noqa: E402
from simple_grpo.models import build_tiny_model  # noqa: E402
from simple_grpo.train.policy_step import train_on_batch  # noqa: E402

BUDGET = 12  # dw.fixed_batch() (8 rows, P 5, C 6) -> 6 micro-batches, rows re-ordered and trimmed


def test_plan_sorts_cuts_under_the_budget_and_trims():
    b = dw.fixed_batch()
    total = (b.prompt_lens + b.completion_lens).tolist()
    mbs = packing.plan(b, micro_batch=2, max_tokens=BUDGET)
    rows = torch.cat([mb.rows for mb in mbs]).tolist()
    assert sorted(rows) == list(range(dw.B)) and rows != list(range(dw.B))
    lens = [sorted(total[i] for i in mb.rows.tolist()) for mb in mbs]
    assert sum(lens, []) == sorted(total), "shortest rows first, cut into consecutive runs"
    assert all(mb.rows.tolist() == sorted(mb.rows.tolist()) for mb in mbs), "batch order inside each"
    for mb in mbs:
        assert mb.P == int(b.prompt_lens[mb.rows].max()) and mb.C == int(b.completion_lens[mb.rows].max())
        assert mb.positions <= BUDGET or len(mb.rows) == 1, "over the budget only as a row of its own"
    one = packing.plan(b, micro_batch=2, max_tokens=1)  # every row over the budget: alone
    assert [len(mb.rows) for mb in one] == [1] * dw.B
    fixed = packing.plan(b, micro_batch=2)  # 0: today's slices at the batch's width
    assert [(mb.rows.tolist(), mb.P, mb.C) for mb in fixed] == \
        [([s, s + 1], dw.P, dw.C) for s in range(0, dw.B, 2)]
    ids_bP = one[0].inputs(b, "cpu")[0]  # left padding: the last P' prompt columns
    assert torch.equal(ids_bP, b.prompt_ids[one[0].rows][:, dw.P - one[0].P:])


def test_auto_is_the_budget_of_the_fixed_micro_batches():
    """-1 (the trainer's default): budgeted under micro_batch x (P + C), the fixed slices' own size:
    never more micro-batches than fixed, each at most that size, and when every row fills the
    batch's widths, exactly the fixed slices."""
    b = dw.fixed_batch()
    auto = packing.plan(b, micro_batch=2, max_tokens=-1)
    same = packing.plan(b, micro_batch=2, max_tokens=2 * (dw.P + dw.C))
    assert [(mb.rows.tolist(), mb.P, mb.C) for mb in auto] == [(mb.rows.tolist(), mb.P, mb.C) for mb in same]
    assert len(auto) <= dw.B // 2 and all(mb.positions <= 2 * (dw.P + dw.C) for mb in auto)
    assert sum(mb.positions for mb in auto) < dw.B * (dw.P + dw.C), "less padding than fixed"
    b.prompt_lens[:], b.completion_lens[:] = dw.P, dw.C
    assert [(mb.rows.tolist(), mb.P, mb.C) for mb in packing.plan(b, micro_batch=2, max_tokens=-1)] == \
        [([s, s + 1], dw.P, dw.C) for s in range(0, dw.B, 2)]


def test_trimmed_micro_batches_give_the_full_width_log_probs():
    b = dw.fixed_batch()
    model = build_tiny_model(seed=1).eval()
    with torch.no_grad():
        full = completion_logprobs(model, b.prompt_ids, b.prompt_lens, b.completion_ids, b.completion_lens)
        parts = [(mb, completion_logprobs(model, *mb.inputs(b, "cpu")))
                 for mb in packing.plan(b, micro_batch=2, max_tokens=BUDGET)]
    assert torch.allclose(packing.scatter(parts, dw.B, dw.C), full, atol=1e-5)


def grouped_batch():
    """fixed_batch as 2 groups of 4 rows (a prompt each, rows 0-3 and 4-7), completion lengths
    interleaved between the groups (1, 3, 5, 6 and 2, 4, 6, 6), so that sorting rows by length
    alternates the groups."""
    b = dw.fixed_batch()
    for g in range(2):
        rows = slice(4 * g, 4 * g + 4)
        b.prompt_ids[rows] = b.prompt_ids[4 * g]
        b.prompt_lens[rows] = b.prompt_lens[4 * g]
    b.prompt_lens[4:] = b.prompt_lens[0]  # equal prompt lengths: the order is the completions'
    b.completion_lens = torch.tensor([1, 3, 5, 6, 2, 4, 6, 6])
    return b


def grouped_budget(b) -> int:
    """4 rows of grouped_batch's prompt + 4 completion tokens."""
    return 4 * (int(b.prompt_lens.max()) + 4)


def test_a_groups_rows_in_one_micro_batch_share_their_prompt_pass():
    """Rows sorted by length alternate between the groups here; inside a micro-batch they go back
    to batch order, so each group's rows there are next to each other: one prompt run per group
    (logprobs.prompt_groups, what the shared prompt pass runs once), the same log-probs."""
    from simple_grpo.algo.logprobs import prompt_groups

    b = grouped_batch()
    mbs = packing.plan(b, micro_batch=2, max_tokens=grouped_budget(b))
    # sorted: 0 4 1 5 | 2 6 3 | 7 (lengths 1 2 3 4 | 5 6 6 | 6); the budget holds 4 rows of up to 4
    # completion tokens, 3 of 6
    assert [mb.rows.tolist() for mb in mbs] == [[0, 1, 4, 5], [2, 3, 6], [7]]
    for mb, groups in zip(mbs, (2, 2, 1)):
        ids, lens = mb.inputs(b, "cpu")[:2]
        assert int(prompt_groups(ids, lens).unique().numel()) == groups, "one prompt run per group"
    model = build_tiny_model(seed=1).eval()
    with torch.no_grad():
        full = completion_logprobs(model, b.prompt_ids, b.prompt_lens, b.completion_ids, b.completion_lens)
        parts = [(mb, completion_logprobs(model, *mb.inputs(b, "cpu"))) for mb in mbs]
    assert torch.allclose(packing.scatter(parts, dw.B, dw.C), full, atol=1e-5)


def _tis_batch():
    """fixed_batch with sampling log-probs 0.4x to 2.5x off the trainer's: TIS mask mode rejects some."""
    b = dw.fixed_batch()
    b.weight_version, b.meta = 0, {"producer": "trainer-0"}
    with torch.no_grad():
        logp = completion_logprobs(build_tiny_model(seed=1), b.prompt_ids, b.prompt_lens, b.completion_ids,
                                   b.completion_lens)
    ratio = torch.empty(dw.B, dw.C).uniform_(0.4, 2.5, generator=torch.Generator().manual_seed(3))
    b.gen_logprobs = torch.where(torch.arange(dw.C)[None] < b.completion_lens[:, None], logp - ratio.log(), 0.0)
    return b


def _step(batch, max_tokens: int, agg: str, iterations: int = 1, tis=None):
    engine = _engine(lr=1.0)
    before = _params(engine)
    m, _ = train_on_batch(engine, batch, micro_batch=dw.B, num_iterations=iterations, max_tokens=max_tokens,
                          loss_kw=dict(dw.LOSS_KW, agg=agg), eos_ids=[dw.EOS], overlong_filter=True,
                          temperature=1.0, world_size=1, device=torch.device("cpu"),
                          weight_version=0 if tis else None, tis=tis)
    after = _params(engine)
    return m, {k: after[k] - before[k] for k in before}


@pytest.mark.parametrize("agg, iterations, tis", [
    ("seq-mean-token-mean", 1, None),
    ("token-mean", 1, None),
    ("seq-mean-token-sum-norm", 1, None),
    ("token-mean", 2, None),  # pi_old from the no-grad pass, scattered back to the batch's rows
    ("seq-mean-token-mean", 1, TISSettings("token", "mask", 2.0)),  # gen log-probs follow the rows
    ("token-mean", 1, "grouped"),  # 2 groups: their rows share prompt passes inside micro-batches
])
def test_budgeted_step_applies_the_one_micro_batch_gradient(dist_env, agg, iterations, tis):
    grouped = tis == "grouped"
    tis = None if grouped else tis
    batch = grouped_batch() if grouped else _tis_batch() if tis else dw.fixed_batch()
    m_one, want = _step(batch, 0, agg, iterations, tis)
    m_bud, got = _step(batch, grouped_budget(batch) if grouped else BUDGET, agg, iterations, tis)
    num = sum(float((got[k] - want[k]).pow(2).sum()) for k in want)
    den = sum(float(want[k].pow(2).sum()) for k in want)
    assert den > 0 and (num / den) ** 0.5 < 1e-4, f"relative error {(num / den) ** 0.5:.3g}"
    assert m_one["micro_batches"] == 1 and m_bud["micro_batches"] == (3 if grouped else 6)
    assert m_bud["pad_frac"] < m_one["pad_frac"], (m_bud["pad_frac"], m_one["pad_frac"])
    for k in ("loss", "kl", "ratio_mean", "loss_tokens"):
        assert m_bud[k] == pytest.approx(m_one[k], rel=1e-4, abs=1e-6), k
    if tis:
        assert m_bud["tis_masked"] == m_one["tis_masked"] > 0


def test_pad_frac_counts_the_padded_positions():
    """One micro-batch at the batch's width: padding = all positions - real prompt + completion tokens."""
    b = dw.fixed_batch()
    real = int((b.prompt_lens + b.completion_lens).sum())
    (mb,) = packing.plan(b, micro_batch=dw.B)
    assert packing.real_positions(mb, b) == real and mb.positions == dw.B * (dw.P + dw.C)


def test_lora_reference_over_budgeted_micro_batches(dist_env):
    from simple_grpo.common.lora import reference_logprobs

    engine = _engine(_lora_model(0.0), lr=0.0)
    b = dw.fixed_batch()
    kw = dict(micro_batch=2, temperature=1.0, device=torch.device("cpu"))
    fixed, budgeted = reference_logprobs(engine, b, **kw), reference_logprobs(engine, b, max_tokens=BUDGET, **kw)
    assert torch.allclose(fixed, budgeted, atol=1e-5)


def test_trainer_runs_budgeted_micro_batches_with_the_lora_reference(tiny_model_dir, tmp_path, monkeypatch):
    """grpo_ref_split.py --max_tokens_per_micro_batch: the LoRA reference pass (beta > 0, no server)
    and the training forwards run trimmed micro-batches; micro_batches and pad_frac are logged and
    documented."""
    from test_docs import undocumented_metrics
    from test_trainer import grpo_ref_split, read_metrics, tiny_args

    from simple_grpo.train import policy_step

    widths = []  # the completion width of every log-prob pass

    def spy(model, p, pl, c, cl, **kw):
        widths.append(c.shape[1])
        return completion_logprobs(model, p, pl, c, cl, **kw)

    monkeypatch.setattr(policy_step, "completion_logprobs", spy)
    grpo_ref_split.main(tiny_args(tiny_model_dir, tmp_path, steps=1, preset="grpo", beta=0.04, lora_r=4,
                                  max_tokens_per_micro_batch=40))
    (row,) = read_metrics(tmp_path)
    assert row["micro_batches"] >= 2 and 0 <= row["pad_frac"] < 1
    assert not undocumented_metrics([row])
    assert row["micro_batches"] == len(widths) > 1, "the training forwards ran the budgeted plan"
    assert row["ref_seconds"] > 0, "the adapter-off reference pass ran in the trainer"


def test_max_tokens_per_micro_batch_is_checked():
    from simple_grpo.cli import parse_config
    from simple_grpo.common.config import TrainConfig, resolve
    from simple_grpo.errors import UserError

    assert resolve(parse_config(TrainConfig, [])).max_tokens_per_micro_batch == -1  # auto
    with pytest.raises(UserError, match="--max_tokens_per_micro_batch must be >= -1"):
        resolve(parse_config(TrainConfig, ["--max_tokens_per_micro_batch=-2"]))
