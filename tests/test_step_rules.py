"""What one training step does whatever the batch holds, through the real policy_step.train_on_batch
in a DeepSpeed engine: a step with nothing in the loss leaves the weights, the optimizer state, the
schedule and the weight version alone; a worker's batch sampled with top_p < 1 and min_new_tokens
(bypass: its sampling log-probs are pi_old) starts at ratio 1 under every preset."""
from __future__ import annotations

import copy
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from test_eos_rollout import InOrder, eos_prone_model
from test_offpolicy import ADV, RATIOS, _batch

from simple_grpo.algo.losses import PRESETS
from simple_grpo.algo.tis import TISSettings
from simple_grpo.models import build_tiny_model
from simple_grpo.train import engine as eng
from simple_grpo.train import loop
from simple_grpo.train.policy_step import train_on_batch
from simple_grpo.gen.reward_registry import RewardSpec
from simple_grpo.gen.rollout import SampleSettings, eos_token_ids, make_rollout

ROOT = Path(__file__).resolve().parents[1]
LOSS_KW = dict(eps_low=0.2, eps_high=0.2, beta=0.0, kl="k3", agg="token-mean", max_tokens=4,
               ratio_level="token", pg_loss="clip", clip_ratio_c=None)


def _adamw_engine(model):
    """The trainer's engine: AdamW with weight decay and a warm-up schedule (momentum and decay
    move weights even on a zero gradient)."""
    cfg = eng.ds_config(ROOT / "ds_config.json", micro_batch=4, grad_accum=1, world_size=1, grad_clip=1.0,
                        bf16=False)
    return eng.build_engine(model, lr=1e-2, weight_decay=0.1, warmup_steps=5, config=cfg)


def _step(engine, batch, *, overlong_filter=False, tis=None, weight_version=0):
    return train_on_batch(engine, batch, micro_batch=batch.batch_size, num_iterations=1, loss_kw=LOSS_KW,
                          eos_ids=[2], overlong_filter=overlong_filter, temperature=1.0, world_size=1,
                          device=torch.device("cpu"), weight_version=weight_version, tis=tis)[0]


def _no_loss_rows(b):
    b.loss_rows = torch.zeros(b.batch_size, dtype=torch.bool)  # every group a top-up (dapo)
    return b


def _no_eos(b):
    b.completion_ids[b.completion_ids == 2] = 7  # no row ends in time: the overlong filter drops all
    b.completion_lens[:] = b.completion_ids.shape[1]
    return b


@pytest.mark.parametrize("make, kw", [
    (lambda: _no_loss_rows(_batch("trainer-0", ADV, None)), {}),  # dynamic sampling ran out of refills
    (lambda: _no_eos(_batch("trainer-0", ADV, None)), dict(overlong_filter=True)),  # all truncated
    # every sequence's TIS weight (1.5^4, 0.9^3, ...) outside [1/1.05, 1.05]: mask mode rejects them all
    (lambda: _batch("gen-1", ADV, RATIOS), dict(tis=TISSettings("sequence", "mask", 1.05))),
])
def test_a_step_with_nothing_in_the_loss_changes_nothing(dist_env, make, kw):
    engine = _adamw_engine(build_tiny_model(seed=1))
    m = _step(engine, _batch("trainer-0", ADV, None))  # a real step first: AdamW has momentum now
    assert m["empty_step"] == 0.0 and m["loss_tokens"] == 15
    before = {k: v.detach().clone() for k, v in engine.module.state_dict().items()}
    adam = engine.optimizer.optimizer.state  # ZeRO's flat fp32 partitions' AdamW state
    moments = [v["exp_avg"].clone() for v in adam.values()]
    lr, sched = engine.get_lr()[0], engine.lr_scheduler.last_epoch
    m = _step(engine, make(), **kw)
    assert m["empty_step"] == 1.0 and m["loss_tokens"] == 0 and m["loss"] == 0.0 and m["grad_norm"] == 0.0
    after = engine.module.state_dict()
    moved = [k for k in before if not torch.equal(before[k], after[k])]
    assert moved == [], f"an empty step moved {moved[:3]}"
    assert engine.lr_scheduler.last_epoch == sched and engine.get_lr()[0] == lr, "the schedule stays"
    assert moments and all(torch.equal(a, v["exp_avg"]) for a, v in zip(moments, adam.values())), \
        "no optimizer step"


@pytest.mark.parametrize("metrics, cfg, version, line", [
    # a step that trained: num_iterations versions on, no line
    ({"empty_step": 0.0}, dict(num_iterations=2), 7, None),
    # every group flat after the refill rounds (dapo): the version stays, one line says why
    ({"empty_step": 1.0, "topped_up_frac": 1.0}, dict(num_iterations=2), 5,
     "every group was flat after --max_refill_rounds=3 refill rounds"),
    # the overlong filter dropped every row
    ({"empty_step": 1.0, "truncated_frac": 1.0}, dict(overlong_filter=True), 5,
     "the overlong filter dropped every row"),
    # TIS's mask mode rejected every sequence
    ({"empty_step": 1.0}, dict(tis="sequence", tis_mode="mask"), 5, "--tis_mode=mask rejected every sequence"),
])
def test_advance_keeps_the_version_of_an_empty_step(capsys, metrics, cfg, version, line):
    c = SimpleNamespace(**{**dict(num_iterations=1, max_refill_rounds=3, overlong_filter=False, tis="off",
                                  tis_mode="truncate"), **cfg})
    state = {"step": 4, "weight_version": 5, "empty_steps": 2}
    m = dict(metrics)
    assert loop.advance(state, m, c, rank=0) is (line is None)
    assert state["weight_version"] == version and "empty_step" not in m
    assert m["empty_steps"] == state["empty_steps"] == 2 + (line is not None)
    err = capsys.readouterr().err.strip().splitlines()
    if line is None:
        assert err == []
    else:
        assert len(err) == 1 and line in err[0] and "step 4" in err[0] and "stays 5" in err[0], err


@pytest.fixture(scope="module")
def nucleus_batch():
    """A batch sampled by the real rollout with top_p 0.9, min_new_tokens 2 and T 0.9, its sampling
    log-probs recorded, as a generation worker makes it; advantages of both signs; and the model."""
    tok, model = eos_prone_model(0.15, seed=3)
    examples = [{"question": q, "answer": "0"} for q in ("A prompt", "Another one here", "x y", "z")]
    torch.manual_seed(0)
    s = SampleSettings(num_generations=4, max_new_tokens=8, temperature=0.9, top_p=0.9, min_new_tokens=2)
    r = make_rollout(model, tok, InOrder(examples), len(examples), s, [RewardSpec("test_eos_token_count")],
                     system_render=lambda e: e["question"], eos_ids=eos_token_ids(tok, model),
                     record_logprobs=True)
    b = r.batch
    b.advantages = torch.tensor([1.0, -1.0] * (b.batch_size // 2))
    b.meta["producer"] = "gen-0"
    b.ref_logprobs = b.gen_logprobs_full.clone()  # a reference for grpo's KL term
    return b, model, tok


@pytest.mark.parametrize("preset", list(PRESETS))
@pytest.mark.parametrize("late", [False, True])  # a worker's batch of the current version, or one late
def test_a_workers_nucleus_batch_starts_at_ratio_one(dist_env, nucleus_batch, preset, late):
    """Identical weights, --tis=off (bypass): pi_old is the batch's whole-softmax log-probs, so every
    ratio is 1 and nothing is clipped (the nucleus log-probs as pi_old put GSPO's every A < 0
    sequence under its lower clip 1 - 3e-4)."""
    batch, model, tok = nucleus_batch
    from simple_grpo.algo.masks import mask_from_lengths

    m_BC = mask_from_lengths(batch.completion_lens, batch.completion_ids.shape[1])
    assert ((batch.gen_logprobs - batch.gen_logprobs_full)[m_BC] > 1e-3).any(), "a real nucleus / EOS gap"
    p = PRESETS[preset]
    kw = {k: p[k] for k in ("eps_low", "eps_high", "beta", "kl", "agg", "ratio_level", "pg_loss", "tau_pos",
                            "tau_neg", "clip_ratio_c")} | {"max_tokens": 8}
    engine = _adamw_engine(copy.deepcopy(model))
    m, _ = train_on_batch(engine, batch, micro_batch=batch.batch_size, num_iterations=1, loss_kw=kw,
                          eos_ids=eos_token_ids(tok, model), overlong_filter=False, temperature=0.9, world_size=1,
                          device=torch.device("cpu"), weight_version=batch.weight_version + int(late))
    assert m["ratio_max"] == pytest.approx(1.0, abs=1e-4) and m["ratio_mean"] == pytest.approx(1.0, abs=1e-5)
    for k in ("clip_low_frac", "clip_high_frac", "dual_clip_frac"):
        assert m.get(k, 0.0) == 0.0, (k, m[k])
