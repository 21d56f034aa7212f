"""The wire codec: exact round trips for every optional-field combination (the batch contract and
loss_rows too), and a CodecError with a one-line message (never another exception) for anything
that is not a valid message."""
from __future__ import annotations

import dataclasses
import itertools
import json

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load as safetensors_load
from safetensors.torch import save as st_save

from simple_grpo.wire import codec
from simple_grpo.wire.codec import CodecError, LogprobRequest, LogprobResponse, RolloutBatch
from simple_grpo.wire.contract import BatchContract


def make_batch(B: int = 3, P: int = 5, C: int = 4, gen: bool = True, ref: bool = True,
               seed: int = 0, **kw) -> RolloutBatch:
    """A random valid batch; keyword arguments override any field."""
    g = torch.Generator().manual_seed(seed)
    fields = dict(
        prompt_ids=torch.randint(0, 1000, (B, P), generator=g),
        prompt_lens=torch.randint(1, P + 1, (B,), generator=g) if P else torch.zeros(B, dtype=torch.long),
        completion_ids=torch.randint(0, 1000, (B, C), generator=g),
        completion_lens=torch.randint(0, C + 1, (B,), generator=g),
        rewards=torch.randn(B, generator=g), advantages=torch.randn(B, generator=g),
        gen_logprobs=-torch.rand(B, C, generator=g) if gen else None,
        ref_logprobs=-torch.rand(B, C, generator=g) if ref else None)
    return RolloutBatch(**{**fields, **kw})


def bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bits of a tensor, so NaN payloads and -0.0 compare exactly too."""
    return t.contiguous().view(torch.uint8)


def assert_same(a, b) -> None:
    assert type(a) is type(b)
    for f in a.__dataclass_fields__:
        x, y = getattr(a, f), getattr(b, f)
        if isinstance(x, torch.Tensor):
            assert x.dtype == y.dtype and x.shape == y.shape, f
            assert torch.equal(bits(x), bits(y)), f"{f} differs"
        else:
            assert x == y and type(x) is type(y), f


DROP = object()  # a header field left out


def raw(tensors: dict[str, torch.Tensor], **header) -> bytes:
    """A safetensors body with our header, bypassing encode's validation (to build bad input)."""
    hdr = {"schema_version": codec.SCHEMA_VERSION, "kind": "rollout", "weight_version": 0,
           "meta": {}, "batch_id": None, "temperature": 1.0, **header}
    hdr = {k: v for k, v in hdr.items() if v is not DROP}
    return st_save(tensors, metadata={"simple_grpo": json.dumps(hdr)})


@pytest.mark.parametrize("gen,ref,meta,batch_id,version", list(itertools.product(
    [False, True], [False, True], [{}, {"group": [1, 2], "note": "é", "x": None}],
    [None, "b-1"], [0, 7])))
def test_rollout_round_trip_every_optional_combination(gen, ref, meta, batch_id, version):
    b = make_batch(gen=gen, ref=ref, meta=meta, batch_id=batch_id, weight_version=version)
    data = codec.encode(b)
    assert isinstance(data, bytes)
    out = codec.decode(data)
    assert_same(b, out)
    assert codec.encode(out) == data  # byte-stable


def test_special_float_values_and_empty_shapes_round_trip():
    b = make_batch()
    b.gen_logprobs[0, 0] = float("nan")
    b.gen_logprobs[0, 1] = -float("inf")
    b.ref_logprobs[1, 0] = -0.0
    assert_same(b, codec.decode(codec.encode(b)))
    for B, P, C in [(0, 3, 2), (2, 3, 0), (0, 0, 0)]:
        e = make_batch(B, P, C)
        assert_same(e, codec.decode(codec.encode(e)))


def test_non_contiguous_views_encode_like_copies():
    b = make_batch(4, 6, 5)
    v = RolloutBatch(b.prompt_ids.t().contiguous().t(), b.prompt_lens, b.completion_ids[:, :],
                     b.completion_lens, b.rewards, b.advantages, b.gen_logprobs.t().contiguous().t())
    assert not v.prompt_ids.is_contiguous()
    assert_same(codec.decode(codec.encode(v)),
                RolloutBatch(*[getattr(b, f) for f in ("prompt_ids", "prompt_lens", "completion_ids",
                                                       "completion_lens", "rewards", "advantages",
                                                       "gen_logprobs")]))


def test_logprob_request_and_response_round_trip():
    b = make_batch()
    req = LogprobRequest(b.prompt_ids, b.prompt_lens, b.completion_ids, b.completion_lens)
    assert_same(req, codec.decode(codec.encode(req), LogprobRequest))
    resp = LogprobResponse(-torch.rand(3, 4))
    assert_same(resp, codec.decode(codec.encode(resp), LogprobResponse))


@pytest.mark.parametrize("temperature", [0.7, 1e-3, 2.5, 1])
def test_temperature_round_trips_in_the_header(temperature):
    b = make_batch(temperature=temperature, batch_id="t")
    data = codec.encode(b)
    assert_same(b, codec.decode(data))
    assert codec.encode(codec.decode(data)) == data  # byte-stable
    n = int.from_bytes(data[:8], "little")
    header = json.loads(json.loads(data[8:8 + n])["__metadata__"]["simple_grpo"])
    assert header["schema_version"] == 4 and header["temperature"] == temperature
    req = LogprobRequest(b.prompt_ids, b.prompt_lens, b.completion_ids, b.completion_lens,
                         temperature=temperature)
    assert_same(req, codec.decode(codec.encode(req), LogprobRequest))
    assert make_batch().temperature == 1.0  # the default: an unscaled softmax


BAD_TEMPERATURES = [  # (value, why it is refused)
    (0, "zero: log_softmax(logits / 0) is undefined (greedy has no distribution)"),
    (0.0, "zero as a float"),
    (-1, "negative: no temperature is below zero"),
    (float("nan"), "NaN: not a number at all"),
    (float("inf"), "inf: every logit / inf = 0, a uniform distribution nobody sampled"),
    ("0.7", "a string: JSON has numbers, a quoted one is a sender's bug"),
    (True, "a bool: JSON true would pass as 1 in Python"),
    (None, "null: a missing value written out"),
    (10 ** 400, "an int no float can hold"),
]


@pytest.mark.parametrize("value,why", BAD_TEMPERATURES, ids=[w.split(":")[0] for _, w in BAD_TEMPERATURES])
def test_bad_temperatures_are_refused(value, why):
    b = make_batch(temperature=value)
    with pytest.raises(CodecError, match=r"^temperature must be a finite number > 0, got ") as e:
        codec.encode(b)
    assert "\n" not in str(e.value)
    req = LogprobRequest(b.prompt_ids, b.prompt_lens, b.completion_ids, b.completion_lens,
                         temperature=value)
    with pytest.raises(CodecError, match="temperature must be"):
        codec.encode(req)
    # the same value in a received header (NaN and inf are not JSON: refused as such)
    with pytest.raises(CodecError, match="temperature must be|not valid JSON"):
        codec.decode(raw(_tensors(b), temperature=value))


def with_header(data: bytes, drop: tuple[str, ...] = (), **changes) -> bytes:
    """An encoded message re-saved with header fields dropped or changed (bypasses validation)."""
    n = int.from_bytes(data[:8], "little")
    header = json.loads(json.loads(data[8:8 + n])["__metadata__"]["simple_grpo"])
    header = {k: v for k, v in {**header, **changes}.items() if k not in drop}
    return st_save(safetensors_load(data), metadata={"simple_grpo": json.dumps(header)})


def schema1_body(obj) -> bytes:
    """`obj` as a schema-1 sender (before the temperature field) encoded it."""
    return with_header(codec.encode(obj), drop=("temperature",), schema_version=1)


def test_schema_1_body_is_refused_naming_both_versions_and_the_temperature():
    b = make_batch()
    req = LogprobRequest(b.prompt_ids, b.prompt_lens, b.completion_ids, b.completion_lens)
    for obj in (b, req):
        with pytest.raises(CodecError, match=r"schema version 1 is not supported \(this side "
                                             r"speaks 4; schema 2 carries the sampling temperature") as e:
            codec.decode(schema1_body(obj), type(obj))
        assert "schema 3 carries the batch contract" in str(e.value) and "\n" not in str(e.value)


def test_wrong_kind_is_refused():
    b = make_batch()
    req = LogprobRequest(b.prompt_ids, b.prompt_lens, b.completion_ids, b.completion_lens)
    with pytest.raises(CodecError, match="expected a 'rollout' message, got 'logprob_request'"):
        codec.decode(codec.encode(req))


@pytest.mark.parametrize("change,match", [
    (dict(prompt_ids=torch.zeros(3, 5, dtype=torch.int32)), "prompt_ids has dtype int32"),
    (dict(rewards=torch.zeros(3, dtype=torch.float64)), "rewards has dtype float64"),
    (dict(completion_lens=torch.zeros(4, dtype=torch.long)), "mismatched shapes"),
    (dict(gen_logprobs=torch.zeros(3, 5)), "mismatched shapes"),
    (dict(prompt_ids=torch.zeros(3, 5, 1, dtype=torch.long)), r"expected \[B, P\]"),
    (dict(prompt_lens=torch.tensor([1, 6, 2])), r"prompt_lens must lie in \[0, P=5\]"),
    (dict(completion_lens=torch.tensor([-1, 0, 2])), "completion_lens must lie in"),
    (dict(weight_version=-1), "weight_version"),
    (dict(weight_version=True), "weight_version"),
    (dict(meta=[1, 2]), "meta must be a dict"),
    (dict(meta={"x": object()}), "not JSON-serialisable"),
    (dict(meta={"x": float("nan")}), "not JSON-serialisable"),
    (dict(batch_id=""), "batch_id"),
    (dict(rewards=None), "rewards is missing"),
    (dict(rewards=[1.0, 2.0, 3.0]), "must be a torch.Tensor"),
])
def test_encode_validates(change, match):
    b = make_batch()
    for k, v in change.items():
        setattr(b, k, v)
    with pytest.raises(CodecError, match=match):
        codec.encode(b)


def _tensors(b: RolloutBatch) -> dict[str, torch.Tensor]:
    return {k: getattr(b, k) for k in ("prompt_ids", "prompt_lens", "completion_ids",
                                       "completion_lens", "rewards", "advantages")}


@pytest.mark.parametrize("mutate,header,match", [
    (lambda t: t.update(prompt_ids=t["prompt_ids"].int()), {}, "prompt_ids has dtype int32"),
    (lambda t: t.update(rewards=t["rewards"].half()), {}, "rewards has dtype float16"),
    (lambda t: t.update(completion_lens=t["completion_lens"][:2]), {}, "mismatched shapes"),
    (lambda t: t.pop("advantages"), {}, "advantages is missing"),
    (lambda t: t.update(extra=torch.zeros(2)), {}, "unexpected tensor"),
    (lambda t: None, {"schema_version": 5}, r"schema version 5 is not supported \(this side speaks 4\)$"),
    (lambda t: None, {"schema_version": 4.0}, "schema version 4.0 is not supported"),
    (lambda t: None, {"kind": "weights"}, "unknown message kind"),
    (lambda t: None, {"weight_version": "3"}, "weight_version"),
    (lambda t: None, {"meta": "x"}, "meta must be a dict"),
    (lambda t: None, {"surprise": 1}, "bad message fields"),
    (lambda t: None, {"temperature": DROP}, "must say its sampling temperature"),  # never guess 1.0
])
def test_decode_validates(mutate, header, match):
    t = _tensors(make_batch())
    mutate(t)
    with pytest.raises(CodecError, match=match):
        codec.decode(raw(t, **header))


def test_foreign_safetensors_and_garbage_are_refused():
    with pytest.raises(CodecError, match="not a simple_grpo message"):
        codec.decode(st_save({"a": torch.zeros(2)}))
    for junk in [b"", b"abc", b"\x00" * 8, b"\xff" * 16, b"GET / HTTP/1.1\r\n\r\n", b"{}" * 10]:
        with pytest.raises(CodecError):
            codec.decode(junk)


def test_every_truncation_is_a_codec_error():
    data = codec.encode(make_batch(2, 3, 2))
    for n in range(len(data)):
        with pytest.raises(CodecError):
            codec.decode(data[:n])
    with pytest.raises(CodecError):
        codec.decode(data + b"\x00")


def test_errors_are_one_line():
    t = _tensors(make_batch())
    t["prompt_ids"] = t["prompt_ids"].float()
    with pytest.raises(CodecError) as e:
        codec.decode(raw(t))
    assert "\n" not in str(e.value)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=300))
def test_random_bytes_only_raise_codec_error(data):
    with pytest.raises(CodecError):
        codec.decode(data)


_GOOD = codec.encode(make_batch(2, 3, 2, meta={"k": 1}))


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.integers(0, len(_GOOD) - 1), st.integers(0, 255)), min_size=1,
                max_size=4))
def test_corrupted_bytes_decode_or_raise_codec_error(edits):
    data = bytearray(_GOOD)
    for i, v in edits:
        data[i] = v
    try:
        out = codec.decode(bytes(data))
    except CodecError:
        return
    codec.validate(out)  # whatever decodes is a valid batch


# --- schema 3: the batch contract and loss_rows

CONTRACT = BatchContract(scale="std", rewards="correct_lenient:1.0,overlong:1.0", dynamic_sampling=True,
                         filter_metric="correct_lenient", max_new_tokens=48, min_new_tokens=0, top_p=1.0,
                         temperature=0.7, group_size=8, overlong_cache=10, model="0123456789abcdef",
                         prompt="0f1e2d3c4b5a6978", task="arithmetic;question_field=question;answer_field=answer",
                         reward_code="89abcdef01234567;failure_value=0.0")


@pytest.mark.parametrize("contract,loss_rows", list(itertools.product(
    [None, CONTRACT], [None, torch.tensor([True, False, True]), torch.zeros(3, dtype=torch.bool)])))
def test_contract_and_loss_rows_round_trip(contract, loss_rows):
    b = make_batch(temperature=0.7, contract=contract, loss_rows=loss_rows, batch_id="c")
    data = codec.encode(b)
    out = codec.decode(data)
    assert_same(b, out)
    assert codec.encode(out) == data  # byte-stable
    n = int.from_bytes(data[:8], "little")
    header = json.loads(json.loads(data[8:8 + n])["__metadata__"]["simple_grpo"])
    assert header["contract"] == (None if contract is None else dataclasses.asdict(CONTRACT))
    if loss_rows is not None:
        assert out.loss_rows.dtype == torch.bool and out.loss_rows.tolist() == loss_rows.tolist()


def test_schema_2_body_is_refused_saying_what_schemas_3_and_4_add():
    """A schema-2 sender (before the contract and loss_rows) gets a one-line 400 saying so."""
    body = with_header(codec.encode(make_batch()), drop=("contract",), schema_version=2)
    with pytest.raises(CodecError) as e:
        codec.decode(body)
    assert str(e.value) == (
        "schema version 2 is not supported (this side speaks 4; schema 3 carries the batch contract "
        "(the sampling, reward and advantage settings and the model a batch was made with, which the "
        "trainer checks) and loss_rows (rows outside the loss); schema 4 carries the sampling log-probs "
        "under the whole tempered softmax (gen_logprobs_full: the old policy of a late batch, whose ratio "
        "then starts at 1 whatever top_p and min_new_tokens) and the contract's prompt, task and "
        "reward_code (how prompts are rendered and rewards computed): upgrade simple_grpo on the sending "
        "side)")


def test_gen_logprobs_full_round_trips():
    """Schema 4's optional [B, C] tensor: bit-exact both ways; a wrong width is refused."""
    b = make_batch()
    b.gen_logprobs_full = -torch.rand(b.completion_ids.shape)
    out = codec.decode(codec.encode(b))
    assert torch.equal(out.gen_logprobs_full, b.gen_logprobs_full)
    b.gen_logprobs_full = b.gen_logprobs_full[:, :-1]
    with pytest.raises(CodecError, match="gen_logprobs_full has shape"):
        codec.encode(b)


def test_a_header_without_the_contract_key_decodes_as_none():
    """Never a guessed contract: None, which a trainer with a contract refuses (rollout_source)."""
    body = with_header(codec.encode(make_batch(contract=CONTRACT, temperature=0.7)), drop=("contract",))
    assert codec.decode(body).contract is None


BAD_CONTRACTS = [  # (header value of "contract", the one-line error)
    # not an object
    ("std", "contract must be a JSON object or null, got str"),
    ([1], "contract must be a JSON object or null, got list"),
    # a field left out / one this side does not know (a newer sender)
    ({k: v for k, v in dataclasses.asdict(CONTRACT).items() if k != "top_p"},
     r"contract lacks field\(s\) top_p"),
    ({**dataclasses.asdict(CONTRACT), "seed": 1}, r"contract has unknown field\(s\) seed"),
    # an older sender's contract, without the prompt, task and reward-code fields: one line saying so
    ({k: v for k, v in dataclasses.asdict(CONTRACT).items() if k not in ("prompt", "task", "reward_code")},
     r"^contract lacks field\(s\) prompt, task, reward_code \(an older sender: upgrade simple_grpo on "
     r"the sending side\)$"),
    # each type: str, bool, int (not bool, >= 0), float (finite, not bool)
    ({**dataclasses.asdict(CONTRACT), "scale": 1}, "contract field scale must be str, got int"),
    ({**dataclasses.asdict(CONTRACT), "rewards": None}, "contract field rewards must be str, got NoneType"),
    ({**dataclasses.asdict(CONTRACT), "model": "x" * 1001}, "contract field model is longer than 1000"),
    ({**dataclasses.asdict(CONTRACT), "reward_code": 0.0}, "contract field reward_code must be str, got float"),
    ({**dataclasses.asdict(CONTRACT), "dynamic_sampling": 1}, "contract field dynamic_sampling must be bool"),
    ({**dataclasses.asdict(CONTRACT), "max_new_tokens": 48.0},
     "contract field max_new_tokens must be int, got float"),
    ({**dataclasses.asdict(CONTRACT), "group_size": True}, "contract field group_size must be int, got bool"),
    ({**dataclasses.asdict(CONTRACT), "overlong_cache": -1}, "contract field overlong_cache must be >= 0"),
    ({**dataclasses.asdict(CONTRACT), "top_p": "1.0"}, "contract field top_p must be int or float, got str"),
    ({**dataclasses.asdict(CONTRACT), "top_p": 1e400}, "not valid JSON|contract field top_p must be finite"),
    # consistent with the batch: the contract's temperature is the one the batch is scored at
    ({**dataclasses.asdict(CONTRACT), "temperature": 1.0}, "contract temperature 1.0 is not the batch's"),
]


@pytest.mark.parametrize("value,message", BAD_CONTRACTS, ids=[m[:40] for _, m in BAD_CONTRACTS])
def test_bad_contracts_are_refused_in_one_line(value, message):
    body = with_header(codec.encode(make_batch(temperature=0.7)), contract=value)
    with pytest.raises(CodecError, match=message) as e:
        codec.decode(body)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("change,match", [
    # a contract field of the wrong type set in Python: refused before anything is sent
    (dict(contract=dataclasses.replace(CONTRACT, group_size="8")), "contract field group_size must be int"),
    (dict(contract={"scale": "std"}), "contract must be a BatchContract or None, got dict"),
    # loss_rows: bool, one per row
    (dict(loss_rows=torch.ones(3)), "loss_rows has dtype float32, expected bool"),
    (dict(loss_rows=torch.ones(4, dtype=torch.bool)), "mismatched shapes"),
    (dict(loss_rows=torch.ones(3, 1, dtype=torch.bool)), r"loss_rows has shape \[3, 1\], expected \[B\]"),
])
def test_encode_validates_contract_and_loss_rows(change, match):
    b = make_batch(temperature=0.7, **change)
    with pytest.raises(CodecError, match=match):
        codec.encode(b)


def test_decode_refuses_loss_rows_of_another_dtype():
    t = {**_tensors(make_batch()), "loss_rows": torch.ones(3, dtype=torch.uint8)}
    with pytest.raises(CodecError, match="loss_rows has dtype uint8, expected bool"):
        codec.decode(raw(t))
