"""The decode loop (simple_grpo/gen/decode.py) against HF `generate` and against the distribution it
must sample from: greedy outputs are bit-identical to generate's, sampled tokens follow
softmax(logits / T) after top-p, EOS is held back until min_new_tokens, rows stop at their first
EOS, and the recorded log-probs are those of the distribution each token was drawn from (the
trainer's unless top-p or the EOS mask changed it)."""
import pytest
import torch
from transformers.generation.logits_process import TopPLogitsWarper

from simple_grpo.gen.decode import decode, inverse_cdf_sample, top_p_filter
from simple_grpo.algo.logprobs import completion_logprobs
from simple_grpo.algo.masks import lengths_from_eos, mask_from_lengths
from simple_grpo.gen.rollout import SampleSettings, eos_token_ids, sample


@pytest.fixture(scope="module")
def tok(tiny_model_dir):
    from simple_grpo.models import load_tokenizer

    return load_tokenizer(str(tiny_model_dir))


def prompts(tok, texts):
    enc = tok(texts, return_tensors="pt", padding=True, padding_side="left", add_special_tokens=False)
    return enc.input_ids, enc.attention_mask


def hf_greedy(model, ids, attn, repeat, max_new, min_new, eos, pad):
    out = model.generate(input_ids=ids.repeat_interleave(repeat, 0), attention_mask=attn.repeat_interleave(repeat, 0),
                         do_sample=False, max_new_tokens=max_new, min_new_tokens=min_new, eos_token_id=eos,
                         pad_token_id=pad, use_cache=True)
    return out[:, ids.shape[1]:]


@pytest.mark.parametrize("texts, repeat, max_new, min_new", [
    (["hello there", "a"], 1, 12, 0),        # left padding of different prompt lengths
    (["hello there", "a", "xyz"], 3, 9, 4),  # prompts shared by 3 rows each, EOS held back 4 steps
    (["one prompt only"], 2, 1, 0),          # a single new token: the prefill's logits only
])
def test_greedy_matches_hf_generate(tiny_model, tok, texts, repeat, max_new, min_new):
    ids, attn = prompts(tok, texts)
    pad = tok.pad_token_id
    free = hf_greedy(tiny_model, ids, attn, repeat, max_new, min_new, [10**6], pad)  # an EOS never produced
    # make the token greedy decoding emits at step 2 of row 0 an EOS: rows must stop there
    eos = [int(free[0, min(2, max_new - 1)])]
    want = hf_greedy(tiny_model, ids, attn, repeat, max_new, min_new, eos, pad)
    got = decode(tiny_model, ids, attn, repeat=repeat, max_new_tokens=max_new, min_new_tokens=min_new,
                 eos_ids=eos, pad_id=pad, greedy=True).completion_ids_NC
    assert got.shape[1] <= max_new
    width = max(got.shape[1], want.shape[1])
    pad_to = lambda t: torch.nn.functional.pad(t, (0, width - t.shape[1]), value=pad)  # noqa: E731
    assert torch.equal(pad_to(got), pad_to(want))
    lens = lengths_from_eos(got, eos)
    assert (lens >= min(min_new + 1, got.shape[1])).all() or min_new == 0


def test_sampled_rows_stop_at_first_eos_and_are_padded(tiny_model, tok):
    ids, attn = prompts(tok, ["abc", "de"])
    eos = list(range(0, tiny_model.config.vocab_size, 3))  # a third of the vocabulary ends a row
    torch.manual_seed(0)
    d = decode(tiny_model, ids, attn, repeat=4, max_new_tokens=20, min_new_tokens=0, eos_ids=eos,
               pad_id=7, temperature=1.0)
    c = d.completion_ids_NC
    lens = lengths_from_eos(c, eos)
    assert c.shape[1] < 20, "decoding stops once every row has emitted EOS"
    for row, n in zip(c, lens.tolist()):
        assert int(row[n - 1]) in eos and all(int(x) not in eos for x in row[:n - 1])
        assert (row[n:] == 7).all(), "pad after the first EOS"


def test_min_new_tokens_holds_eos_back(tiny_model, tok):
    ids, attn = prompts(tok, ["abc", "de"])
    eos = list(range(0, tiny_model.config.vocab_size, 2))  # half the vocabulary ends a row
    torch.manual_seed(1)
    c = decode(tiny_model, ids, attn, repeat=8, max_new_tokens=10, min_new_tokens=5, eos_ids=eos,
               pad_id=1, temperature=1.0).completion_ids_NC
    lens = lengths_from_eos(c, eos)
    assert (lens >= 6).all() and (lens == 6).any(), "no EOS among the first 5 tokens, often the 6th"


def test_inverse_cdf_sampling_follows_softmax():
    torch.manual_seed(0)
    scores = torch.tensor([2.0, 0.0, float("-inf"), 1.0, -1.0])
    want = scores.softmax(-1)
    draws = inverse_cdf_sample(scores.expand(200_000, -1))
    freq = torch.bincount(draws, minlength=5).double() / draws.numel()
    assert freq[2] == 0, "a -inf token is never drawn"
    assert torch.allclose(freq, want.double(), atol=4e-3), (freq, want)


@pytest.mark.parametrize("top_p", [0.05, 0.3, 0.5, 0.9, 0.999, 1.0])
def test_top_p_keeps_the_same_tokens_as_hf(top_p):
    torch.manual_seed(0)
    scores = torch.randn(64, 300) * 3
    ours = torch.isfinite(top_p_filter(scores, top_p))
    hf = torch.isfinite(TopPLogitsWarper(top_p)(None, scores.clone()))
    assert torch.equal(ours, hf)
    assert ours.sum(1).min() >= 1


@pytest.fixture(scope="module")
def eos_tok_model():
    """The tiny model emitting EOS with probability about 0.3 at every step: rows end early, and
    holding EOS back for min_new_tokens moves a lot of probability mass."""
    from test_eos_rollout import eos_prone_model

    return eos_prone_model(0.3)


def sampled_distribution_logprobs(model, p_ids_NP, p_lens_N, c_ids_NC, c_lens_N, eos, temperature, top_p,
                                  min_new):
    """Independently of the samplers: each row's unpadded prompt + completion in one plain forward,
    logits / T, EOS at -inf before step `min_new`, HF's TopPLogitsWarper, log_softmax, taken at the
    sampled token -> (log-probs [N, C], nucleus mass of softmax(logits / T) [N, C]), 0 and 1 past
    each length."""
    N, C = c_ids_NC.shape
    logp_NC, mass_NC = torch.zeros(N, C), torch.ones(N, C)
    for i in range(N):
        p, c = int(p_lens_N[i]), int(c_lens_N[i])
        ids_1T = torch.cat([p_ids_NP[i, p_ids_NP.shape[1] - p:], c_ids_NC[i, :c]])[None]
        with torch.no_grad():
            scores_cV = model(input_ids=ids_1T).logits[0, p - 1:p + c - 1].float() / temperature
        full_cV = scores_cV.clone()
        scores_cV[:min_new, eos] = float("-inf")
        if top_p < 1.0:
            scores_cV = TopPLogitsWarper(top_p)(None, scores_cV)
        logp_NC[i, :c] = scores_cV.log_softmax(-1).gather(1, c_ids_NC[i, :c, None])[:, 0]
        mass_NC[i, :c] = full_cV.softmax(-1).where(torch.isfinite(scores_cV), 0.0).sum(-1)
    return logp_NC, mass_NC


@pytest.mark.parametrize("sampler", ["loop", "static", "generate"])
@pytest.mark.parametrize("temperature, top_p, min_new", [
    (1.0, 1.0, 0),  # plain sampling: the whole vocabulary, also the trainer's log-probs
    (1.3, 1.0, 0),  # a temperature only: still the trainer's log-probs (logits / T)
    (0.7, 1.0, 3),  # EOS held back 3 steps: renormalised without EOS there, exactly after
    (1.3, 0.7, 0),  # nucleus only: renormalised over the kept tokens
    (0.7, 0.7, 3),  # EOS mask and nucleus together: the mask comes first, then top-p
    (1.0, 0.7, 3),  # the same at T = 1 (the loop skips the division)
])
def test_recorded_logprobs_are_the_sampled_distributions(eos_tok_model, temperature, top_p, min_new, sampler):
    """Each recorded log-prob is that of the distribution the token was drawn from (logits / T,
    EOS mask before min_new_tokens, top-p renormalised), whichever sampler drew it (generate:
    recorded one step at a time, no logits kept); with neither top-p nor the EOS mask it is the
    trainer's."""
    tok, model = eos_tok_model
    eos = eos_token_ids(tok, model)
    s = SampleSettings(num_generations=4, max_new_tokens=8, temperature=temperature, top_p=top_p,
                       min_new_tokens=min_new, sampler=sampler)
    torch.manual_seed(2)
    p_ids, p_lens, c_ids, c_lens, logp, full = sample(model, tok, ["hello", "a b c"], s, eos,
                                                      record_logprobs=True)
    assert (c_lens >= min(min_new + 1, c_ids.shape[1])).all(), "no EOS before min_new_tokens"
    want, _ = sampled_distribution_logprobs(model, p_ids, p_lens, c_ids, c_lens, eos, temperature, top_p,
                                            min_new)
    assert torch.isfinite(logp).all(), "sampled tokens lie in the distribution they were drawn from"
    assert torch.allclose(logp, want, atol=1e-5), (logp - want).abs().max()
    # the whole tempered softmax's log-probs are the trainer's, whatever top-p and the EOS mask did
    trainer = completion_logprobs(model, p_ids, p_lens, c_ids, c_lens, temperature=temperature)
    assert torch.allclose(full, trainer, atol=1e-5), (full - trainer).abs().max()
    if top_p == 1.0 and min_new == 0:
        assert torch.allclose(logp, trainer, atol=1e-5), (logp - trainer).abs().max()
    else:  # the nucleus / EOS-masked distribution puts more mass on the tokens it kept
        m = mask_from_lengths(c_lens, c_ids.shape[1])
        assert ((logp - full)[m] >= -1e-6).all() and ((logp - full)[m] > 1e-3).any()


@pytest.mark.parametrize("sampler", ["loop", "static", "generate"])
def test_top_p_recorded_minus_trainer_is_minus_log_nucleus_mass(eos_tok_model, sampler):
    """With top_p < 1 the sampler renormalises over the nucleus of mass Z, so recorded - trainer =
    -log Z at every token: the gap importance weights pi_trainer / pi_sampler must see."""
    tok, model = eos_tok_model
    eos = eos_token_ids(tok, model)
    s = SampleSettings(num_generations=4, max_new_tokens=8, temperature=0.8, top_p=0.6, sampler=sampler)
    torch.manual_seed(3)
    p_ids, p_lens, c_ids, c_lens, logp, _ = sample(model, tok, ["hello", "a b c"], s, eos, record_logprobs=True)
    trainer = completion_logprobs(model, p_ids, p_lens, c_ids, c_lens, temperature=0.8)
    _, mass = sampled_distribution_logprobs(model, p_ids, p_lens, c_ids, c_lens, eos, 0.8, 0.6, 0)
    m = mask_from_lengths(c_lens, c_ids.shape[1])
    assert (mass[m] < 0.99).all() and (mass[m] >= 0.6).all(), "a real nucleus, at least top_p of the mass"
    assert torch.allclose((logp - trainer)[m], -mass[m].log(), atol=1e-5), (logp - trainer - (-mass.log()))[m]
    assert ((logp - trainer)[m] > 0.01).all(), "the nucleus log-prob is the larger one"


def test_both_samplers_are_seeded_and_greedy_agrees(tiny_model, tok):
    eos = eos_token_ids(tok, tiny_model)
    for sampler in ("loop", "static", "generate"):
        s = SampleSettings(num_generations=2, max_new_tokens=6, sampler=sampler)
        runs = []
        for _ in range(2):
            torch.manual_seed(5)
            runs.append(sample(tiny_model, tok, ["x", "yy"], s, eos)[2])
        assert torch.equal(runs[0], runs[1]), f"{sampler}: same seed, same samples"
    greedy = [sample(tiny_model, tok, ["x", "yy"], SampleSettings(2, 6, sampler=sm), eos, greedy=True)[2]
              for sm in ("loop", "static", "generate")]
    assert torch.equal(greedy[0], greedy[1]) and torch.equal(greedy[0], greedy[2])


def test_host_reads_every_k_tokens_give_the_same_tokens():
    """The end-of-batch check reads the device only every `sync_every` tokens (16 on GPUs): the
    steps after every row ended are cut off, so tokens and log-probs are the same as checking every
    token, and the width is where the last row ended."""
    from test_eos_rollout import eos_prone_model

    tok, model = eos_prone_model(0.4)
    enc = tok(["A prompt", "Another, longer prompt here"], return_tensors="pt", padding=True,
              padding_side="left")
    runs = {}
    for k in (1, 3, 16):
        torch.manual_seed(0)
        runs[k] = decode(model, enc.input_ids, enc.attention_mask, repeat=4, max_new_tokens=24,
                         min_new_tokens=0, eos_ids=[tok.eos_token_id], pad_id=tok.pad_token_id,
                         record_logprobs=True, sync_every=k)
    ids_NC = runs[1].completion_ids_NC
    ended = (ids_NC == tok.eos_token_id).any(1)
    assert ended.all() and ids_NC.shape[1] < 24, "every row ended before the limit"
    last_eos = max(row.tolist().index(tok.eos_token_id) for row in ids_NC)
    assert ids_NC.shape[1] == last_eos + 1, "cut right after the last row's EOS"
    past_end_NC = ~mask_from_lengths(lengths_from_eos(ids_NC, [tok.eos_token_id]), ids_NC.shape[1])
    assert past_end_NC.any() and (runs[1].logprobs_NC[past_end_NC] == 0).all(), "0 after a row's end"
    for k in (3, 16):
        assert torch.equal(runs[k].completion_ids_NC, ids_NC), k
        assert torch.equal(runs[k].logprobs_NC, runs[1].logprobs_NC), k
        assert torch.equal(runs[k].full_logprobs_NC, runs[1].full_logprobs_NC), k
