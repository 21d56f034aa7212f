"""completion_logprobs equals a plain unpadded forward pass, for ragged batches and any chunking."""
import pytest
import torch

from simple_grpo.algo.logprobs import completion_logprobs, sequence_inputs
from simple_grpo.models import build_tiny_model


@pytest.fixture(scope="module")
def model():
    return build_tiny_model(seed=3).eval()


def naive(model, prompt, completion):
    seq = torch.tensor([prompt + completion])
    logp = torch.log_softmax(model(seq).logits.float(), -1)[0]
    return [logp[len(prompt) - 1 + t, tok].item() for t, tok in enumerate(completion)]


@pytest.mark.parametrize("max_logits_bytes", [1, 1 << 30])  # one row per chunk / all rows at once
def test_ragged_batch_matches_unpadded_forward(model, max_logits_bytes):
    g = torch.Generator().manual_seed(0)
    prompts = [[int(x) for x in torch.randint(3, 300, (n,), generator=g)] for n in (5, 2, 7)]
    comps = [[int(x) for x in torch.randint(3, 300, (n,), generator=g)] for n in (4, 1, 0)]
    P, C = 7, 4
    p_ids = torch.full((3, P), 2)
    c_ids = torch.full((3, C), 2)
    for i, (p, c) in enumerate(zip(prompts, comps)):
        p_ids[i, P - len(p):] = torch.tensor(p)
        c_ids[i, :len(c)] = torch.tensor(c, dtype=torch.long)
    with torch.inference_mode():
        got = completion_logprobs(model, p_ids, torch.tensor([5, 2, 7]), c_ids,
                                  torch.tensor([4, 1, 0]), max_logits_bytes=max_logits_bytes)
        for i, (p, c) in enumerate(zip(prompts, comps)):
            assert torch.allclose(got[i, :len(c)], torch.tensor(naive(model, p, c)), atol=1e-5)
            assert (got[i, len(c):] == 0).all(), "beyond the length the result is exactly 0"


def test_temperature_scales_logits(model):
    p, c = torch.tensor([[5, 6, 7]]), torch.tensor([[8, 9]])
    lens_p, lens_c = torch.tensor([3]), torch.tensor([2])
    with torch.inference_mode():
        t2 = completion_logprobs(model, p, lens_p, c, lens_c, temperature=2.0)
        logits = model(torch.cat([p, c], 1)).logits[0, 2:4] / 2.0
        want = torch.log_softmax(logits, -1).gather(-1, c[0, :, None]).squeeze(-1)
    assert torch.allclose(t2[0], want, atol=1e-5)


def test_differentiable_for_training(model):
    p, c = torch.tensor([[5, 6, 7]]), torch.tensor([[8, 9]])
    logp = completion_logprobs(model, p, torch.tensor([3]), c, torch.tensor([2]))
    logp.sum().backward()
    assert any(q.grad is not None and q.grad.abs().sum() > 0 for q in model.parameters())
    model.zero_grad(set_to_none=True)


def test_sequence_inputs_layout():
    ids, attn, pos = sequence_inputs(torch.tensor([[0, 0, 5, 6]]), torch.tensor([2]),
                                     torch.tensor([[7, 8, 0]]), torch.tensor([2]))
    assert ids.tolist() == [[0, 0, 5, 6, 7, 8, 0]]
    assert attn.tolist() == [[0, 0, 1, 1, 1, 1, 0]]
    assert pos.tolist() == [[0, 0, 0, 1, 2, 3, 3]]


@pytest.mark.parametrize("max_logits_bytes", [1, 1 << 30])
def test_shared_prompt_path_matches_full_forward(model, max_logits_bytes):
    # two groups of three completions: prompts of different lengths, ragged completions
    g = torch.Generator().manual_seed(1)
    P, C = 6, 5
    p_ids = torch.full((6, P), 2)
    p_ids[:3, 2:] = torch.randint(3, 300, (4,), generator=g)   # prompt A: 4 tokens
    p_ids[3:, :] = torch.randint(3, 300, (6,), generator=g)    # prompt B: 6 tokens
    p_lens = torch.tensor([4, 4, 4, 6, 6, 6])
    c_ids = torch.randint(3, 300, (6, C), generator=g)
    c_lens = torch.tensor([5, 3, 1, 0, 5, 2])
    with torch.inference_mode():
        full = completion_logprobs(model, p_ids, p_lens, c_ids, c_lens, share_prompts=False)
        shared = completion_logprobs(model, p_ids, p_lens, c_ids, c_lens, share_prompts=True,
                                     max_logits_bytes=max_logits_bytes)
    assert torch.allclose(full, shared, atol=1e-5)


def test_shared_prompt_gradients_match_full_forward():
    model = build_tiny_model(seed=4)
    p_ids = torch.tensor([[2, 5, 6, 7]] * 3)
    p_lens = torch.tensor([3, 3, 3])
    c_ids = torch.tensor([[8, 9, 10], [11, 12, 2], [13, 2, 2]])
    c_lens = torch.tensor([3, 3, 2])
    grads = []
    for share in (False, True):
        model.zero_grad(set_to_none=True)
        completion_logprobs(model, p_ids, p_lens, c_ids, c_lens, share_prompts=share).sum().backward()
        grads.append([q.grad.clone() for q in model.parameters()])
    for a, b in zip(*grads):
        assert torch.allclose(a, b, atol=1e-5), "gradients must flow into the shared prompt states"


def test_soft_capped_logits_use_the_models_own_head():
    """A head that soft-caps its logits (Gemma 2: cap * tanh(z / cap)) is not `lm_head(hidden)`:
    completion_logprobs then scores with the model's own logits, with and without gradients."""
    from transformers import Gemma2Config, Gemma2ForCausalLM

    cfg = Gemma2Config(vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                       final_logit_softcapping=2.0, sliding_window=64)
    torch.manual_seed(0)
    gemma = Gemma2ForCausalLM._from_config(cfg, attn_implementation="eager", dtype=torch.float32).eval()
    p_ids, c_ids = torch.tensor([[0, 5, 6, 7], [9, 8, 7, 6]]), torch.tensor([[8, 9, 10], [4, 3, 0]])
    p_lens, c_lens = torch.tensor([3, 4]), torch.tensor([3, 2])
    got = completion_logprobs(gemma, p_ids, p_lens, c_ids, c_lens, temperature=0.7, max_logits_bytes=1)
    for i in range(2):
        p, c = p_ids[i, 4 - int(p_lens[i]):].tolist(), c_ids[i, :int(c_lens[i])].tolist()
        logits = gemma(torch.tensor([p + c])).logits[0].float()
        assert logits.abs().max() <= 2.0 + 1e-5, "the cap is in the model's logits"
        want = torch.log_softmax(logits / 0.7, -1)[[len(p) - 1 + t for t in range(len(c))], c]
        assert torch.allclose(got[i, :len(c)], want, atol=1e-5)
    assert got.requires_grad and got[1, 2] == 0


@pytest.mark.parametrize("max_logits_bytes", [1, 1 << 30])
def test_packed_rows_match_the_padded_path(model, max_logits_bytes):
    """Rows packed into one sequence, position ids restarting per row and no attention mask (what
    flash-attention's varlen kernel gets; transformers cuts the sequence where positions restart,
    for sdpa with a block-diagonal mask): the same log-probs as the padded path, empty rows too."""
    g = torch.Generator().manual_seed(2)
    P, C = 6, 5
    p_lens, c_lens = torch.tensor([4, 4, 6, 1, 6]), torch.tensor([5, 0, 2, 3, 1])
    p_ids = torch.where(torch.arange(P)[None] >= P - p_lens[:, None], torch.randint(3, 300, (5, P), generator=g), 2)
    c_ids = torch.where(torch.arange(C)[None] < c_lens[:, None], torch.randint(3, 300, (5, C), generator=g), 2)
    with torch.inference_mode():
        padded = completion_logprobs(model, p_ids, p_lens, c_ids, c_lens, share_prompts=False)
        packed = completion_logprobs(model, p_ids, p_lens, c_ids, c_lens, packed=True,
                                     max_logits_bytes=max_logits_bytes)
    assert torch.allclose(padded, packed, atol=1e-5), (padded - packed).abs().max()
    assert (packed[c_lens[:, None] <= torch.arange(C)[None]] == 0).all()


def test_packed_inputs_layout():
    from simple_grpo.algo.logprobs import packed_inputs

    ids, pos, predict = packed_inputs(torch.tensor([[0, 5, 6], [4, 5, 6]]), torch.tensor([2, 3]),
                                      torch.tensor([[7, 8], [9, 0]]), torch.tensor([2, 1]))
    assert ids.tolist() == [[5, 6, 7, 8, 4, 5, 6, 9]]  # no padding
    assert pos.tolist() == [[0, 1, 2, 3, 0, 1, 2, 3]]  # restarting per row
    assert predict.tolist() == [1, 2, 6]  # the positions before each completion token


def test_packed_gradients_match_the_padded_path():
    model = build_tiny_model(seed=5)
    p_ids = torch.tensor([[2, 5, 6, 7], [2, 2, 8, 9]])
    p_lens, c_ids, c_lens = torch.tensor([3, 2]), torch.tensor([[8, 9, 10], [11, 2, 2]]), torch.tensor([3, 1])
    grads = []
    for packed in (False, True):
        model.zero_grad(set_to_none=True)
        completion_logprobs(model, p_ids, p_lens, c_ids, c_lens, share_prompts=False,
                            packed=packed).sum().backward()
        grads.append([q.grad.clone() for q in model.parameters()])
    for a, b in zip(*grads):
        assert torch.allclose(a, b, atol=1e-5)


def test_flash_attention_models_are_packed(model):
    from simple_grpo.algo.logprobs import packs

    assert not packs(model)  # sdpa here
    before = model.config._attn_implementation
    model.config._attn_implementation = "flash_attention_2"
    try:
        assert packs(model)
    finally:
        model.config._attn_implementation = before
