"""Token log-probs from final hidden states through the LM head, a bounded number of logits at a time.

    logp_N = head_logprobs(hidden_NH, head.weight, head.bias, ids_N, temperature, tokens_per_chunk)
           = log_softmax((hidden_NH @ weight_VH.T + bias_V).float() / temperature)[n, ids_N[n]]

The N tokens (the flattened [B*C] completion positions of a batch, padding left out) are processed
`tokens_per_chunk` at a time, so at most one chunk of fp32 logits [tokens_per_chunk, V] exists at
once, whatever B, C and the vocabulary size V are. With gradients this is a torch.autograd.Function
that saves only its inputs and one log-sum-exp per token: backward recomputes each chunk's logits
and turns them into the gradient in place (softmax, then `(onehot - softmax) * grad / temperature`),
so training keeps the hidden states [N, H] alive between forward and backward, never [N, V] logits
(when all N tokens fit in one chunk, that chunk's softmax is kept instead: within the budget, and
backward skips the LM-head recomputation, as fast as plain autograd).
The numbers are those of autograd through `linear -> .float() -> / T -> gather - logsumexp`: the
logits are computed in the weight's dtype and upcast, and the gradient is cast back to it before
the two matmuls (the weight gradient is accumulated over chunks in the weight's dtype).

`plan_chunks` sizes the chunks from the `max_logits_bytes` budget ("fp32 logits alive at once").
"""
from __future__ import annotations

import torch


def plan_chunks(rows: int, seq_len: int, hidden: int, vocab: int, max_logits_bytes: int,
                grad: bool) -> tuple[int, int]:
    """-> (rows per forward pass, tokens per logits chunk) for scoring `rows` sequences of `seq_len`.

    Tokens per chunk: as many as fit `max_logits_bytes` of fp32 logits (at least one). Rows: all of
    them with gradients (the trainer's micro-batch runs once; its graph is kept anyway); without
    gradients (the reference server, old log-probs) as many as keep one pass's fp32 hidden states
    [rows, seq_len, hidden] within the same budget. The vocabulary size never limits the rows."""
    tokens = max(1, int(max_logits_bytes) // (4 * vocab))
    if grad:
        return max(1, rows), tokens
    return max(1, min(rows, int(max_logits_bytes) // (4 * max(1, seq_len) * hidden))), tokens


def _chunk_logits(hidden_nH, weight_VH, bias_V, temperature: float) -> torch.Tensor:
    """fp32 logits [n, V] divided by the temperature (a fresh tensor, safe to modify in place)."""
    logits_nV = torch.nn.functional.linear(hidden_nH, weight_VH, bias_V)
    logits_nV = logits_nV.float() if logits_nV.dtype != torch.float32 else logits_nV
    return logits_nV.div_(temperature) if temperature != 1.0 else logits_nV


def _forward_chunks(hidden_NH, weight_VH, bias_V, ids_N, temperature: float, chunk: int,
                    keep: bool = False):
    """-> (logp_N, logsumexp_N, softmax [N, V] if `keep` and all N tokens fit in one chunk else
    None), float32, computing one chunk of logits at a time."""
    N = hidden_NH.shape[0]
    logp_N = torch.empty(N, dtype=torch.float32, device=hidden_NH.device)
    lse_N = torch.empty_like(logp_N)
    for s in range(0, N, chunk):
        logits_nV = _chunk_logits(hidden_NH[s:s + chunk], weight_VH, bias_V, temperature)
        picked_n = logits_nV.gather(1, ids_N[s:s + chunk, None]).squeeze(1)
        max_n = logits_nV.amax(1)
        max_n = torch.where(torch.isfinite(max_n), max_n, 0.0)
        exp_nV = logits_nV.sub_(max_n[:, None]).exp_()  # in place: one [n, V] buffer
        sum_n = exp_nV.sum(1)
        lse_n = sum_n.log().add_(max_n)
        logp_N[s:s + chunk] = picked_n - lse_n
        lse_N[s:s + chunk] = lse_n
    return logp_N, lse_N, exp_nV.div_(sum_n[:, None]) if keep and N <= chunk else None


class _HeadLogprobs(torch.autograd.Function):
    """Differentiable `head_logprobs`: saves hidden states and per-token log-sum-exp, not logits."""

    @staticmethod
    def forward(ctx, hidden_NH, weight_VH, bias_V, ids_N, temperature, chunk):
        logp_N, lse_N, softmax_NV = _forward_chunks(hidden_NH, weight_VH, bias_V, ids_N, temperature,
                                                    chunk, keep=True)
        ctx.save_for_backward(hidden_NH, weight_VH, bias_V, ids_N, lse_N)
        # one chunk holds every token: keep its softmax (within the budget) instead of recomputing
        ctx.softmax_NV, ctx.temperature, ctx.chunk = softmax_NV, temperature, chunk
        return logp_N

    @staticmethod
    def backward(ctx, grad_N):
        hidden_NH, weight_VH, bias_V, ids_N, lse_N = ctx.saved_tensors
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        grad_h = torch.empty_like(hidden_NH) if need_h else None
        grad_w = torch.zeros_like(weight_VH) if need_w else None
        grad_b = torch.zeros(weight_VH.shape[0], dtype=torch.float32, device=weight_VH.device) \
            if need_b else None
        T, chunk = ctx.temperature, ctx.chunk
        for s in range(0, hidden_NH.shape[0], chunk):
            h_nH = hidden_NH[s:s + chunk]
            g_n = grad_N[s:s + chunk].float() / T
            # d logp / d raw logits = (onehot(id) - softmax(logits / T)) / T, built in place
            d_nV, ctx.softmax_NV = ctx.softmax_NV, None  # used once: a second backward recomputes
            if d_nV is None:
                d_nV = _chunk_logits(h_nH, weight_VH, bias_V, T).sub_(lse_N[s:s + chunk, None]).exp_()
            d_nV.mul_(-g_n[:, None]).scatter_add_(1, ids_N[s:s + chunk, None], g_n[:, None])
            d_nV = d_nV.to(weight_VH.dtype)
            if need_h:
                grad_h[s:s + chunk] = d_nV @ weight_VH
            if need_w:
                grad_w.addmm_(d_nV.t(), h_nH)
            if need_b:
                grad_b += d_nV.sum(0, dtype=torch.float32)
        if need_b:
            grad_b = grad_b.to(bias_V.dtype)
        return grad_h, grad_w, grad_b, None, None, None


def head_logprobs(hidden_NH: torch.Tensor, weight_VH: torch.Tensor, bias_V: torch.Tensor | None,
                  ids_N: torch.Tensor, temperature: float = 1.0,
                  tokens_per_chunk: int = 1 << 30) -> torch.Tensor:
    """log_softmax(linear(hidden, weight, bias).float() / temperature)[ids] -> [N] float32, with at
    most `tokens_per_chunk` tokens' fp32 logits alive at once (also in backward)."""
    assert hidden_NH.dim() == 2 and ids_N.shape == hidden_NH.shape[:1], "hidden [N, H], ids [N]"
    chunk = max(1, int(tokens_per_chunk))
    if hidden_NH.shape[0] == 0:  # no tokens: [0], still attached to the graph of the hidden states
        return hidden_NH.float().sum(1)
    tensors = [t for t in (hidden_NH, weight_VH, bias_V) if t is not None]
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return _HeadLogprobs.apply(hidden_NH, weight_VH, bias_V, ids_N, float(temperature), chunk)
    return _forward_chunks(hidden_NH, weight_VH, bias_V, ids_N, float(temperature), chunk)[0]
