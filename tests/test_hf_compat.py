"""simple_grpo/hf_compat.py on the installed transformers: the KV cache goes in and comes out under
the name this version uses, it is really used (not dropped into **kwargs), and the shared-prompt
log-probs, the decode loop and `generate` with a prefilled cache raise no FutureWarning /
DeprecationWarning and log no deprecation message."""
import dataclasses
import inspect
import logging
import warnings

import pytest
import torch
import transformers
from packaging.version import Version
from transformers.modeling_outputs import CausalLMOutputWithPast

from simple_grpo.gen.decode import decode, prefill
from simple_grpo.algo.logprobs import completion_logprobs
from simple_grpo.hf_compat import CACHE_KWARG, cache_kwargs, output_cache
from simple_grpo.gen.rollout import SampleSettings, sample


@pytest.fixture(scope="module")
def tok(tiny_model_dir):
    from simple_grpo.models import load_tokenizer

    return load_tokenizer(str(tiny_model_dir))


@pytest.fixture
def deprecation_logs(monkeypatch):
    """transformers logs (rather than warns) when `out.past_key_values` is read on 5.24: record every
    logger.warning / warning_once message that says "deprecated"."""
    seen: list[str] = []
    for name in ("warning", "warning_once"):
        original = getattr(logging.Logger, name, None)

        def record(self, msg, *args, _original=original, **kw):
            if "deprecat" in str(msg).lower():
                seen.append(str(msg))
            if _original is not None:
                return _original(self, msg, *args, **kw)

        monkeypatch.setattr(logging.Logger, name, record, raising=False)
    return seen


def test_cache_name_matches_the_installed_transformers(tiny_model):
    assert CACHE_KWARG == ("cache" if Version(transformers.__version__) >= Version("5.24") else "past_key_values")
    assert CACHE_KWARG in inspect.signature(type(tiny_model).forward).parameters
    assert CACHE_KWARG in {f.name for f in dataclasses.fields(CausalLMOutputWithPast)}


def test_the_cache_is_used_not_ignored(tiny_model):
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.inference_mode():
        out = tiny_model(input_ids=ids[:, :3], use_cache=True)
        cache = output_cache(out)
        assert cache.get_seq_length() == 3
        step = tiny_model(input_ids=ids[:, 3:], use_cache=True, **cache_kwargs(cache)).logits[0, -1]
        full = tiny_model(input_ids=ids).logits[0, -1]
    assert cache.get_seq_length() == 4, "the forward appended to the cache we passed"
    assert torch.allclose(step, full, atol=1e-5)


def test_no_deprecation_warnings(tiny_model, tok, deprecation_logs):
    ids = tok(["hello there", "a"], return_tensors="pt", padding=True, padding_side="left",
              add_special_tokens=False)
    ids_nP, attn_nP = ids.input_ids, ids.attention_mask
    pad, G = tok.pad_token_id, 3
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with torch.inference_mode():
            # shared-prompt completion log-probs: rows 0-2 and 3-5 share a prompt
            p_BP, p_lens_B = ids_nP.repeat_interleave(G, 0), attn_nP.sum(1).repeat_interleave(G, 0)
            c_BC = torch.randint(3, 200, (2 * G, 4), generator=torch.Generator().manual_seed(0))
            logp = completion_logprobs(tiny_model, p_BP, p_lens_B, c_BC, torch.full((2 * G,), 4))
            assert logp.shape == (2 * G, 4) and torch.isfinite(logp).all()
            # the decode loop
            d = decode(tiny_model, ids_nP, attn_nP, repeat=G, max_new_tokens=5, min_new_tokens=5,
                       eos_ids=[tok.eos_token_id], pad_id=pad, record_logprobs=True)
            assert d.completion_ids_NC.shape == (2 * G, 5)
            # generate with a prefilled cache (every prompt token but the last), as rollout does
            cache, _ = prefill(tiny_model, ids_nP[:, :-1], attn_nP[:, :-1], G, in_place=False)
            out = tiny_model.generate(input_ids=ids_nP.repeat_interleave(G, 0),
                                      attention_mask=attn_nP.repeat_interleave(G, 0), do_sample=False,
                                      max_new_tokens=4, min_new_tokens=4, pad_token_id=pad,
                                      use_cache=True, **cache_kwargs(cache))
            assert out.shape == (2 * G, ids_nP.shape[1] + 4)
            assert cache.get_seq_length() > ids_nP.shape[1] - 1, "generate extended the prefilled cache"
        # and through rollout.sample with HF generate and the shared prefill
        s = SampleSettings(num_generations=G, max_new_tokens=4, sampler="generate")
        got = sample(tiny_model, tok, ["hello there", "a"], s, [tok.eos_token_id], record_logprobs=True)
        assert got[2].shape[0] == 2 * G
    assert deprecation_logs == []
