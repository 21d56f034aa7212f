"""The off-policy correction through the real policy_step.train_on_batch in a DeepSpeed engine on
the tiny model: late batches get TIS like fresh ones, bypass batches are bounded by the dual clip,
TIS mask mode takes rejected sequences out of the denominator, and dropout reaches only the
training forward (pi_old, TIS, the mismatch and the LoRA reference run without it)."""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from test_offpolicy import ADV, RATIOS, _batch

from simple_grpo.algo.logprobs import completion_logprobs
from simple_grpo.algo.tis import TISSettings
from simple_grpo.models import build_tiny_model
from simple_grpo.common import dropout
from simple_grpo.train import engine as eng
from simple_grpo.train.offpolicy import finish_ratios
from simple_grpo.train.policy_step import train_on_batch

ROOT = Path(__file__).resolve().parents[1]
LOSS_KW = dict(eps_low=0.2, eps_high=0.2, beta=0.0, kl="k3", agg="token-mean", max_tokens=4,
               ratio_level="token", pg_loss="clip", clip_ratio_c=None)


def _engine(model=None, lr: float = 1.0):
    """The trainer's DeepSpeed config (ZeRO-2) with plain SGD: an update is exactly -lr * gradient
    (AdamW's first step would hide the gradient's scale)."""
    import deepspeed

    model = model if model is not None else build_tiny_model(seed=1)
    cfg = eng.ds_config(ROOT / "ds_config.json", micro_batch=4, grad_accum=1, world_size=1, grad_clip=0.0,
                        bf16=False)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr, momentum=0.0)
    engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=cfg)
    return engine


def _params(engine) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in engine.module.named_parameters() if p.requires_grad}


def _train(batch, weight_version, *, tis=None, offpolicy_clip_c=3.0, **loss_kw):
    """One train_on_batch with plain SGD (lr 1) -> (metrics, parameter change = -gradient)."""
    engine = _engine()
    before = _params(engine)
    m, _ = train_on_batch(engine, batch, micro_batch=batch.batch_size, num_iterations=1,
                          loss_kw={**LOSS_KW, **loss_kw}, eos_ids=[2], overlong_filter=False, temperature=1.0,
                          world_size=1, device=torch.device("cpu"), weight_version=weight_version, tis=tis,
                          offpolicy_clip_c=offpolicy_clip_c)
    after = _params(engine)
    return m, {k: after[k] - before[k] for k in before}


def _close(a: dict, b: dict, tol: float = 1e-6) -> bool:
    return all(torch.allclose(a[k], b[k], atol=tol, rtol=0) for k in a)


@pytest.mark.parametrize("producer, version", [
    ("gen-3", 0),      # a worker's batch, 1 version late
    ("trainer-0", 0),  # the trainer's own, back late from the queue
])
def test_late_batches_get_tis_like_fresh_ones(dist_env, producer, version):
    """--tis=token: a late batch is trained with pi_old = the trainer's log-probs and the TIS weight
    min(pi_old / pi_sampler, 2), exactly as the same batch trained fresh (before: bypass, no TIS)."""
    tis = TISSettings("token", "truncate", 2.0)
    m_late, d_late = _train(_batch(producer, ADV, RATIOS, version=version), version + 1, tis=tis)
    m_fresh, d_fresh = _train(_batch(producer, ADV, RATIOS, version=version + 1), version + 1, tis=tis)
    assert _close(d_late, d_fresh), "a late batch must get the same correction as a fresh one"
    r = finish_ratios(dict(m_late))
    # weights 1.5, 0.9, 0.5, 1.15 (none above 2), 4 + 3 + 4 + 4 tokens; ratio pi / pi_old = 1
    assert r["tis_weight_mean"] == pytest.approx((4 * 1.5 + 3 * 0.9 + 4 * 0.5 + 4 * 1.15) / 15, abs=1e-5)
    assert r["offpolicy_token_frac"] == 1.0 and m_late["ratio_max"] == 1.0
    assert m_late["tis_ratio_max"] == pytest.approx(1.5, rel=1e-5)
    # token-mean of -A w: -(4 * 1.5 + 3 * 0.9) + (4 * 0.5 + 4 * 1.15) = -2.1, over 15 tokens
    assert m_late["pg_loss"] == pytest.approx(-2.1 / 15, abs=1e-5)


@pytest.mark.parametrize("clip_c, capped", [
    (3.0, True),   # the default: the ratio-5 tokens of a negative-advantage sequence are capped at 3 |A|
    (0.0, False),  # --offpolicy_clip_c=0 (no dual clip): their loss 5 |A| grows with the ratio
])
def test_a_late_bypass_batch_is_bounded_by_the_dual_clip(dist_env, clip_c, capped):
    ratios = [[r] * 4 for r in (1.0, 1.1, 5.0, 0.9)]
    adv = [1.0, 1.0, -1.0, -1.0]
    m, d = _train(_batch("gen-2", adv, ratios, version=0), 3, offpolicy_clip_c=clip_c)
    assert m["ratio_max"] == pytest.approx(5.0, rel=1e-5)
    # token-mean over 15 tokens: -(4 * 1.0 + 3 * 1.1) + 4 * min(5, c) + 4 * 0.9
    want = (-(4 * 1.0 + 3 * 1.1) + 4 * (3.0 if capped else 5.0) + 4 * 0.9) / 15
    assert m["pg_loss"] == pytest.approx(want, abs=1e-5)
    assert m["dual_clip_frac"] == pytest.approx(4 / 15 if capped else 0.0)
    # capped tokens get no gradient: the update equals the one with that sequence's advantage 0
    _, control = _train(_batch("gen-2", [1.0, 1.0, 0.0, -1.0], ratios, version=0), 3, offpolicy_clip_c=clip_c)
    assert _close(d, control) is capped


def test_tis_mask_mode_takes_rejected_sequences_out_of_the_sequence_count(dist_env):
    """Sequence-level mask mode, seq-mean-token-mean: a rejected sequence leaves num_seqs (before:
    it counted, so the kept sequence's loss was halved)."""
    ratios = [[1.2] * 4, [1.0, 5.0, 1.0, 1.0]]  # seq 1's product 5 > cap 2: rejected
    tis = TISSettings("sequence", "mask", 2.0)
    m, _ = _train(_batch("gen-1", [1.0, -1.0], ratios, version=4, lens=[4, 4]), 4, tis=tis,
                  agg="seq-mean-token-mean")
    # seq 0's weight 1.2^4 = 2.07 is outside [0.5, 2] as well
    r = finish_ratios(dict(m))
    assert r["tis_masked_frac"] == pytest.approx(1.0)  # both sequences rejected: nothing trains
    assert m["pg_loss"] == 0.0
    ratios = [[1.1] * 4, [1.0, 5.0, 1.0, 1.0]]  # seq 0: 1.1^4 = 1.4641 kept; seq 1 rejected
    m, _ = _train(_batch("gen-1", [1.0, -1.0], ratios, version=4, lens=[4, 4]), 4, tis=tis,
                  agg="seq-mean-token-mean")
    r = finish_ratios(dict(m))
    assert r["tis_masked_frac"] == pytest.approx(0.5) and r["tis_weight_mean"] == pytest.approx(1.1 ** 4)
    assert m["pg_loss"] == pytest.approx(-(1.1 ** 4) / 1, abs=1e-5)  # one sequence in the mean, not 2


def _lora_model(p: float):
    """The tiny model with LoRA adapters (dropout p) whose B matrices are non-zero, so the adapter
    (and its dropout) changes the output."""
    from types import SimpleNamespace

    from simple_grpo.common import lora

    cfg = SimpleNamespace(lora_r=4, lora_alpha=8.0, lora_dropout=p, lora_target_modules="all-linear")
    model = lora.wrap(build_tiny_model(seed=1), cfg, seed=0)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for n, w in model.named_parameters():
            if "lora_B" in n:
                w.copy_(torch.randn(w.shape, generator=g) * 0.2)
    return model


def test_lora_dropout_reaches_only_the_training_forward(dist_env):
    engine = _engine(_lora_model(0.5), lr=0.0)
    engine.module.train()  # as after sampling: the trainer's module is in training mode
    assert dropout.active(engine.module)
    b = _batch("trainer-0", ADV, None, version=0)
    with torch.no_grad(), dropout.eval_mode(engine.module):
        b.gen_logprobs = completion_logprobs(engine.module, b.prompt_ids, b.prompt_lens, b.completion_ids,
                                             b.completion_lens)  # the sampler: no dropout
    m, _ = train_on_batch(engine, b, micro_batch=4, num_iterations=1, loss_kw=LOSS_KW, eos_ids=[2],
                          overlong_filter=False, temperature=1.0, world_size=1, device=torch.device("cpu"),
                          weight_version=0, tis=TISSettings("token"))
    r = finish_ratios(dict(m))
    assert r["logprob_mismatch"] < 1e-6, "pi_old must be computed without dropout"
    assert r["tis_weight_mean"] == pytest.approx(1.0, abs=1e-5)
    assert m["ratio_max"] > 1.001, "the training forward keeps its dropout"
    assert engine.module.training, "the module's mode is restored"
    # the adapter-off reference: the base model without dropout, the same values every call
    from simple_grpo.common.lora import reference_logprobs

    one = reference_logprobs(engine, b, micro_batch=4, temperature=1.0, device=torch.device("cpu"))
    two = reference_logprobs(engine, b, micro_batch=4, temperature=1.0, device=torch.device("cpu"))
    base = completion_logprobs(build_tiny_model(seed=1).eval(), b.prompt_ids, b.prompt_lens, b.completion_ids,
                               b.completion_lens)
    mask = torch.arange(4)[None] < b.completion_lens[:, None]
    assert torch.equal(one, two) and torch.allclose(one[mask], base[mask].detach(), atol=1e-5)


def test_disable_dropout_zeroes_the_base_model_and_keeps_lora():
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=2, attention_dropout=0.3)
    model = LlamaForCausalLM(cfg)
    model.model.extra = torch.nn.Dropout(0.1)  # an nn.Dropout the way other architectures have them
    assert dropout.active(model)
    assert dropout.disable(model) == 2  # the attention rate and the module
    assert not dropout.active(model) and model.config.attention_dropout == 0.0
    lora_model = _lora_model(0.5)
    dropout.disable(lora_model)
    assert dropout.active(lora_model), "--lora_dropout is configured separately and stays"


def test_dropout_flag_is_applied_by_the_trainer(tiny_model_dir, tmp_path, monkeypatch):
    """grpo_ref_split.py: --disable_dropout (default) reaches the model the engine trains."""
    import sys

    sys.path.insert(0, str(ROOT))
    import grpo_ref_split
    from simple_grpo import models

    load = models.load_model
    seen = []

    def with_dropout(*a, **kw):
        model = load(*a, **kw)
        for layer in model.model.layers:
            layer.self_attn.attention_dropout = 0.5
        seen.append(model)
        return model

    monkeypatch.setattr(models, "load_model", with_dropout)
    args = [f"--model={tiny_model_dir}", f"--run_dir={tmp_path}", "--steps=0", "--eval_every=0",
            "--save_every=-1", "--plot_every=0", "--preset=dr_grpo"]
    grpo_ref_split.main(args)
    assert not dropout.active(seen[-1])
    grpo_ref_split.main(args + ["--disable_dropout=false", f"--run_dir={tmp_path / 'b'}"])
    assert dropout.active(seen[-1])


def test_offpolicy_clip_c_is_checked():
    from simple_grpo.cli import parse_config
    from simple_grpo.errors import UserError
    from simple_grpo.common.config import TrainConfig, resolve

    assert resolve(parse_config(TrainConfig, [])).offpolicy_clip_c == 3.0
    assert resolve(parse_config(TrainConfig, ["--offpolicy_clip_c=0"])).offpolicy_clip_c == 0.0
    with pytest.raises(UserError, match="--offpolicy_clip_c must be > 1"):
        resolve(parse_config(TrainConfig, ["--offpolicy_clip_c=0.5"]))
    assert math.isfinite(resolve(parse_config(TrainConfig, ["--offpolicy_clip_c=10"])).offpolicy_clip_c)
