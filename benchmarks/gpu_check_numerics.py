"""The CUDA-relevant numerics of benchmarks/gpu_check.py, run in its own process on one device.

Each check returns a row {"check", "ok", "detail"}; a check that raises is a failed row, so one
broken check never hides the others. The model is a few layers of the run's architecture (random
weights), built on the device.

    decode_vs_generate   our decode loop vs HF generate(do_sample=False), greedy, shared prompts,
                         fp32 and bf16: identical up to near-ties that the rounding may flip
    shared_prompt_logp   completion_logprobs with the shared-prompt KV cache vs the plain forward
    packed_logp          rows packed into one sequence (flash-attention's varlen path when installed,
                         else sdpa's block mask) vs the padded forward
    sampling_logp        log-probs recorded while sampling (T = 0.7) vs the trainer's recomputation
    losses               every preset's policy_loss on the device vs float64 on the CPU, computed
                         from the formulas one token at a time (not by policy_loss again)
"""
from __future__ import annotations

import math

import torch

from simple_grpo.gen.decode import decode
from simple_grpo.algo.logprobs import completion_logprobs
from simple_grpo.algo.losses import PRESETS, policy_loss
from simple_grpo.algo.masks import lengths_from_eos, mask_from_lengths


def _prompts(vocab: int, device, n: int = 3, width: int = 12, seed: int = 0):
    """n random prompts of different lengths, left-padded: ids [n, W], attention mask [n, W]."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, min(vocab, 30000), (n, width), generator=g)
    lens = torch.tensor([width - 3 * i for i in range(n)]).clamp(min=2)
    attn = mask_from_lengths(lens, width).flip(1).long()
    return torch.where(attn.bool(), ids, 0).to(device), attn.to(device)


def _greedy_pair(model, ids, attn, repeat, new):
    ref = model.generate(input_ids=ids.repeat_interleave(repeat, 0), attention_mask=attn.repeat_interleave(repeat, 0),
                         do_sample=False, max_new_tokens=new, min_new_tokens=new, eos_token_id=[10**6],
                         pad_token_id=0, use_cache=True)[:, ids.shape[1]:]
    got = decode(model, ids, attn, repeat=repeat, max_new_tokens=new, min_new_tokens=new, eos_ids=[],
                 pad_id=0, greedy=True).completion_ids_NC
    return got, ref


def _tie_gap(model, ids, attn, repeat, got, ref) -> float:
    """Largest logit gap, over rows where the two greedy outputs first differ, between the token
    generate chose and the one the loop chose (one plain forward over prompt + common prefix):
    a near-tie that bf16 rounding may break either way has a gap of a few hundredths."""
    worst = 0.0
    for i in range(got.shape[0]):
        diff = (got[i] != ref[i]).nonzero()
        if not len(diff):
            continue
        t, p = int(diff[0]), i // repeat
        prefix = torch.cat([ids[p][attn[p].bool()], ref[i, :t]])[None]
        with torch.no_grad():
            logits_V = model(input_ids=prefix).logits[0, -1].float()
        worst = max(worst, float(logits_V[ref[i, t]] - logits_V[got[i, t]]))
    return worst


def decode_vs_generate(models: dict, new: int) -> dict:
    out = []
    ok = True
    for name, model in models.items():
        ids, attn = _prompts(model.config.vocab_size, model.device)
        got, ref = _greedy_pair(model, ids, attn, 2, new)
        same_rows = float((got == ref).all(1).float().mean())
        gap = _tie_gap(model, ids, attn, 2, got, ref)
        # the two paths round differently (kernels over a preallocated vs a growing cache), so a
        # near-tie may flip and the rows then diverge: every first difference must be such a tie
        # (bf16 keeps 8 bits of mantissa; fp32 differences are last-bit ones)
        ok &= gap < (1e-3 if name == "fp32" else 0.125)
        out.append(f"{name}: rows identical {same_rows:.2f}, largest logit gap at a first difference {gap:.3f}")
    return {"check": "decode loop vs generate (greedy)", "ok": ok, "detail": "; ".join(out)}


def _ragged_rows(model, new: int, seed: int):
    """Groups of 4 sampled completions per prompt, cut to random lengths -> completion_logprobs'
    (prompt_ids, prompt_lens, completion_ids, completion_lens) and the valid-token mask [N, C]."""
    ids, attn = _prompts(model.config.vocab_size, model.device)
    comp = decode(model, ids, attn, repeat=4, max_new_tokens=new, min_new_tokens=new, eos_ids=[], pad_id=0,
                  temperature=1.0).completion_ids_NC
    N, C = comp.shape
    p_ids, p_lens = ids.repeat_interleave(4, 0), attn.sum(1).repeat_interleave(4, 0)
    c_lens = torch.randint(1, C + 1, (N,), generator=torch.Generator().manual_seed(seed)).to(model.device)
    return (p_ids, p_lens, comp, c_lens), mask_from_lengths(c_lens, C)


def _logp_gap(name: str, got, want, mask) -> tuple[bool, str]:
    """Whether two [N, C] log-prob tensors agree at the valid tokens, within fp32's or bf16's
    tolerance (by `name`), and the line that says by how much."""
    diff = (got - want).abs()[mask]
    tol = (1e-4, 1e-5) if name == "fp32" else (0.25, 0.03)  # (max, mean) |log-prob difference|
    ok = float(diff.max()) < tol[0] and float(diff.mean()) < tol[1]
    return ok, f"max {float(diff.max()):.2e}, mean {float(diff.mean()):.2e}"


def shared_prompt_logp(models: dict, new: int) -> dict:
    out, ok = [], True
    for name, model in models.items():
        rows, mask = _ragged_rows(model, new, seed=1)
        with torch.no_grad():
            shared = completion_logprobs(model, *rows, share_prompts=True)
            plain = completion_logprobs(model, *rows, share_prompts=False)
        good, line = _logp_gap(name, shared, plain, mask)
        ok &= good
        out.append(f"{name}: {line}")
    return {"check": "shared-prompt log-probs vs plain forward", "ok": ok, "detail": "; ".join(out)}


def packed_logp(models: dict, new: int) -> dict:
    """Rows packed into one sequence (position ids restarting, no mask: what flash-attention's
    varlen kernel gets) vs the padded path; with flash-attn installed the bf16 model's packed pass
    runs on flash_attention_2 itself, else on sdpa's block-diagonal mask."""
    import importlib.util

    flash = importlib.util.find_spec("flash_attn") is not None
    out, ok = [], True
    for name, model in models.items():
        rows, mask = _ragged_rows(model, new, seed=2)
        kernel = "flash_attention_2" if flash and name == "bf16" else "sdpa"
        with torch.no_grad():
            plain = completion_logprobs(model, *rows, share_prompts=False, packed=False)
            model.set_attn_implementation(kernel)
            try:
                packed = completion_logprobs(model, *rows, packed=True)
            finally:
                model.set_attn_implementation("sdpa")
        good, line = _logp_gap(name, packed, plain, mask)
        ok &= good
        out.append(f"{name} ({kernel}): {line}")
    return {"check": "packed (varlen) log-probs vs padded", "ok": ok, "detail": "; ".join(out)}


def sampling_logp(models: dict, new: int) -> dict:
    out, ok = [], True
    for name, model in models.items():
        ids, attn = _prompts(model.config.vocab_size, model.device)
        torch.manual_seed(0)
        d = decode(model, ids, attn, repeat=4, max_new_tokens=new, min_new_tokens=0, eos_ids=[2], pad_id=0,
                   temperature=0.7, record_logprobs=True)
        lens = lengths_from_eos(d.completion_ids_NC, [2])
        with torch.no_grad():
            logp = completion_logprobs(model, ids.repeat_interleave(4, 0), attn.sum(1).repeat_interleave(4, 0),
                                       d.completion_ids_NC, lens, temperature=0.7)
        m = mask_from_lengths(lens, logp.shape[1])
        diff = (d.logprobs_NC.float() - logp).abs()[m]
        tol = 1e-4 if name == "fp32" else 0.05  # mean |sampling - training log-prob|
        ok &= float(diff.mean()) < tol
        out.append(f"{name}: mean {float(diff.mean()):.2e}, max {float(diff.max()):.2e}")
    return {"check": "sampling log-probs vs trainer (T=0.7)", "ok": ok, "detail": "; ".join(out)}


def reference_loss(logp_BC, old_BC, ref_BC, adv_B, mask_BC, p: dict, beta: float) -> float:
    """A preset's loss from the formulas of simple_grpo/algo/losses.py, in Python floats (float64),
    one sequence and token at a time: k3 KL; clip, cispo or sapo; token or sequence ratio; the
    step-wide normalisers the check passes (num_tokens = valid tokens, num_seqs = B)."""
    lo, hi = 1 - p["eps_low"], 1 + p["eps_high"]
    seq_means, total, n_all = [], 0.0, 0
    for lp, od, rf, m, a in zip(logp_BC.tolist(), old_BC.tolist(), ref_BC.tolist(), mask_BC.tolist(),
                                adv_B.tolist()):
        toks = [t for t, valid in enumerate(m) if valid]
        seq_ratio = math.exp(sum(lp[t] - od[t] for t in toks) / len(toks))
        terms = []
        for t in toks:
            r = seq_ratio if p["ratio_level"] == "sequence" else math.exp(lp[t] - od[t])
            clipped = min(max(r, lo), hi)
            if p["pg_loss"] == "cispo":
                pg = -clipped * a * lp[t]
            elif p["pg_loss"] == "sapo":
                tau = p["tau_pos"] if a > 0 else p["tau_neg"]
                pg = -(4 / tau) * a / (1 + math.exp(-tau * (r - 1)))
            else:
                pg = -min(r * a, clipped * a)
                if p["clip_ratio_c"] is not None and a < 0:
                    pg = min(pg, -p["clip_ratio_c"] * a)
            d = rf[t] - lp[t]
            terms.append(pg + beta * (math.exp(d) - d - 1))
        seq_means.append(sum(terms) / len(terms))
        total, n_all = total + sum(terms), n_all + len(terms)
    return sum(seq_means) / len(seq_means) if p["agg"] == "seq-mean-token-mean" else total / n_all


def losses(device) -> dict:
    g = torch.Generator().manual_seed(0)
    B, C = 16, 24
    lens = torch.randint(1, C + 1, (B,), generator=g)
    mask = mask_from_lengths(lens, C)
    logp, old, ref = (-torch.rand(B, C, generator=g, dtype=torch.float64) * 4 for _ in range(3))
    adv = torch.randn(B, generator=g, dtype=torch.float64)
    worst = 0.0
    for name, p in PRESETS.items():
        kw = dict(eps_low=p["eps_low"], eps_high=p["eps_high"], beta=0.04, kl=p["kl"], agg=p["agg"],
                  max_tokens=C, ratio_level=p["ratio_level"], num_tokens=float(mask.sum()), num_seqs=B,
                  pg_loss=p["pg_loss"], tau_pos=p["tau_pos"], tau_neg=p["tau_neg"],
                  clip_ratio_c=p["clip_ratio_c"])
        assert p["kl"] == "k3", f"{name}: the reference has the k3 estimator only"
        want = reference_loss(logp, old, ref, adv, mask, p, beta=0.04)
        on = [t.float().to(device) for t in (logp, old, ref, adv)]
        got, _ = policy_loss(on[0], on[1], on[2], on[3], mask.to(device), **kw)
        worst = max(worst, abs(float(got) - want) / max(abs(want), 1e-6))
    return {"check": "losses on device vs float64 CPU", "ok": worst < 1e-5,
            "detail": f"{len(PRESETS)} presets vs their formulas in float64, worst relative difference {worst:.1e}"}


def model_pair(model_fp32, device) -> dict:
    """{"fp32": `model_fp32`, "bf16": the same weights in bf16}, on `device`, in eval mode."""
    model_bf16 = type(model_fp32)._from_config(model_fp32.config, dtype=torch.bfloat16).to(device).eval()
    model_bf16.load_state_dict(model_fp32.state_dict())
    return {"fp32": model_fp32.eval(), "bf16": model_bf16}


def run_all(model_fp32, device, new: int) -> list[dict]:
    """Every check; `model_fp32` (random weights, on `device`) is also cast to bf16."""
    models = model_pair(model_fp32, device)
    rows = []
    for fn, args in ((decode_vs_generate, (models, new)), (shared_prompt_logp, (models, new)),
                     (packed_logp, (models, new)), (sampling_logp, (models, new)), (losses, (device,))):
        try:
            rows.append(fn(*args))
        except Exception as e:  # noqa: BLE001 - a broken check is a failed row, the others still run
            rows.append({"check": fn.__name__, "ok": False, "detail": f"{type(e).__name__}: {str(e)[:300]}"})
    return rows
