"""--gradient_checkpointing: the same log-probs and gradients as without it (shared-prompt path
included: its KV cache survives the recomputation), the layers really are recomputed, passes
without gradients keep their cache, and the trainer takes a step with it."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from simple_grpo.gen.decode import decode
from simple_grpo.algo.logprobs import completion_logprobs
from simple_grpo.models import build_tiny_model
from simple_grpo.train import grad_ckpt
from simple_grpo.gen.reward_registry import register
from test_head_logprobs import grouped_batch  # noqa: E402  (tests/ is on sys.path)

ROOT = Path(__file__).resolve().parents[1]


def attention_calls(model) -> list[int]:
    """Counts the calls of layer 0's attention (a recomputed layer calls it again in backward)."""
    calls: list[int] = []
    model.model.layers[0].self_attn.register_forward_pre_hook(lambda m, a, k: calls.append(1),
                                                             with_kwargs=True)
    return calls


@pytest.mark.parametrize("share", [True, False])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_same_gradients_with_and_without_checkpointing(share, temperature):
    batch = grouped_batch(seed=3)
    w_BC = torch.randn(batch[2].shape, generator=torch.Generator().manual_seed(4))
    results = []
    for ckpt in (False, True):
        model = build_tiny_model(seed=7)
        if ckpt:
            assert grad_ckpt.enable(model) == 2 and grad_ckpt.is_enabled(model)
        calls = attention_calls(model)
        logp_BC = completion_logprobs(model, *batch, temperature=temperature, share_prompts=share,
                                      max_logits_bytes=1 << 12)
        forward_calls = len(calls)
        (logp_BC * w_BC).sum().backward()
        results.append((logp_BC.detach(), {n: q.grad for n, q in model.named_parameters()},
                        forward_calls, len(calls)))
    (plain, plain_g, plain_fwd, plain_all), (ckpt, ckpt_g, ckpt_fwd, ckpt_all) = results
    assert plain_fwd == ckpt_fwd == (2 if share else 1)  # shared: the prompt pass, then completions
    assert plain_all == plain_fwd and ckpt_all == 2 * ckpt_fwd, "backward recomputes each pass"
    assert torch.allclose(plain, ckpt, atol=1e-5)
    assert plain_g.keys() == ckpt_g.keys()
    for name, g in plain_g.items():
        assert ckpt_g[name] is not None and torch.allclose(ckpt_g[name], g, atol=1e-5), name


def test_passes_without_gradients_keep_their_cache():
    model = build_tiny_model(seed=8)
    ids = torch.tensor([[2, 5, 6, 7], [9, 10, 11, 12]])
    kw = dict(repeat=2, max_new_tokens=6, min_new_tokens=6, eos_ids=[2], pad_id=2, greedy=True)
    want = decode(model, ids, torch.ones_like(ids), **kw).completion_ids_NC
    grad_ckpt.enable(model)
    calls = attention_calls(model)
    got = decode(model, ids, torch.ones_like(ids), **kw).completion_ids_NC
    assert torch.equal(got, want)
    assert len(calls) == 6, "one prefill + 5 one-token steps: the KV cache was used"
    with torch.no_grad():
        assert torch.allclose(completion_logprobs(model, *grouped_batch(seed=3)),
                              completion_logprobs(build_tiny_model(seed=8), *grouped_batch(seed=3)), atol=1e-5)


def test_enable_is_idempotent_and_refuses_models_without_decoder_layers():
    model = build_tiny_model(seed=0)
    grad_ckpt.enable(model)
    forward = model.model.layers[0].forward
    grad_ckpt.enable(model)
    assert model.model.layers[0].forward is forward
    with pytest.raises(ValueError):
        grad_ckpt.enable(torch.nn.Linear(2, 2))


@register("test_ckpt_distinct_chars")
def distinct_chars(completion: str, example: dict) -> float:
    """Varies across random completions, so advantages are non-zero even for a random model."""
    return len(set(completion)) / 10.0


def test_trainer_step_with_gradient_checkpointing(tiny_model_dir, tmp_path, monkeypatch):
    sys.path.insert(0, str(ROOT))
    import grpo_ref_split

    wrapped = []
    enable = grad_ckpt.enable
    monkeypatch.setattr(grad_ckpt, "enable", lambda model: wrapped.append(enable(model)))
    args = dict(model=tiny_model_dir, run_dir=tmp_path, preset="dr_grpo", steps=1, prompts_per_step=2,
                num_generations=4, micro_batch_size=4, max_new_tokens=8, eval_every=0, lr=1e-3,
                warmup_steps=1, save_every=0, plot_every=0, samples_every=1, rewards="test_ckpt_distinct_chars",
                gradient_checkpointing="true")
    grpo_ref_split.main([f"--{k}={v}" for k, v in args.items()])
    assert wrapped == [2], "the trainer enabled checkpointing on its model's 2 decoder layers"
    before = load_file(str(Path(tiny_model_dir) / "model.safetensors"))
    after = load_file(str(tmp_path / "final" / "model.safetensors"))
    unchanged = [k for k in before if torch.equal(before[k], after[k])]
    assert not unchanged, f"parameters not updated: {unchanged}"
