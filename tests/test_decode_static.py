"""`--sampler=static` (simple_grpo/gen/decode_static.py) against the decode loop and HF `generate`:
a preallocated fixed-width KV cache and a fixed-shape step must not change what is sampled. Greedy
tokens equal generate's; sampled tokens and both recorded log-probs equal the loop's under the same
seed (the same sampling code draws the same uniforms); the whole-softmax ones equal the trainer's
recomputation; rows are padded after their first EOS; `auto` is the loop on a CPU."""
import pytest
import torch

from simple_grpo.algo.logprobs import completion_logprobs
from simple_grpo.algo.masks import lengths_from_eos, mask_from_lengths
from simple_grpo.errors import UserError
from simple_grpo.gen import rollout
from simple_grpo.gen.decode import decode
from simple_grpo.gen.decode_static import decode_static
from simple_grpo.gen.rollout import SampleSettings, eos_token_ids, sample


@pytest.fixture(scope="module")
def eos_model():
    from test_eos_rollout import eos_prone_model

    return eos_prone_model(0.25)


def _enc(tok, texts):
    enc = tok(texts, return_tensors="pt", padding=True, padding_side="left", add_special_tokens=False)
    return enc.input_ids, enc.attention_mask


@pytest.mark.parametrize("repeat, max_new, min_new", [(1, 12, 0), (3, 9, 4), (2, 1, 0)])
def test_greedy_equals_loop_and_generate(tiny_model, repeat, max_new, min_new):
    from simple_grpo.models import build_tiny_tokenizer
    from test_decode import hf_greedy

    tok = build_tiny_tokenizer()
    ids, attn = _enc(tok, ["hello there", "a", "xyz"])
    pad = tok.pad_token_id
    free = hf_greedy(tiny_model, ids, attn, repeat, max_new, min_new, [10**6], pad)
    eos = [int(free[0, min(2, max_new - 1)])]  # row 0 ends at step 2: rows stop and pad there
    want = hf_greedy(tiny_model, ids, attn, repeat, max_new, min_new, eos, pad)
    kw = dict(repeat=repeat, max_new_tokens=max_new, min_new_tokens=min_new, eos_ids=eos, pad_id=pad, greedy=True)
    loop = decode(tiny_model, ids, attn, **kw).completion_ids_NC
    static = decode_static(tiny_model, ids, attn, **kw).completion_ids_NC
    assert torch.equal(static, loop)
    width = max(static.shape[1], want.shape[1])
    pad_to = lambda t: torch.nn.functional.pad(t, (0, width - t.shape[1]), value=pad)  # noqa: E731
    assert torch.equal(pad_to(static), pad_to(want))


@pytest.mark.parametrize("temperature, top_p, min_new", [(1.0, 1.0, 0), (0.7, 0.8, 3), (1.3, 0.6, 2)])
def test_sampled_tokens_and_logprobs_equal_the_loops(eos_model, temperature, top_p, min_new):
    tok, model = eos_model
    eos = eos_token_ids(tok, model)
    runs = {}
    for sampler in ("loop", "static"):
        s = SampleSettings(num_generations=4, max_new_tokens=10, temperature=temperature, top_p=top_p,
                           min_new_tokens=min_new, sampler=sampler)
        torch.manual_seed(7)
        runs[sampler] = sample(model, tok, ["hello", "a b c", "What is 2+2?"], s, eos, record_logprobs=True)
    p_ids, p_lens, c_ids, c_lens, logp, full = runs["static"]
    assert torch.equal(c_ids, runs["loop"][2]), "same seed, same sampling code: the same tokens"
    assert torch.allclose(logp, runs["loop"][4], atol=1e-5), (logp - runs["loop"][4]).abs().max()
    assert torch.allclose(full, runs["loop"][5], atol=1e-5), (full - runs["loop"][5]).abs().max()
    trainer = completion_logprobs(model, p_ids, p_lens, c_ids, c_lens, temperature=temperature)
    assert torch.allclose(full, trainer, atol=1e-5), (full - trainer).abs().max()
    assert (c_lens >= min(min_new + 1, c_ids.shape[1])).all(), "no EOS before min_new_tokens"
    ended = c_lens < c_ids.shape[1]
    assert ended.any(), "some rows end before the longest: their tails are padding"
    past_NC = ~mask_from_lengths(c_lens, c_ids.shape[1])
    assert (c_ids[past_NC] == tok.pad_token_id).all() and (logp[past_NC] == 0).all()


def test_rows_pad_after_first_eos_and_sync_every_keeps_tokens(eos_model):
    """A pad id other than EOS shows the padding; reading the end of rows every 1 / 5 tokens (the
    GPU's end check) gives the same tokens and log-probs, cut right after the last row's EOS."""
    tok, model = eos_model
    ids, attn = _enc(tok, ["A prompt", "Another, longer prompt here"])
    eos, runs = [tok.eos_token_id], {}
    for k in (1, 5):
        torch.manual_seed(0)
        runs[k] = decode_static(model, ids, attn, repeat=4, max_new_tokens=30, min_new_tokens=0, eos_ids=eos,
                                pad_id=3, record_logprobs=True, sync_every=k)
    c = runs[1].completion_ids_NC
    lens = lengths_from_eos(c, eos)
    assert c.shape[1] < 30 and int(lens.max()) == c.shape[1], "cut at the last row's EOS"
    for row, n in zip(c, lens.tolist()):
        assert int(row[n - 1]) == eos[0] and (row[n:] == 3).all()
    assert torch.equal(runs[5].completion_ids_NC, c)
    assert torch.equal(runs[5].logprobs_NC, runs[1].logprobs_NC)


def test_eager_attention_takes_the_additive_mask(eos_model):
    """With attn_implementation="eager" the step's mask is additive (0 / dtype min): same tokens."""
    from test_eos_rollout import eos_prone_model

    tok, sdpa = eos_model
    _, eager = eos_prone_model(0.25)
    eager.set_attn_implementation("eager")
    ids, attn = _enc(tok, ["hello", "a b c"])
    out = []
    for model in (sdpa, eager):
        torch.manual_seed(1)
        out.append(decode_static(model, ids, attn, repeat=3, max_new_tokens=8, min_new_tokens=0,
                                 eos_ids=[tok.eos_token_id], pad_id=tok.pad_token_id, record_logprobs=True))
    assert torch.equal(out[0].completion_ids_NC, out[1].completion_ids_NC)
    assert torch.allclose(out[0].full_logprobs_NC, out[1].full_logprobs_NC, atol=1e-5)


def test_other_attention_is_refused_in_one_line(eos_model):
    from test_eos_rollout import eos_prone_model

    tok, _ = eos_model
    _, model = eos_prone_model(0.25)
    model.config._attn_implementation = "flash_attention_2"
    ids, attn = _enc(tok, ["hello"])
    with pytest.raises(UserError, match="sdpa or eager"):
        decode_static(model, ids, attn, repeat=1, max_new_tokens=2, min_new_tokens=0, eos_ids=[2], pad_id=2)


def test_auto_is_the_loop_on_a_cpu_and_says_so(eos_model, capsys, monkeypatch):
    tok, model = eos_model
    eos = eos_token_ids(tok, model)
    monkeypatch.setattr(rollout, "_ANNOUNCED", set())
    runs = []
    for sampler in ("loop", "auto", "auto"):
        torch.manual_seed(3)
        runs.append(sample(model, tok, ["hello", "x"], SampleSettings(2, 6, sampler=sampler), eos,
                           record_logprobs=True))
    for a, b in zip(runs[0], runs[1]):
        assert torch.equal(a, b), "auto on a CPU is bit-identical to the loop"
    lines = [x for x in capsys.readouterr().out.splitlines() if x.startswith("--sampler=auto")]
    assert len(lines) == 1 and lines[0].startswith("--sampler=auto: loop (a cpu device"), lines
    assert rollout.resolve_sampler("auto", torch.device("cuda")) == "static"
    assert rollout.resolve_sampler("generate", torch.device("cuda")) == "generate"


@pytest.mark.slow
def test_compiled_step_equals_eager(eos_model):
    """torch.compile of the fixed-shape step (inductor on a CPU: about two minutes of compiling;
    reduce-overhead's CUDA graphs only on a GPU) gives the eager step's tokens and log-probs."""
    tok, model = eos_model
    ids, attn = _enc(tok, ["hello", "a b c"])
    out = []
    for compile in (False, True):
        torch.manual_seed(4)
        out.append(decode_static(model, ids, attn, repeat=3, max_new_tokens=8, min_new_tokens=2, temperature=0.8,
                                 top_p=0.9, eos_ids=[tok.eos_token_id], pad_id=tok.pad_token_id,
                                 record_logprobs=True, compile=compile))
    assert torch.equal(out[0].completion_ids_NC, out[1].completion_ids_NC)
    assert torch.allclose(out[0].logprobs_NC, out[1].logprobs_NC, atol=1e-5)
    assert torch.allclose(out[0].full_logprobs_NC, out[1].full_logprobs_NC, atol=1e-5)


def test_kept_cache_keeps_its_addresses_and_changes_nothing(eos_model, monkeypatch):
    """keep_cache (the compiled default): a CUDA graph replays at the addresses it recorded, so the
    cache's buffers must be the same every call, and what a call samples must not depend on what an
    earlier call left in them (a longer prompt first, then a shorter one: stale slots zeroed). A
    larger call grows the buffers once; the next call of any smaller size reuses them."""
    from simple_grpo.gen import decode_static as ds

    tok, model = eos_model
    monkeypatch.setattr(ds, "_KEPT", {})
    seen = []
    real = ds._kept_buffer

    def spy(i, name, like, shape):
        buf = real(i, name, like, shape)
        seen[-1][(i, name)] = buf  # held, so a buffer made anew could not reuse a freed address
        return buf

    monkeypatch.setattr(ds, "_kept_buffer", spy)
    calls = [(["A much longer prompt than the next one, with words"], 4), (["hi"], 4), (["x y", "zz"], 3)]
    for texts, repeat in calls:
        ids, attn = _enc(tok, texts)
        out = {}
        for keep in (True, False):
            seen.append({})
            torch.manual_seed(5)
            out[keep] = decode_static(model, ids, attn, repeat=repeat, max_new_tokens=9, min_new_tokens=0,
                                      eos_ids=[tok.eos_token_id], pad_id=tok.pad_token_id, record_logprobs=True,
                                      keep_cache=keep)
        seen.pop()  # the keep=False call takes no kept buffer
        assert torch.equal(out[True].completion_ids_NC, out[False].completion_ids_NC), texts
        assert torch.equal(out[True].full_logprobs_NC, out[False].full_logprobs_NC), texts
    layers = model.config.num_hidden_layers
    assert len(seen[0]) == 2 * layers, "one buffer per layer's keys and one per its values"
    ptrs = [{k: t.data_ptr() for k, t in s.items()} for s in seen]
    assert ptrs[1] == ptrs[0], "a smaller call: the same addresses"
    assert len(ds._KEPT) == 2 * layers
    assert ds.release_kept_cache() > 0 and not ds._KEPT
