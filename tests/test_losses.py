"""policy_loss / aggregate / kl_estimate against hand-computed numbers (float64, atol 1e-6)."""
import math

import pytest
import torch

from simple_grpo.algo.losses import PRESETS, aggregate, kl_estimate, policy_loss

F64 = torch.float64

# Two sequences, three completion positions; the last token of sequence 1 is padding.
# Ratios r = exp(logp - old): seq 0: [1.1, 1.5, 0.7], seq 1: [0.9, 0.5, (pad)].
# Advantages: seq 0 +1, seq 1 -2.  Clip 0.2 / 0.2.
RATIOS = [[1.1, 1.5, 0.7], [0.9, 0.5, 1.0]]
ADV = [1.0, -2.0]
MASK = [[1, 1, 1], [1, 1, 0]]
# log(pi / ref) per token: seq 0: [0.1, -0.2, 0.0], seq 1: [0.5, -1.0, (pad)]
DIFF = [[0.1, -0.2, 0.0], [0.5, -1.0, 0.0]]
# Per-token policy terms -min(r*A, clip(r)*A):
#   seq 0 (A=+1): r=1.1 -> -1.1 | r=1.5 -> clip 1.2 -> -1.2 (clipped high) | r=0.7 -> -0.7
#   seq 1 (A=-2): r=0.9 -> 1.8  | r=0.5 -> min(-1.0, 0.8*-2=-1.6) -> 1.6 (clipped low)
# sums: seq 0 = -3.0 over 3 tokens, seq 1 = 3.4 over 2 tokens; all tokens 0.4 over 5.
# k3 = exp(-d) + d - 1 per token:
K3 = [[math.exp(-0.1) + 0.1 - 1, math.exp(0.2) - 0.2 - 1, 0.0],
      [math.exp(-0.5) + 0.5 - 1, math.exp(1.0) - 1.0 - 1, 0.0]]


def inputs(requires_grad=True):
    logp = torch.tensor([[-1.0, -2.0, -0.5], [-0.3, -1.2, -0.7]], dtype=F64, requires_grad=requires_grad)
    old = logp.detach() - torch.tensor(RATIOS, dtype=F64).log()
    ref = logp.detach() - torch.tensor(DIFF, dtype=F64)
    return logp, old, ref, torch.tensor(ADV, dtype=F64), torch.tensor(MASK, dtype=torch.bool)


@pytest.mark.parametrize("agg, kw, expected", [
    # GRPO: mean over sequences of token means: (-3.0/3 + 3.4/2) / 2 = (-1.0 + 1.7) / 2 = 0.35
    ("seq-mean-token-mean", {}, 0.35),
    # DAPO: all valid tokens together: 0.4 / 5 = 0.08
    ("token-mean", {}, 0.08),
    # DAPO with the step's token count given (e.g. 20 tokens across micro-batches): 0.4 / 20 = 0.02
    ("token-mean", {"num_tokens": 20}, 0.02),
    # Dr.GRPO: sum / (B * max_tokens) = 0.4 / (2 * 4) = 0.05
    ("seq-mean-token-sum-norm", {"max_tokens": 4}, 0.05),
    # Dr.GRPO without max_tokens uses the tensor width T = 3: 0.4 / 6
    ("seq-mean-token-sum-norm", {}, 0.4 / 6),
    # seq-mean-token-mean over a step of 4 sequences: (-1.0 + 1.7) / 4 = 0.175
    ("seq-mean-token-mean", {"num_seqs": 4}, 0.175),
])
def test_aggregation_modes(agg, kw, expected):
    logp, old, ref, adv, mask = inputs()
    loss, m = policy_loss(logp, old, ref, adv, mask, agg=agg, beta=0.0, **kw)
    assert loss.item() == pytest.approx(expected, abs=1e-6)
    assert m["clip_high_frac"] == pytest.approx(1 / 5)  # only r=1.5 with A>0
    assert m["clip_low_frac"] == pytest.approx(1 / 5)   # only r=0.5 with A<0
    assert m["ratio_mean"] == pytest.approx((1.1 + 1.5 + 0.7 + 0.9 + 0.5) / 5)  # 0.94
    assert m["ratio_max"] == pytest.approx(1.5)  # the largest valid ratio (padding's garbage ignored)
    assert m["tokens"] == 5


@pytest.mark.parametrize("kind, expected", [
    # k1 = d: (0.1 - 0.2 + 0.0 + 0.5 - 1.0) / 5 = -0.12
    ("k1", -0.12),
    # k2 = d^2 / 2: (0.005 + 0.02 + 0 + 0.125 + 0.5) / 5 = 0.13
    ("k2", 0.13),
    # k3 = exp(-d) + d - 1: (0.0048374 + 0.0214028 + 0 + 0.1065307 + 0.7182818) / 5
    ("k3", (K3[0][0] + K3[0][1] + K3[1][0] + K3[1][1]) / 5),
])
def test_kl_estimators_metric(kind, expected):
    logp, old, ref, adv, mask = inputs()
    _, m = policy_loss(logp, old, ref, adv, mask, kl=kind, beta=0.0)
    assert m["kl"] == pytest.approx(expected, abs=1e-6)


def test_kl_estimate_values():
    d = torch.tensor([0.1, -0.2, 0.5, -1.0], dtype=F64)
    zero = torch.zeros(4, dtype=F64)
    assert torch.allclose(kl_estimate(d, zero, "k1"), d)
    assert torch.allclose(kl_estimate(d, zero, "k2"), torch.tensor([0.005, 0.02, 0.125, 0.5], dtype=F64))
    # k3(0.5) = exp(-0.5) + 0.5 - 1 = 0.60653066 - 0.5 = 0.10653066
    assert kl_estimate(d, zero, "k3")[2].item() == pytest.approx(0.10653066, abs=1e-6)
    assert (kl_estimate(d, zero, "k3") >= 0).all(), "k3 is non-negative"
    with pytest.raises(AssertionError, match="kl must be one of"):
        kl_estimate(d, zero, "k4")


def test_grpo_with_kl_penalty():
    # seq 0 KL mean = (K3[0][0] + K3[0][1] + 0) / 3 ; seq 1 KL mean = (K3[1][0] + K3[1][1]) / 2
    # loss = 0.35 + 0.04 * (kl0 + kl1) / 2
    kl0 = (K3[0][0] + K3[0][1]) / 3
    kl1 = (K3[1][0] + K3[1][1]) / 2
    logp, old, ref, adv, mask = inputs()
    loss, _ = policy_loss(logp, old, ref, adv, mask, beta=0.04, kl="k3", agg="seq-mean-token-mean")
    assert loss.item() == pytest.approx(0.35 + 0.04 * (kl0 + kl1) / 2, abs=1e-6)  # 0.3584231


@pytest.mark.parametrize("eps_low, eps_high, expected", [
    # asymmetric DAPO clip 0.2 / 0.28: r=1.5 -> 1.28 (still clipped): seq 0 = -(1.1+1.28+0.7) = -3.08
    # token-mean: (-3.08 + 3.4) / 5 = 0.064
    (0.2, 0.28, 0.064),
    # wide clip 0.6 / 0.6: nothing clipped; seq 0 = -3.3, seq 1 = 2*(0.9+0.5) = 2.8 -> -0.5 / 5 = -0.1
    (0.6, 0.6, -0.1),
    # no clip range at all (0 / 0): every ratio clipped to 1 where it would help:
    # seq 0: -min(r, 1) -> -(1 + 1 + 0.7) = -2.7
    # seq 1: -min(-2r, -2): r=0.9 -> -min(-1.8, -2) = 2 ; r=0.5 -> -min(-1.0, -2) = 2
    # total (-2.7 + 4) / 5 = 0.26
    (0.0, 0.0, 0.26),
])
def test_clip_settings(eps_low, eps_high, expected):
    logp, old, ref, adv, mask = inputs()
    loss, _ = policy_loss(logp, old, ref, adv, mask, agg="token-mean", eps_low=eps_low, eps_high=eps_high)
    assert loss.item() == pytest.approx(expected, abs=1e-6)


def test_gradients_clipped_and_masked_tokens_are_zero():
    logp, old, ref, adv, mask = inputs()
    old = old.clone()
    old[1, 2] = float("nan")  # garbage under the mask must not leak into any gradient
    ref = ref.clone()
    ref[1, 2] = float("inf")
    loss, _ = policy_loss(logp, old, ref, adv, mask, agg="token-mean", beta=0.0)
    loss.backward()
    g = logp.grad
    assert g[0, 1].item() == 0.0, "clipped-high token (r=1.5, A>0) must get zero gradient"
    assert g[1, 1].item() == 0.0, "clipped-low token (r=0.5, A<0) must get zero gradient"
    assert g[1, 2].item() == 0.0, "masked token must get exactly zero gradient"
    # unclipped tokens: d(-r*A/5)/dlogp = -r*A/5
    assert g[0, 0].item() == pytest.approx(-1.1 / 5, abs=1e-9)
    assert g[0, 2].item() == pytest.approx(-0.7 / 5, abs=1e-9)
    assert g[1, 0].item() == pytest.approx(0.9 * 2 / 5, abs=1e-9)


def test_masked_gradient_zero_with_kl():
    logp, old, ref, adv, mask = inputs()
    loss, _ = policy_loss(logp, old, ref, adv, mask, beta=0.1, kl="k2")
    loss.backward()
    assert logp.grad[1, 2].item() == 0.0 and torch.isfinite(logp.grad).all()


@pytest.mark.parametrize("agg", ["seq-mean-token-mean", "token-mean", "seq-mean-token-sum-norm"])
def test_all_masked_batch_is_finite_zero(agg):
    logp, old, ref, adv, _ = inputs()
    mask = torch.zeros(2, 3, dtype=torch.bool)
    loss, m = policy_loss(logp, old, ref, adv, mask, agg=agg, beta=0.04)
    loss.backward()
    assert loss.item() == 0.0 and torch.isfinite(loss)
    assert (logp.grad == 0).all()
    assert m["kl"] == 0.0 and m["tokens"] == 0


def test_gspo_sequence_level_ratio():
    # s0 = (1.1 * 1.5 * 0.7) ** (1/3) = 1.155 ** (1/3) = 1.0492 -> inside [0.8, 1.2], A=+1 -> -1.0492
    # s1 = (0.9 * 0.5) ** (1/2) = 0.6708 -> below 0.8 with A=-2 -> clipped: -min(-1.3416, -1.6) = 1.6
    logp, old, ref, adv, mask = inputs()
    loss, m = policy_loss(logp, old, ref, adv, mask, ratio_level="sequence", agg="seq-mean-token-mean")
    assert loss.item() == pytest.approx((-(1.155 ** (1 / 3)) + 1.6) / 2, abs=1e-6)
    assert m["clip_low_frac"] == pytest.approx(2 / 5)  # both valid tokens of sequence 1
    loss.backward()
    assert (logp.grad[1] == 0).all(), "a clipped sequence gives no gradient to any of its tokens"
    # sequence 0: d(-s0)/dlogp_t = -s0 / 3 for each of its 3 tokens, then / 2 sequences
    assert torch.allclose(logp.grad[0], torch.full((3,), -(1.155 ** (1 / 3)) / 6, dtype=F64))


@pytest.mark.parametrize("adv,old_shift", [
    (1.0, 0.0),    # identical weights, A > 0: s = 1 inside the clip range
    (-1.0, 0.0),   # identical weights, A < 0
    (1.0, 1e-4),   # s = exp(-1e-4), still inside GSPO's [1 - 3e-4, 1 + 4e-4]
])
def test_gspo_token_weights_weight_each_token(adv, old_shift):
    # GSPO-token: token t's gradient is -A * s * w_t / |y| (its own TIS weight), not the sequence's
    # mean weight -A * s * mean(w) / |y|. w = [0.25, 2, 1, 0.5], |y| = 4, one sequence:
    # A = 1, s = 1 -> [-0.0625, -0.5, -0.25, -0.125] (a mean weight would give -0.234 x 4)
    logp = torch.zeros(1, 4, dtype=F64, requires_grad=True)
    old = torch.full((1, 4), old_shift, dtype=F64)
    w = torch.tensor([[0.25, 2.0, 1.0, 0.5]], dtype=F64)
    loss, m = policy_loss(logp, old, None, torch.tensor([adv], dtype=F64), torch.ones(1, 4, dtype=torch.bool),
                          ratio_level="sequence", agg="seq-mean-token-mean", eps_low=3e-4, eps_high=4e-4,
                          token_weight=w)
    loss.backward()
    s = math.exp(-old_shift)
    torch.testing.assert_close(logp.grad, -adv * s * w / 4, atol=1e-12, rtol=0)
    assert m["clip_low_frac"] == 0.0 and m["clip_high_frac"] == 0.0


def test_on_policy_old_logp_none_has_ratio_one():
    logp, _, ref, adv, mask = inputs()
    loss, m = policy_loss(logp, None, ref, adv, mask, agg="token-mean")
    # r = 1 everywhere: -(1 + 1 + 1) * 1 + (2 + 2) = 1 -> 1 / 5
    assert loss.item() == pytest.approx(0.2, abs=1e-9) and m["ratio_mean"] == 1.0
    # ... and the gradient is the policy gradient -A_i / 5 per valid token (old = logp detached;
    # an old log-prob that kept its graph would cancel it to 0)
    loss.backward()
    want = torch.tensor([[-1.0, -1.0, -1.0], [2.0, 2.0, 0.0]], dtype=F64) / 5
    torch.testing.assert_close(logp.grad, want, atol=1e-12, rtol=0)


@pytest.mark.parametrize("pg_loss", ["clip", "cispo", "sapo"])
def test_garbage_in_masked_logp_never_reaches_loss_metrics_or_gradient(pg_loss):
    logp, old, ref, adv, mask = inputs()
    clean, m_clean = policy_loss(logp, old, ref, adv, mask, beta=0.04, pg_loss=pg_loss)
    (g_clean,) = torch.autograd.grad(clean, logp)
    for bad in (float("nan"), float("inf"), -float("inf")):  # under the mask (row 1, position 2)
        dirty_logp = logp.detach().clone()
        dirty_logp[1, 2] = bad
        dirty_logp.requires_grad_(True)
        loss, m = policy_loss(dirty_logp, old, ref, adv, mask, beta=0.04, pg_loss=pg_loss)
        (g,) = torch.autograd.grad(loss, dirty_logp)
        assert loss.item() == clean.item() and m == m_clean, (bad, m)
        assert torch.equal(g, g_clean) and g[1, 2].item() == 0.0, (bad, g)


@pytest.mark.parametrize("agg, norm", [
    ("token-mean", "tokens"),
    ("seq-mean-token-sum-norm", "fixed"),
    ("seq-mean-token-mean", "seqs"),
])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_micro_batch_gradients_sum_to_full_batch(agg, norm, seed):
    g = torch.Generator().manual_seed(seed)
    B, T, max_tokens = 8, 6, 6
    logp0 = -torch.rand(B, T, generator=g, dtype=F64) * 3
    old = logp0 + (torch.rand(B, T, generator=g, dtype=F64) - 0.5) * 0.6
    ref = logp0 + (torch.rand(B, T, generator=g, dtype=F64) - 0.5)
    adv = torch.randn(B, generator=g, dtype=F64)
    lens = torch.randint(0, T + 1, (B,), generator=g)
    mask = torch.arange(T)[None] < lens[:, None]
    kw = dict(beta=0.04, agg=agg, max_tokens=max_tokens, eps_low=0.2, eps_high=0.28)

    full = logp0.clone().requires_grad_(True)
    policy_loss(full, old, ref, adv, mask, **kw)[0].backward()

    micro = logp0.clone().requires_grad_(True)
    step = {"tokens": dict(num_tokens=float(mask.sum())), "fixed": dict(num_tokens=B * max_tokens),
            "seqs": dict(num_seqs=B)}[norm]
    for s in range(0, B, 2):
        sl = slice(s, s + 2)
        policy_loss(micro[sl], old[sl], ref[sl], adv[sl], mask[sl], **kw, **step)[0].backward()
    assert torch.allclose(full.grad, micro.grad, atol=1e-12, rtol=0)


def test_aggregate_rejects_unknown_mode_and_shape_mismatch():
    with pytest.raises(AssertionError, match="agg must be one of"):
        aggregate(torch.zeros(2, 3), torch.ones(2, 3), "sum")
    with pytest.raises(AssertionError, match="mask"):
        aggregate(torch.zeros(2, 3), torch.ones(2, 4), "token-mean")


@pytest.mark.parametrize("name, scale, agg, beta, eps", [
    ("grpo", "std", "seq-mean-token-mean", 0.04, (0.2, 0.2)),
    ("dr_grpo", "none", "seq-mean-token-sum-norm", 0.0, (0.2, 0.2)),
    ("dapo", "std", "token-mean", 0.0, (0.2, 0.28)),
    ("gspo", "std", "seq-mean-token-mean", 0.0, (3e-4, 4e-4)),
    ("cispo", "std", "token-mean", 0.0, (1.0, 3.0)),        # no lower bound, weight capped at 4
    ("sapo", "std", "seq-mean-token-mean", 0.0, (0.2, 0.2)),  # eps unused by the soft gate
])
def test_presets_are_plain_data(name, scale, agg, beta, eps):
    p = PRESETS[name]
    assert (p["scale"], p["agg"], p["beta"], (p["eps_low"], p["eps_high"])) == (scale, agg, beta, eps)
    assert PRESETS["dapo"]["dynamic_sampling"] and PRESETS["dapo"]["overlong_reward"]
    assert PRESETS["gspo"]["ratio_level"] == "sequence"


G_PAD = 0.0  # the padded token of sequence 1 always gets exactly zero gradient


@pytest.mark.parametrize("eps_low, eps_high, expected, grad, low, high", [
    # loss_t = -sg(clip(r)) * A * logp_t, token-mean over 5 tokens; d/dlogp_t = -clip(r) * A / 5.
    # logp: seq 0 [-1.0, -2.0, -0.5] (A=+1), seq 1 [-0.3, -1.2] (A=-2).
    # clip 0.2/0.2: weights [1.1, 1.2, 0.8], [0.9, 0.8]
    #   seq 0: 1.1*1.0 + 1.2*2.0 + 0.8*0.5 = 3.9 ; seq 1: -(0.9*2*0.3) - (0.8*2*1.2) = -2.46
    #   (3.9 - 2.46) / 5 = 0.288; truncated below: r=0.7, 0.5 (2/5), above: r=1.5 (1/5)
    (0.2, 0.2, 0.288, [[-0.22, -0.24, -0.16], [0.36, 0.32, G_PAD]], 2 / 5, 1 / 5),
    # no lower bound (eps_low=1 -> clip at 0), cap 1.3: weights [1.1, 1.3, 0.7], [0.9, 0.5]
    #   seq 0: 1.1 + 2.6 + 0.35 = 4.05 ; seq 1: -0.54 - 1.2 = -1.74 -> 2.31 / 5 = 0.462
    (1.0, 0.3, 0.462, [[-0.22, -0.26, -0.14], [0.36, 0.2, G_PAD]], 0.0, 1 / 5),
    # the cispo preset (1.0 / 3.0): nothing truncated, weights = r: plain IS-weighted REINFORCE
    #   seq 0: 1.1 + 3.0 + 0.35 = 4.45 ; seq 1: -1.74 -> 2.71 / 5 = 0.542
    (1.0, 3.0, 0.542, [[-0.22, -0.3, -0.14], [0.36, 0.2, G_PAD]], 0.0, 0.0),
])
def test_cispo_value_and_gradient(eps_low, eps_high, expected, grad, low, high):
    logp, old, ref, adv, mask = inputs()
    loss, m = policy_loss(logp, old, ref, adv, mask, agg="token-mean", pg_loss="cispo",
                          eps_low=eps_low, eps_high=eps_high)
    assert loss.item() == pytest.approx(expected, abs=1e-9)
    loss.backward()
    # the gradient flows only through logp: the clipped ratio is a constant (else r' terms appear)
    assert torch.allclose(logp.grad, torch.tensor(grad, dtype=F64), atol=1e-12, rtol=0)
    assert m["clip_low_frac"] == pytest.approx(low) and m["clip_high_frac"] == pytest.approx(high)


@pytest.mark.parametrize("tau_pos, tau_neg, expected, grad, gate", [
    # loss_t = -(4/tau) sigmoid(tau (r - 1)) A, tau = tau_pos on seq 0 (A=+1), tau_neg on seq 1
    # (A=-2); d/dlogp_t = -4 s (1 - s) r A; token-mean over 5 tokens.
    # SAPO's defaults 1.0 / 1.05:
    #   seq 0: -4 s(0.1) = -2.0999167, -4 s(0.5) = -2.4898373, -4 s(-0.3) = -1.7022299
    #   seq 1: (4/1.05) s(-0.105) * 2 = 3.6097074, (4/1.05) s(-0.525) * 2 = 2.8318767
    #   sum 0.1496000 / 5 = 0.029920002; gate 4 s (1 - s) averages 0.969348177
    (1.0, 1.05, 0.029920002, [[-0.219450915, -0.282004455, -0.136896655],
                              [0.35900957, 0.186827965, G_PAD]], 0.969348177),
    # swapped steepness 2.0 / 0.5 changes each branch on its own:
    #   seq 0: -2 s(0.2) = -1.0996680, -2 s(1.0) = -1.4621172, -2 s(-0.6) = -0.7086874
    #   seq 1: 8 s(-0.05) * 2 = 7.8000417, 8 s(-0.25) * 2 = 7.0051760 -> 11.5347451 / 5
    (2.0, 0.5, 2.306949021, [[-0.217814584, -0.23593432, -0.128119175],
                             [0.359775094, 0.196907266, G_PAD]], 0.935112515),
])
def test_sapo_value_and_gradient_both_tau_branches(tau_pos, tau_neg, expected, grad, gate):
    logp, old, ref, adv, mask = inputs()
    loss, m = policy_loss(logp, old, ref, adv, mask, agg="token-mean", pg_loss="sapo",
                          tau_pos=tau_pos, tau_neg=tau_neg)
    assert loss.item() == pytest.approx(expected, abs=1e-8)
    loss.backward()
    assert torch.allclose(logp.grad, torch.tensor(grad, dtype=F64), atol=1e-8, rtol=0)
    assert m["soft_gate_mean"] == pytest.approx(gate, abs=1e-8)
    assert m["clip_low_frac"] == 0.0 and m["clip_high_frac"] == 0.0  # no hard clip


def dual_inputs():
    # ratios [4.0, 1.1] in both sequences; A = +1 (seq 0), -2 (seq 1); no padding
    logp = torch.tensor([[-1.0, -0.5], [-0.7, -0.2]], dtype=F64, requires_grad=True)
    old = logp.detach() - torch.tensor([[4.0, 1.1], [4.0, 1.1]], dtype=F64).log()
    return logp, old, torch.tensor([1.0, -2.0], dtype=F64), torch.ones(2, 2, dtype=torch.bool)


@pytest.mark.parametrize("c, expected, grad, frac", [
    # clipped terms (eps 0.2): seq 0 (A=+1): r=4 -> -1.2 (clipped high, no grad), r=1.1 -> -1.1;
    # seq 1 (A=-2): r=4 -> -min(-8, -2.4) = 8, r=1.1 -> 2.2.  token-mean over 4 tokens.
    # off: (-1.2 - 1.1 + 8 + 2.2) / 4 = 1.975; d/dlogp = -r A / 4 -> 2.0 for the r=4, A<0 token
    (None, 1.975, [[0.0, -0.275], [2.0, 0.55]], None),
    # c=3: 8 > 3 * 2 = 6 -> capped at 6 (no gradient); A > 0 and the 2.2 token untouched: 5.9 / 4
    (3.0, 1.475, [[0.0, -0.275], [0.0, 0.55]], 1 / 4),
    # c=5: cap 10 > 8, inactive: same as off
    (5.0, 1.975, [[0.0, -0.275], [2.0, 0.55]], 0.0),
    # c=1.5: cap 3 -> 8 becomes 3, 2.2 < 3 stays: (-2.3 + 3 + 2.2) / 4 = 0.725
    (1.5, 0.725, [[0.0, -0.275], [0.0, 0.55]], 1 / 4),
])
def test_dual_clip_caps_only_negative_advantages(c, expected, grad, frac):
    logp, old, adv, mask = dual_inputs()
    loss, m = policy_loss(logp, old, None, adv, mask, agg="token-mean", clip_ratio_c=c)
    assert loss.item() == pytest.approx(expected, abs=1e-9)
    loss.backward()
    assert torch.allclose(logp.grad, torch.tensor(grad, dtype=F64), atol=1e-12, rtol=0)
    assert m.get("dual_clip_frac") == (None if frac is None else pytest.approx(frac))
    assert m["clip_high_frac"] == pytest.approx(1 / 4)  # r=4 with A>0 is still the ordinary clip


@pytest.mark.parametrize("kw, message", [
    (dict(pg_loss="ppo"), "pg_loss must be one of"),
    (dict(clip_ratio_c=1.0), "must be > 1"),                                  # c <= 1 is no cap
    (dict(pg_loss="cispo", clip_ratio_c=3.0), "needs pg_loss='clip'"),        # dual clip is clip-only
    (dict(pg_loss="sapo", ratio_level="sequence"), "needs token ratios"),   # GSPO ratios: clip only
])
def test_pg_loss_option_errors(kw, message):
    logp, old, ref, adv, mask = inputs()
    with pytest.raises(AssertionError, match=message):
        policy_loss(logp, old, ref, adv, mask, **kw)


@pytest.mark.parametrize("overrides, expected", [
    # the new presets, from their papers
    (dict(preset="cispo"), dict(pg_loss="cispo", eps_low=1.0, eps_high=3.0, agg="token-mean", beta=0.0)),
    (dict(preset="sapo"), dict(pg_loss="sapo", tau_pos=1.0, tau_neg=1.05, agg="seq-mean-token-mean")),
    # every other preset keeps the clipped objective, dual clip off
    (dict(preset="gspo"), dict(pg_loss="clip", clip_ratio_c=None, ratio_level="sequence")),
    (dict(preset="dapo"), dict(pg_loss="clip", clip_ratio_c=None, eps_high=0.28)),
    # command-line overrides win over the preset
    (dict(preset="sapo", tau_neg=2.0), dict(pg_loss="sapo", tau_pos=1.0, tau_neg=2.0)),
    (dict(preset="dapo", clip_ratio_c=3.0), dict(pg_loss="clip", clip_ratio_c=3.0)),
])
def test_pg_presets_resolve(overrides, expected):
    from simple_grpo.common.config import TrainConfig, loss_kwargs, resolve

    cfg = resolve(TrainConfig(**overrides))
    assert {k: getattr(cfg, k) for k in expected} == expected
    kw = loss_kwargs(cfg)
    assert {k: kw[k] for k in ("pg_loss", "tau_pos", "tau_neg", "clip_ratio_c")} == \
        {k: getattr(cfg, k) for k in ("pg_loss", "tau_pos", "tau_neg", "clip_ratio_c")}


@pytest.mark.parametrize("overrides, message", [
    (dict(pg_loss="ppo"), "--pg_loss must be one of"),
    (dict(preset="gspo", pg_loss="cispo"), "needs --ratio_level=token"),
    (dict(clip_ratio_c=0.5), "--clip_ratio_c"),
    (dict(preset="sapo", clip_ratio_c=3.0), "--clip_ratio_c"),
    (dict(preset="sapo", tau_pos=0.0), "--tau_pos and --tau_neg must be > 0"),
])
def test_pg_options_rejected_by_resolve(overrides, message):
    from simple_grpo.errors import UserError
    from simple_grpo.common.config import TrainConfig, resolve

    with pytest.raises(UserError, match=message):
        resolve(TrainConfig(**overrides))
