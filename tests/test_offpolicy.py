"""Off-policy batches and truncated importance sampling (simple_grpo/train/offpolicy.py, tis.py):
which log-probs are the old policy, TIS weights and metrics vs hand-computed numbers, and the real
policy_step.train_on_batch in a DeepSpeed engine on the tiny model: a trainer batch trained one
version late has ratio != 1 and its clipped tokens get no gradient, a fresh one is trained exactly
as before, and TIS weights the loss as computed by hand."""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from simple_grpo.algo.logprobs import completion_logprobs
from simple_grpo.algo.tis import TISSettings, ratio_max, tis_sums, tis_weights
from simple_grpo.models import build_tiny_model
from simple_grpo.train import engine as eng
from simple_grpo.train.offpolicy import correction, finish_ratios
from simple_grpo.train.policy_step import train_on_batch
from simple_grpo.wire.codec import RolloutBatch

ROOT = Path(__file__).resolve().parents[1]
F64 = torch.float64


def _inputs(raw: list[list[float]], mask: list[list[int]]):
    """(trainer_old, sampler, mask) whose exp(trainer_old - sampler) is `raw` on valid tokens;
    masked positions hold garbage (sampler inf)."""
    m = torch.tensor(mask, dtype=torch.bool)
    sampler = torch.where(m, torch.full(m.shape, -1.0, dtype=F64), torch.tensor(math.inf, dtype=F64))
    old = -1.0 + torch.tensor(raw, dtype=F64).clamp(min=1e-9).log()
    return old, sampler, m


RAW = [[0.6, 1.5, 3.0], [0.8, 4.0, 1.0]]  # importance ratios trainer / sampler; [1][2] is padding
MASK = [[1, 1, 1], [1, 1, 0]]


@pytest.mark.parametrize("raw, mask, level, mode, cap, want_w, want_clipped", [
    # token, truncate at 2: 3.0 and 4.0 become 2.0 (clipped); the rest keep their ratio
    (RAW, MASK, "token", "truncate", 2.0, [[0.6, 1.5, 2.0], [0.8, 2.0, 0]], [[0, 0, 1], [0, 1, 0]]),
    # token, mask at 2 (keep [0.5, 2]): 3.0 and 4.0 are dropped (weight 0)
    (RAW, MASK, "token", "mask", 2.0, [[0.6, 1.5, 0.0], [0.8, 0.0, 0]], [[0, 0, 1], [0, 1, 0]]),
    # token, cap 5: nothing is clipped, the weights are the ratios
    (RAW, MASK, "token", "truncate", 5.0, [[0.6, 1.5, 3.0], [0.8, 4.0, 0]], [[0, 0, 0], [0, 0, 0]]),
    # sequence, truncate at 3: seq 0 0.6 * 1.5 * 3.0 = 2.7 (kept), seq 1 0.8 * 4.0 = 3.2 -> 3
    (RAW, MASK, "sequence", "truncate", 3.0, [[2.7] * 3, [3.0, 3.0, 0]], [[0, 0, 0], [1, 1, 0]]),
    # sequence, mask at 3 (keep [1/3, 3]): seq 1 (3.2) is dropped
    (RAW, MASK, "sequence", "mask", 3.0, [[2.7] * 3, [0.0, 0.0, 0]], [[0, 0, 0], [1, 1, 0]]),
    # truncate is one-sided: a low ratio 0.4 keeps its weight ...
    ([[0.4, 1.0]], [[1, 1]], "token", "truncate", 2.0, [[0.4, 1.0]], [[0, 0]]),
    # ... mask drops it (0.4 < 1/2)
    ([[0.4, 1.0]], [[1, 1]], "token", "mask", 2.0, [[0.0, 1.0]], [[1, 0]]),
    # sequence 0.5 * 0.5 = 0.25: kept by truncate, dropped by mask (< 1/2)
    ([[0.5, 0.5]], [[1, 1]], "sequence", "truncate", 2.0, [[0.25, 0.25]], [[0, 0]]),
    ([[0.5, 0.5]], [[1, 1]], "sequence", "mask", 2.0, [[0.0, 0.0]], [[1, 1]]),
])
def test_tis_weights(raw, mask, level, mode, cap, want_w, want_clipped):
    old, sampler, m = _inputs(raw, mask)
    w, clipped = tis_weights(old, sampler, m, level=level, mode=mode, cap=cap)
    torch.testing.assert_close(w, torch.tensor(want_w, dtype=F64), atol=1e-9, rtol=0)
    assert clipped.tolist() == [[bool(x) for x in row] for row in want_clipped]


@pytest.mark.parametrize("level, mode, cap, weight_mean, clipped_frac", [
    # (0.6 + 1.5 + 2.0 + 0.8 + 2.0) / 5 = 1.38; 2 of 5 tokens truncated
    ("token", "truncate", 2.0, 1.38, 0.4),
    # (0.6 + 1.5 + 0 + 0.8 + 0) / 5 = 0.58; 2 of 5 dropped
    ("token", "mask", 2.0, 0.58, 0.4),
    # (2.7 * 3 + 3.0 * 2) / 5 = 2.82; seq 1's 2 tokens truncated
    ("sequence", "truncate", 3.0, 2.82, 0.4),
])
def test_tis_metrics(level, mode, cap, weight_mean, clipped_frac):
    old, sampler, m = _inputs(RAW, MASK)
    w, clipped = tis_weights(old, sampler, m, level=level, mode=mode, cap=cap)
    got = finish_ratios(tis_sums(w, clipped, m))
    assert got == pytest.approx({"tis_weight_mean": weight_mean, "tis_clipped_frac": clipped_frac})


@pytest.mark.parametrize("raw, mask, level, want", [
    (RAW, MASK, "token", 4.0),          # the largest token ratio
    (RAW, MASK, "sequence", 3.2),       # the largest sequence ratio: seq 1 0.8 * 4.0 (seq 0: 2.7)
    ([[0.5, 0.5]], [[1, 1]], "token", 0.5),
    ([[0.5, 0.5]], [[1, 1]], "sequence", 0.25),
])
def test_tis_ratio_max_at_each_level(raw, mask, level, want):
    """tis_ratio_max is the largest ratio TIS weights by, before the cap: of a token, or of a
    sequence at sequence level; padding's garbage is never the maximum."""
    old, sampler, m = _inputs(raw, mask)
    assert ratio_max(old, sampler, m, level) == pytest.approx(want, rel=1e-9)


def test_finish_ratios():
    m = {"loss": 1.0, "mismatch_sum": 0.2, "mismatch_tokens": 4.0, "offpolicy_tokens": 6.0,
         "trained_tokens": 8.0}
    # 0.2 / 4 = 0.05 mean |sampling - trainer log-prob|; 6 of 8 tokens from a late batch
    assert finish_ratios(m) == pytest.approx({"loss": 1.0, "logprob_mismatch": 0.05,
                                              "offpolicy_token_frac": 0.75})
    # no fresh batch with sampling log-probs, no tokens: no ratio at all
    assert finish_ratios({"mismatch_sum": 0.0, "mismatch_tokens": 0.0}) == {}


def _stub(producer: str, version: int, gen: bool = True) -> RolloutBatch:
    one = torch.ones(1, 1, dtype=torch.long)
    return RolloutBatch(one, one[0], one, one[0], torch.zeros(1), torch.zeros(1),
                        gen_logprobs=torch.zeros(1, 1) if gen else None, weight_version=version,
                        meta={"producer": producer})


OFF, TOK, MASK_TIS = TISSettings(), TISSettings("token"), TISSettings("token", "mask")


@pytest.mark.parametrize("producer, version, gen, trainer_version, tis, kw, want", [
    # nothing recorded: on-policy is all there is (no TIS, no dual clip)
    ("trainer-0", 3, False, 4, OFF, {}, ("trainer", False, False, None)),
    # our fresh batch, tis off: on-policy, pi_old = pi detached
    ("trainer-0", 4, True, 4, OFF, {}, ("trainer", False, False, None)),
    # ours, back one version late, tis off: bypass (sampling log-probs), dual clip 3
    ("trainer-0", 3, True, 4, OFF, {}, ("sampling", False, False, 3.0)),
    # the overlap sampler's fresh batch (--max_ahead=0; the trainer's weights bit for bit): ours
    ("trainer-sampler", 4, True, 4, OFF, {}, ("trainer", False, False, None)),
    # a worker's fresh batch, tis off: bypass, dual clip
    ("gen-1", 4, True, 4, OFF, {}, ("sampling", False, False, 3.0)),
    # ... tis on: decoupled, the trainer's own pi_old and the TIS weight
    ("gen-1", 4, True, 4, TOK, {}, ("trainer", False, True, None)),
    # a worker's LATE batch, tis on: decoupled as well (it used to skip TIS)
    ("gen-1", 2, True, 4, TOK, {}, ("trainer", False, True, None)),
    # our late batch, tis on: the same rule
    ("trainer-0", 2, True, 4, TOK, {}, ("trainer", False, True, None)),
    # tis mask mode: pi_old is recomputed first (rejected tokens leave the counts)
    ("gen-1", 2, True, 4, MASK_TIS, {}, ("trainer", True, True, None)),
    # two passes: pi_old recorded before the first update
    ("gen-1", 2, True, 4, TOK, {"num_iterations": 2}, ("trainer", True, True, None)),
    # dropout in the training forward: pi_old from a pass without it
    ("trainer-0", 4, True, 4, OFF, {"dropout": True}, ("trainer", True, False, None)),
    # bypass with dropout: the fresh batch's mismatch is still measured without dropout
    ("gen-1", 4, True, 4, OFF, {"dropout": True}, ("sampling", True, False, 3.0)),
    # ... a late bypass batch has no use for the trainer's log-probs
    ("gen-1", 3, True, 4, OFF, {"dropout": True}, ("sampling", False, False, 3.0)),
    # the preset's own dual clip wins, on every batch
    ("trainer-0", 4, True, 4, OFF, {"clip_ratio_c": 5.0}, ("trainer", False, False, 5.0)),
    ("gen-1", 2, True, 4, OFF, {"clip_ratio_c": 5.0}, ("sampling", False, False, 5.0)),
    # --offpolicy_clip_c=0: no dual clip for bypass batches
    ("gen-1", 2, True, 4, OFF, {"offpolicy_clip_c": 0.0}, ("sampling", False, False, None)),
    # cispo / sapo are bounded by themselves: no dual clip
    ("gen-1", 2, True, 4, OFF, {"pg_loss": "cispo"}, ("sampling", False, False, None)),
    # no trainer version (tests, benchmarks): bypass when sampling log-probs are present
    ("gen-1", 2, True, None, OFF, {}, ("sampling", False, False, 3.0)),
])
def test_one_rule_for_every_batch(producer, version, gen, trainer_version, tis, kw, want):
    c = correction(_stub(producer, version, gen), trainer_version, tis=tis, **kw)
    assert (c.old, c.recompute, c.tis, c.clip_ratio_c) == want


def test_tis_options_are_checked():
    from simple_grpo.cli import parse_config
    from simple_grpo.errors import UserError
    from simple_grpo.common.config import TrainConfig, resolve

    cfg = resolve(parse_config(TrainConfig, ["--tis=sequence", "--tis_mode=mask", "--tis_cap=3"]))
    assert TISSettings.from_config(cfg) == TISSettings("sequence", "mask", 3.0)
    for bad, message in [("--tis=tokens", "--tis must be"), ("--tis_mode=clip", "--tis_mode must be"),
                         ("--tis_cap=0.5", "--tis_cap must be >= 1")]:
        with pytest.raises(UserError, match=message):
            resolve(parse_config(TrainConfig, [bad]))


# --- the real train_on_batch in a DeepSpeed engine on the tiny model

B, P, C = 4, 3, 4
LENS = [4, 3, 4, 4]  # 15 loss tokens
LOSS_KW = dict(eps_low=0.2, eps_high=0.2, beta=0.0, kl="k3", agg="seq-mean-token-mean", max_tokens=C,
               ratio_level="token")


def _batch(producer: str, adv: list[float], ratios: list[list[float]] | None, version: int = 0,
           lens: list[int] = LENS) -> RolloutBatch:
    """A fixed batch whose recorded sampling log-probs make exp(trainer logp - gen) = `ratios` under
    the initial weights (None: no sampling log-probs)."""
    g = torch.Generator().manual_seed(0)
    n = len(adv)
    b = RolloutBatch(prompt_ids=torch.randint(3, 300, (n, P), generator=g), prompt_lens=torch.full((n,), P),
                     completion_ids=torch.randint(3, 300, (n, C), generator=g),
                     completion_lens=torch.tensor(lens), rewards=torch.zeros(n),
                     advantages=torch.tensor(adv), weight_version=version, meta={"producer": producer})
    if ratios is not None:
        with torch.no_grad():
            logp = completion_logprobs(build_tiny_model(seed=1), b.prompt_ids, b.prompt_lens,
                                       b.completion_ids, b.completion_lens)
        mask = torch.arange(C)[None] < b.completion_lens[:, None]
        b.gen_logprobs = torch.where(mask, logp - torch.tensor(ratios).log(), 0.0)
    return b


def _train(batch: RolloutBatch, weight_version: int, iterations: int = 1, tis: TISSettings | None = None,
           **loss_kw):
    """One train_on_batch call in a fresh engine (the initial weights) -> (metrics, parameters)."""
    cfg = eng.ds_config(ROOT / "ds_config.json", micro_batch=batch.batch_size, grad_accum=1, world_size=1,
                        grad_clip=1.0, bf16=False)
    engine = eng.build_engine(build_tiny_model(seed=1), lr=1e-2, weight_decay=0.0, warmup_steps=1,
                              config=cfg)
    m, _ = train_on_batch(engine, batch, micro_batch=batch.batch_size, num_iterations=iterations,
                          loss_kw={**LOSS_KW, **loss_kw}, eos_ids=[2], overlong_filter=False, temperature=1.0,
                          world_size=1, device=torch.device("cpu"), weight_version=weight_version, tis=tis)
    return m, {k: v.detach().clone() for k, v in engine.module.state_dict().items()}


def _equal(a: dict, b: dict) -> bool:
    return all(torch.equal(a[k], b[k]) for k in a)


# per sequence: seq 0 (A = +1) ratio 1.5 > 1.2: clipped high, no gradient; seq 1 (A = +1) 0.9 and
# seq 3 (A = -1) 1.15: inside the clip range; seq 2 (A = -1) 0.5 < 0.8: clipped low, no gradient
ADV = [1.0, 1.0, -1.0, -1.0]
RATIOS = [[r] * C for r in (1.5, 0.9, 0.5, 1.15)]


def test_late_trainer_batch_uses_its_sampling_logprobs(dist_env):
    m, late = _train(_batch("trainer-0", ADV, RATIOS, version=0), weight_version=1)
    # token-weighted ratio: (4 * 1.5 + 3 * 0.9 + 4 * 0.5 + 4 * 1.15) / 15 = 15.3 / 15 = 1.02
    assert m["ratio_mean"] == pytest.approx(1.02, abs=1e-5) and m["ratio_max"] == pytest.approx(1.5, rel=1e-5)
    assert m["clip_high_frac"] == pytest.approx(4 / 15) and m["clip_low_frac"] == pytest.approx(4 / 15)
    assert finish_ratios(dict(m))["offpolicy_token_frac"] == 1.0  # all 15 tokens from version 0
    assert "logprob_mismatch" not in finish_ratios(dict(m))  # only fresh batches are compared
    # the clipped sequences get no gradient: the same update as with their advantages zeroed
    _, control = _train(_batch("trainer-0", [0.0, 1.0, 0.0, -1.0], RATIOS, version=0), weight_version=1)
    assert _equal(late, control), "tokens clipped by the ratio must get no gradient"
    # trained as on-policy (ratio 1, nothing clipped) the update would differ
    m_fresh, fresh = _train(_batch("trainer-0", ADV, RATIOS, version=1), weight_version=1)
    assert m_fresh["ratio_mean"] == 1.0 and m_fresh["clip_high_frac"] == 0.0
    assert finish_ratios(dict(m_fresh))["offpolicy_token_frac"] == 0.0
    assert not _equal(late, fresh)
    # a late batch without sampling log-probs can only be trained on-policy: not counted as corrected
    m_bare, _ = _train(_batch("trainer-0", ADV, None, version=0), weight_version=1)
    assert m_bare["ratio_mean"] == 1.0 and finish_ratios(dict(m_bare))["offpolicy_token_frac"] == 0.0


@pytest.mark.parametrize("iterations", [1, 2])
def test_fresh_trainer_batch_is_trained_as_before(dist_env, iterations):
    """Recording sampling log-probs changes nothing for a batch trained at its own version: the
    same parameters, bit for bit, as the batch without them (the on-policy path)."""
    m, with_gen = _train(_batch("trainer-0", ADV, RATIOS, version=3), weight_version=3, iterations=iterations)
    _, without = _train(_batch("trainer-0", ADV, None, version=3), weight_version=3, iterations=iterations)
    assert _equal(with_gen, without)
    r = finish_ratios(dict(m))
    assert r["offpolicy_token_frac"] == 0.0
    # mean |gen - trainer| = (4 |log 1.5| + 3 |log 0.9| + 4 |log 0.5| + 4 |log 1.15|) / 15
    want = (4 * math.log(1.5) - 3 * math.log(0.9) - 4 * math.log(0.5) + 4 * math.log(1.15)) / 15
    assert r["logprob_mismatch"] == pytest.approx(want, abs=1e-5)


@pytest.mark.parametrize("mode, loss, weight_mean, clipped, masked", [
    # weights [[0.6, 1.5, 2.0], [0.8, 2.0]] (3.0 and 4.0 truncated at 2); ratio 1, so pg = -A w:
    # seq 0 (A=+1): -(0.6 + 1.5 + 2.0) = -4.1; seq 1 (A=-2): 2 (0.8 + 2.0) = 5.6; token-mean 1.5 / 5
    ("truncate", 0.30, 1.38, 0.4, 0.0),
    # 3.0 and 4.0 outside [0.5, 2] leave the loss AND its denominator: (-2.1 + 1.6) / 3 kept tokens;
    # the weight mean is over the kept tokens: (0.6 + 1.5 + 0.8) / 3; 2 of 5 tokens masked
    ("mask", -0.5 / 3, 2.9 / 3, 0.0, 0.4),
])
def test_tis_token_weights_the_loss_of_a_fresh_worker_batch(dist_env, mode, loss, weight_mean, clipped,
                                                            masked):
    batch = _batch("gen-7", [1.0, -2.0], [[0.6, 1.5, 3.0, 1.0], [0.8, 4.0, 1.0, 1.0]], version=2,
                   lens=[3, 2])
    m, _ = _train(batch, weight_version=2, tis=TISSettings("token", mode, 2.0), agg="token-mean")
    assert m["loss"] == pytest.approx(loss, abs=1e-5) and m["pg_loss"] == pytest.approx(loss, abs=1e-5)
    assert m["ratio_mean"] == 1.0  # the old policy is the trainer's own (current weights, detached)
    r = finish_ratios(dict(m))
    assert r["tis_weight_mean"] == pytest.approx(weight_mean, abs=1e-5)
    assert r["tis_clipped_frac"] == pytest.approx(clipped) and r["tis_masked_frac"] == pytest.approx(masked)
    assert r["offpolicy_token_frac"] == 0.0
    assert m["tis_ratio_max"] == pytest.approx(4.0, rel=1e-5)  # the largest pi_old / pi_sampler, uncapped


def test_a_sequence_level_step_reports_the_largest_sequence_ratio(dist_env):
    """--tis=sequence: the step's tis_ratio_max is its largest sequence ratio, seq 1's 0.8 * 4.0 =
    3.2 (seq 0: 0.6 * 1.5 * 3.0 = 2.7), not the largest token ratio 4.0; the cap does not lower it."""
    batch = _batch("gen-7", [1.0, -2.0], [[0.6, 1.5, 3.0, 1.0], [0.8, 4.0, 1.0, 1.0]], version=2,
                   lens=[3, 2])
    m, _ = _train(batch, weight_version=2, tis=TISSettings("sequence", "truncate", 2.0), agg="token-mean")
    assert m["tis_ratio_max"] == pytest.approx(3.2, rel=1e-5)
    # both sequences are over the cap of 2: every token is truncated, weight 2
    assert finish_ratios(dict(m))["tis_weight_mean"] == pytest.approx(2.0, abs=1e-5)
