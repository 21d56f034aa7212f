"""Log-probs through the LM head in token chunks: the same values and gradients as full logits,
peak memory bounded by `max_logits_bytes` instead of growing with the [B, C, V] logits, and row
chunks (reference server) that no longer depend on the vocabulary size."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from simple_grpo.algo.head_logprobs import head_logprobs, plan_chunks
from simple_grpo.algo.logprobs import completion_logprobs, sequence_inputs, token_logprobs
from simple_grpo.algo.masks import mask_from_lengths
from simple_grpo.models import build_tiny_model

ROOT = Path(__file__).resolve().parents[1]


def full_logits_logprobs(model, p_ids, p_lens, c_ids, c_lens, temperature=1.0):
    """The previous implementation: every completion position's logits [B, C, V] at once."""
    C = c_ids.shape[1]
    ids, attn, pos = sequence_inputs(p_ids, p_lens, c_ids, c_lens)
    logits_BCV = model(input_ids=ids, attention_mask=attn, position_ids=pos, logits_to_keep=C + 1,
                       use_cache=False).logits[:, :-1]
    logp_BC = token_logprobs(logits_BCV, c_ids, temperature)
    return torch.where(mask_from_lengths(c_lens, C), logp_BC, 0.0)


def grouped_batch(seed=1):
    """Two prompts x three completions (ragged prompts and completions, one empty completion)."""
    g = torch.Generator().manual_seed(seed)
    P, C = 6, 5
    p_ids = torch.full((6, P), 2)
    p_ids[:3, 2:] = torch.randint(3, 300, (4,), generator=g)
    p_ids[3:, :] = torch.randint(3, 300, (6,), generator=g)
    c_ids = torch.randint(3, 300, (6, C), generator=g)
    return p_ids, torch.tensor([4, 4, 4, 6, 6, 6]), c_ids, torch.tensor([5, 3, 1, 0, 5, 2])


def values_and_grads(model, fn, batch, weights_BC, **kw):
    model.zero_grad(set_to_none=True)
    logp_BC = fn(model, *batch, **kw)
    (logp_BC * weights_BC).sum().backward()
    return logp_BC.detach(), {n: q.grad.clone() for n, q in model.named_parameters()}


@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("share", [True, False])
@pytest.mark.parametrize("max_logits_bytes", [1, 1 << 30])  # one token per chunk / all at once
def test_values_and_gradients_equal_full_logits(temperature, share, max_logits_bytes):
    model = build_tiny_model(seed=6)
    batch = grouped_batch()
    w_BC = torch.randn(batch[2].shape, generator=torch.Generator().manual_seed(2))
    want, want_g = values_and_grads(model, full_logits_logprobs, batch, w_BC, temperature=temperature)
    got, got_g = values_and_grads(model, completion_logprobs, batch, w_BC, temperature=temperature,
                                  share_prompts=share, max_logits_bytes=max_logits_bytes)
    assert torch.allclose(got, want, atol=1e-5)
    assert (got[~mask_from_lengths(batch[3], batch[2].shape[1])] == 0).all()
    for name, g in want_g.items():
        assert torch.allclose(got_g[name], g, atol=1e-5), name


@pytest.mark.parametrize("chunk", [3, 100])  # recomputed per chunk in backward / one kept softmax
def test_head_logprobs_with_bias_matches_autograd(chunk):
    g = torch.Generator().manual_seed(0)
    h = torch.randn(11, 8, generator=g, requires_grad=True)
    w = torch.randn(50, 8, generator=g, requires_grad=True)
    b = torch.randn(50, generator=g, requires_grad=True)
    ids = torch.randint(0, 50, (11,), generator=g)
    up = torch.randn(11, generator=g)
    want = torch.log_softmax((h @ w.T + b) / 0.5, -1).gather(1, ids[:, None]).squeeze(1)
    want_g = torch.autograd.grad((want * up).sum(), (h, w, b))
    got = head_logprobs(h, w, b, ids, temperature=0.5, tokens_per_chunk=chunk)
    for _ in range(2):  # a retained graph's second backward gives the same gradients
        got_g = torch.autograd.grad((got * up).sum(), (h, w, b), retain_graph=True)
        assert torch.allclose(got, want, atol=1e-5)
        for a, e in zip(got_g, want_g):
            assert torch.allclose(a, e, atol=1e-5)
    with torch.inference_mode():
        assert torch.allclose(head_logprobs(h, w, b, ids, 0.5, 4), want, atol=1e-5)
    empty = head_logprobs(h[:0], w, b, ids[:0])  # no tokens: a [0] result that backward accepts
    assert empty.shape == (0,)
    empty.sum().backward()


def test_plan_chunks_rows_do_not_depend_on_the_vocabulary():
    # a Qwen2.5-1.5B-sized request to the reference server: 64 rows of 1100 tokens, 152k vocabulary
    rows, tokens = plan_chunks(64, 1100, 1536, 151936, 1 << 30, grad=False)
    assert rows == 64, "the old planner gave 1 row per chunk here (1 GB / (1025 x 152k x 4 B))"
    assert tokens == (1 << 30) // (4 * 151936)
    assert plan_chunks(64, 1100, 1536, 32000, 1 << 30, grad=False)[0] == rows
    assert plan_chunks(8, 1100, 1536, 151936, 1 << 30, grad=True) == (8, tokens)  # a micro-batch
    assert plan_chunks(64, 1100, 1536, 151936, 1, grad=False) == (1, 1)  # never 0


def test_server_scores_many_rows_in_one_pass_with_a_large_vocabulary():
    model = build_tiny_model(vocab_size=65536, hidden=16, layers=1, seed=0).eval()
    passes = []
    model.model.register_forward_hook(lambda m, args, out: passes.append(out.last_hidden_state.shape[0]))
    g = torch.Generator().manual_seed(0)
    p_ids, c_ids = torch.randint(3, 65536, (16, 5), generator=g), torch.randint(3, 65536, (16, 7), generator=g)
    lens_p, lens_c = torch.full((16,), 5), torch.full((16,), 7)
    with torch.inference_mode():  # 1 MB: 4 tokens of logits; the old row planner ran 16 passes of 1 row
        got = completion_logprobs(model, p_ids, lens_p, c_ids, lens_c, max_logits_bytes=1 << 20,
                                  share_prompts=False)
        want = full_logits_logprobs(model, p_ids, lens_p, c_ids, lens_c)
    assert passes[0] == 16 and len(passes) == 2  # ours: one pass of 16 rows; then the reference
    assert torch.allclose(got, want, atol=1e-5)


_PEAK_SCRIPT = textwrap.dedent("""
    import json, sys
    import torch
    torch.set_num_threads(1)
    sys.path.insert(0, sys.argv[2])
    from simple_grpo.algo.logprobs import completion_logprobs
    from simple_grpo.models import build_tiny_model
    from tests.test_head_logprobs import full_logits_logprobs
    model = build_tiny_model(vocab_size=65536, hidden=32, layers=1, seed=0)
    B, P, C = 8, 8, 120
    g = torch.Generator().manual_seed(0)
    p_ids, c_ids = torch.randint(3, 65536, (B, P), generator=g), torch.randint(3, 65536, (B, C), generator=g)
    lens_p, lens_c = torch.full((B,), P), torch.full((B,), C)
    fn = full_logits_logprobs if sys.argv[1] == "full" else completion_logprobs
    kw = {} if sys.argv[1] == "full" else {"max_logits_bytes": 4 << 20}
    fn(model, p_ids[:1, :2], lens_p[:1] * 0 + 2, c_ids[:1, :2], lens_c[:1] * 0 + 2, **kw).sum().backward()
    model.zero_grad(set_to_none=False)  # gradient buffers exist before the baseline
    def status_kb(key):
        return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith(key))
    try:  # reset the high-water mark (VmHWM) to the current RSS; else it is an upper bound
        open("/proc/self/clear_refs", "w").write("5")
    except OSError:
        pass
    before = status_kb("VmRSS")
    fn(model, p_ids, lens_p, c_ids, lens_c, **kw).sum().backward()
    print(json.dumps({"peak_growth_bytes": (status_kb("VmHWM") - before) * 1024, "logits_bytes": B * C * 65536 * 4}))
""")


def peak_growth(mode: str) -> dict:
    """Peak RSS growth of one forward + backward (B=8, C=120, V=65536) in a fresh process (torch's
    CPU allocations are invisible to tracemalloc): the high-water mark VmHWM, reset just before."""
    out = subprocess.run([sys.executable, "-c", _PEAK_SCRIPT, mode, str(ROOT)], capture_output=True,
                         text=True, timeout=300, cwd=ROOT,
                         env=dict(os.environ, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu"))
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_peak_memory_is_bounded_by_max_logits_bytes_not_by_the_logits():
    chunked, full = peak_growth("chunked"), peak_growth("full")
    logits = full["logits_bytes"]  # 8 x 120 x 65536 x 4 B = 252 MB of fp32 logits
    print(f"peak RSS growth: chunked (4 MB of logits) {chunked['peak_growth_bytes'] / 2**20:.0f} MiB, "
          f"full logits {full['peak_growth_bytes'] / 2**20:.0f} MiB; logits {logits / 2**20:.0f} MiB")
    assert chunked["peak_growth_bytes"] < logits / 4
    assert full["peak_growth_bytes"] > logits  # the measurement sees the old path's logits
