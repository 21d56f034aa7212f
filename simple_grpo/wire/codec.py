"""The data-only wire format between rollout producers, the reference server and the trainer.

A message is exactly one safetensors file held in memory (`safetensors.torch.save` / `load`):

    [8 bytes little-endian header length N][N bytes JSON header][raw tensor bytes]

The tensors are stored under their field names. The safetensors `__metadata__` dict holds one
key, "simple_grpo", whose value is our own JSON header:

    {"schema_version": 4, "kind": "rollout" | "logprob_request" | "logprob_response",
     "weight_version": 3, "meta": {...}, "batch_id": "a1b2..." | null,
     "temperature": 0.7, "contract": {...} | null}   # the scalar fields of that kind

`temperature` (rollouts and /logprobs requests) is the sampling temperature: the reference server
scores log_softmax(logits / temperature), as the trainer scores its policy. Schema 2 added it.
Schema 3 added a rollout's `contract` (simple_grpo/wire/contract.py: the sampling, reward and
advantage settings and the model the batch was made with; every field present and of its type, its
temperature the batch's; a header without the key decodes as null, which the trainer refuses) and
the optional `loss_rows` tensor. Schema 4 added the optional `gen_logprobs_full` tensor and the
contract's `prompt`, `task` and `reward_code` fields. A body of an older schema is refused with a message naming both
versions and what the newer ones carry.

No pickle anywhere: tensors are raw little-endian bytes with a declared dtype and shape, and the
rest is JSON. `decode` checks the schema version, the kind, every dtype and every shape (the
symbols B, P, C below must agree across fields) and raises `CodecError` with a one-line message,
so a server can answer bad input with a 400 naming the problem. `encode(decode(x))` round-trips
bit-exactly.

Batch layout (see simple_grpo/algo/logprobs.py):
    prompt_ids       [B, P] int64   left-padded prompts; row i's prompt is its last prompt_lens[i]
    completion_ids   [B, C] int64   right-padded completions; row i's is its first completion_lens[i]
    *_lens           [B]    int64   in [0, P] and [0, C]
    loss_rows        [B]    bool    optional; False: the row is outside the loss and every count
    gen_logprobs     [B, C] float32 optional; each token's log-prob under the distribution it was
                                    drawn from (logits / T, EOS held back, the top-p nucleus)
    gen_logprobs_full [B, C] float32 optional; the same tokens under the whole tempered softmax
                                    log_softmax(logits / T), what the trainer's forward computes
"""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from typing import Any, Union

import torch
from safetensors import SafetensorError
from safetensors.torch import load as _st_load
from safetensors.torch import save as _st_save

from simple_grpo.wire.contract import BatchContract, check_contract, contract_from_json, contract_to_json

SCHEMA_VERSION = 4  # 2: the sampling temperature; 3: a rollout's contract and loss_rows; 4: gen_logprobs_full
_ADDED = {  # schema version -> what it added, for the refusal of an older sender's body
    2: "the sampling temperature the reference scores at",
    3: "the batch contract (the sampling, reward and advantage settings and the model a batch was "
       "made with, which the trainer checks) and loss_rows (rows outside the loss)",
    4: "the sampling log-probs under the whole tempered softmax (gen_logprobs_full: the old policy of "
       "a late batch, whose ratio then starts at 1 whatever top_p and min_new_tokens) and the contract's "
       "prompt, task and reward_code (how prompts are rendered and rewards computed)",
}
_META_KEY = "simple_grpo"
_MAX_HEADER_BYTES = 16 << 20  # a header this large is garbage, not a batch


class CodecError(ValueError):
    """A message that is not a valid encoding of the expected kind (one-line message)."""


@dataclass(eq=False)
class RolloutBatch:
    """One scored rollout batch, as uploaded by a producer and handed to the trainer."""
    prompt_ids: torch.Tensor  # [B, P] int64, left-padded
    prompt_lens: torch.Tensor  # [B] int64
    completion_ids: torch.Tensor  # [B, C] int64, right-padded
    completion_lens: torch.Tensor  # [B] int64
    rewards: torch.Tensor  # [B] float32
    advantages: torch.Tensor  # [B] float32
    gen_logprobs: torch.Tensor | None = None  # [B, C] float32, from the generator (optional)
    gen_logprobs_full: torch.Tensor | None = None  # [B, C] float32, the same tokens, whole softmax
    ref_logprobs: torch.Tensor | None = None  # [B, C] float32, filled by the reference server
    weight_version: int = 0  # version of the policy weights that generated the batch
    meta: dict = field(default_factory=dict)  # JSON-able extras (prompts' ids, timings, ...)
    batch_id: str | None = None  # set by the client (idempotent retries) or the server
    temperature: float = 1.0  # sampling temperature; ref_logprobs are log_softmax(logits / it)
    loss_rows: torch.Tensor | None = None  # [B] bool; False: outside the loss and every count (None: all in)
    contract: BatchContract | None = None  # the settings it was made with (trainers refuse None)

    @property
    def batch_size(self) -> int:
        return int(self.prompt_ids.shape[0])

    @property
    def num_tokens(self) -> int:
        """Real (unpadded) prompt + completion tokens."""
        return int(self.prompt_lens.sum()) + int(self.completion_lens.sum())


@dataclass(eq=False)
class LogprobRequest:
    """Body of POST /logprobs: sequences to score, no rewards."""
    prompt_ids: torch.Tensor  # [B, P] int64, left-padded
    prompt_lens: torch.Tensor  # [B] int64
    completion_ids: torch.Tensor  # [B, C] int64, right-padded
    completion_lens: torch.Tensor  # [B] int64
    temperature: float = 1.0  # the server scores log_softmax(logits / temperature)

    @property
    def num_tokens(self) -> int:
        return int(self.prompt_lens.sum()) + int(self.completion_lens.sum())


@dataclass(eq=False)
class LogprobResponse:
    """Answer of POST /logprobs: reference log-probs of the completion tokens, 0 past each length."""
    logprobs: torch.Tensor  # [B, C] float32


Message = Union[RolloutBatch, LogprobRequest, LogprobResponse]

_I64, _F32, _BOOL = torch.int64, torch.float32, torch.bool
_IDS = {"prompt_ids": (_I64, ("B", "P")), "prompt_lens": (_I64, ("B",)),
        "completion_ids": (_I64, ("B", "C")), "completion_lens": (_I64, ("B",))}
# kind -> (class, {tensor field: (dtype, symbolic shape)}, optional tensor fields)
_KINDS: dict[str, tuple[type, dict[str, tuple[torch.dtype, tuple[str, ...]]], frozenset]] = {
    "rollout": (RolloutBatch, {**_IDS, "rewards": (_F32, ("B",)), "advantages": (_F32, ("B",)),
                               "gen_logprobs": (_F32, ("B", "C")), "gen_logprobs_full": (_F32, ("B", "C")),
                               "ref_logprobs": (_F32, ("B", "C")), "loss_rows": (_BOOL, ("B",))},
                frozenset({"gen_logprobs", "gen_logprobs_full", "ref_logprobs", "loss_rows"})),
    "logprob_request": (LogprobRequest, dict(_IDS), frozenset()),
    "logprob_response": (LogprobResponse, {"logprobs": (_F32, ("B", "C"))}, frozenset()),
}
_KIND_OF = {cls: kind for kind, (cls, _, _) in _KINDS.items()}


def _kind_of(obj: Any) -> str:
    kind = _KIND_OF.get(type(obj))
    if kind is None:
        raise CodecError(f"cannot encode {type(obj).__name__}; expected one of "
                         f"{', '.join(c.__name__ for c in _KIND_OF)}")
    return kind


def _scalar_names(cls: type) -> list[str]:
    tensors = _KINDS[_KIND_OF[cls]][1]
    return [f.name for f in dataclasses.fields(cls) if f.name not in tensors]


def validate(obj: Message) -> None:
    """Check dtypes, shapes, length ranges and scalar types; raise CodecError naming the problem."""
    kind = _kind_of(obj)
    _, spec, optional = _KINDS[kind]
    sizes: dict[str, int] = {}
    for name, (dtype, dims) in spec.items():
        t = getattr(obj, name)
        if t is None:
            if name in optional:
                continue
            raise CodecError(f"{name} is missing")
        if not isinstance(t, torch.Tensor):
            raise CodecError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype != dtype:
            raise CodecError(f"{name} has dtype {str(t.dtype).removeprefix('torch.')}, "
                             f"expected {str(dtype).removeprefix('torch.')}")
        if t.dim() != len(dims):
            raise CodecError(f"{name} has shape {list(t.shape)}, expected [{', '.join(dims)}]")
        for sym, n in zip(dims, t.shape):
            if sizes.setdefault(sym, int(n)) != n:
                want = ", ".join(f"{s}={sizes[s]}" if s in sizes else s for s in dims)
                raise CodecError(f"{name} has shape {list(t.shape)}, expected [{want}] "
                                 f"(mismatched shapes)")
    for lens, width in (("prompt_lens", "P"), ("completion_lens", "C")):
        t = getattr(obj, lens, None)
        if t is not None and t.numel() and (int(t.min()) < 0 or int(t.max()) > sizes[width]):
            raise CodecError(f"{lens} must lie in [0, {width}={sizes[width]}], got values in "
                             f"[{int(t.min())}, {int(t.max())}]")
    if isinstance(obj, (RolloutBatch, LogprobRequest)) and not _positive_finite(obj.temperature):
        raise CodecError(f"temperature must be a finite number > 0, got {obj.temperature!r:.60}")
    if isinstance(obj, RolloutBatch):
        if type(obj.weight_version) is not int or obj.weight_version < 0:
            raise CodecError(f"weight_version must be an int >= 0, got {obj.weight_version!r}")
        if not isinstance(obj.meta, dict) or not all(isinstance(k, str) for k in obj.meta):
            raise CodecError("meta must be a dict with str keys")
        if obj.batch_id is not None and (not isinstance(obj.batch_id, str) or
                                         not 0 < len(obj.batch_id) <= 128):
            raise CodecError("batch_id must be None or a str of 1 to 128 characters")
        if obj.contract is not None:
            try:
                check_contract(obj.contract)
            except ValueError as e:
                raise CodecError(str(e)) from None
            if obj.contract.temperature != obj.temperature:
                raise CodecError(f"contract temperature {obj.contract.temperature!r:.40} is not the "
                                 f"batch's temperature {obj.temperature!r:.40}")


def _positive_finite(x: Any) -> bool:
    """An int or float (not a bool) that is finite as a float, and > 0."""
    if type(x) not in (int, float):
        return False
    try:
        return math.isfinite(float(x)) and x > 0
    except OverflowError:  # an int too large for a float
        return False


def encode(obj: Message) -> bytes:
    """RolloutBatch | LogprobRequest | LogprobResponse -> bytes (a safetensors file)."""
    validate(obj)
    kind = _kind_of(obj)
    header: dict[str, Any] = {"schema_version": SCHEMA_VERSION, "kind": kind}
    for name in _scalar_names(type(obj)):
        header[name] = getattr(obj, name)
    if "contract" in header and header["contract"] is not None:
        header["contract"] = contract_to_json(header["contract"])
    try:
        header_json = json.dumps(header, allow_nan=False, separators=(",", ":"))
    except (TypeError, ValueError) as e:
        raise CodecError(f"meta is not JSON-serialisable: {e}") from None
    tensors = {name: getattr(obj, name).detach().cpu().contiguous()
               for name in _KINDS[kind][1] if getattr(obj, name) is not None}
    return _st_save(tensors, metadata={_META_KEY: header_json})


def _reject_constant(name: str) -> float:
    raise ValueError(f"{name} is not valid JSON")


def _read_header(data: bytes) -> dict[str, Any]:
    """Our JSON header from the safetensors header, with a clear error for anything else."""
    if len(data) < 8:
        raise CodecError(f"body too short ({len(data)} bytes) to be an encoded batch")
    n = int.from_bytes(data[:8], "little")
    if n > min(len(data) - 8, _MAX_HEADER_BYTES):
        raise CodecError(f"truncated or not a safetensors body (header length {n}, "
                         f"body {len(data)} bytes)")
    try:
        st_header = json.loads(bytes(data[8:8 + n]), parse_constant=_reject_constant)
        ours = json.loads(st_header["__metadata__"][_META_KEY], parse_constant=_reject_constant)
    except (ValueError, KeyError, TypeError, RecursionError) as e:  # RecursionError: [[[[...
        raise CodecError(f"not a simple_grpo message (bad header: {type(e).__name__}: "
                         f"{str(e)[:80]})") from None
    if not isinstance(ours, dict):
        raise CodecError("not a simple_grpo message (header is not a JSON object)")
    if not isinstance(ours.get("kind"), (str, type(None))):  # a list or dict is unhashable
        raise CodecError(f"unknown message kind {str(ours['kind'])[:60]}")
    version = ours.get("schema_version")
    if type(version) is not int or version != SCHEMA_VERSION:
        why = ("; " + "; ".join(f"schema {v} carries {_ADDED[v]}" for v in range(version + 1,
                                                                               SCHEMA_VERSION + 1))
               + ": upgrade simple_grpo on the sending side") if type(version) is int and \
            1 <= version < SCHEMA_VERSION else ""
        raise CodecError(f"schema version {version!r:.40} is not supported (this side speaks "
                         f"{SCHEMA_VERSION}{why})")
    unknown = set(st_header) - {"__metadata__"} - set(_KINDS.get(ours.get("kind"), ((), {}))[1])
    if ours.get("kind") in _KINDS and unknown:
        raise CodecError(f"unexpected tensor(s) {', '.join(sorted(unknown))} "
                         f"for kind {ours['kind']!r}")
    return ours


def decode(data: bytes | bytearray | memoryview, expect: type = RolloutBatch) -> Message:
    """bytes -> an instance of `expect` (RolloutBatch by default), fully validated."""
    header = _read_header(data)
    kind = header.get("kind")
    if kind not in _KINDS:
        raise CodecError(f"unknown message kind {kind!r}")
    cls, spec, _ = _KINDS[kind]
    if cls is not expect:
        raise CodecError(f"expected a {_KIND_OF[expect]!r} message, got {kind!r}")
    try:
        tensors = _st_load(bytes(data))
    except SafetensorError as e:
        raise CodecError(f"corrupt tensor data: {str(e)[:120]}") from None
    scalars = _scalar_names(cls)
    unknown = set(header) - {"schema_version", "kind"} - set(scalars)
    if unknown:
        raise CodecError(f"bad message fields: unexpected header field(s) "
                         f"{', '.join(sorted(unknown))[:100]}")
    if "temperature" in scalars and "temperature" not in header:  # never score at a guessed one
        raise CodecError(f"a {kind!r} message must say its sampling temperature (header field "
                         f"'temperature')")
    kw: dict[str, Any] = {name: tensors.get(name) for name in spec}
    kw.update({name: header[name] for name in scalars if name in header})
    if kw.get("contract") is not None:
        try:
            kw["contract"] = contract_from_json(kw["contract"])
        except ValueError as e:
            raise CodecError(str(e)) from None
    obj = cls(**kw)
    validate(obj)
    return obj


__all__ = ["SCHEMA_VERSION", "CodecError", "RolloutBatch", "LogprobRequest", "LogprobResponse",
           "encode", "decode", "validate"]


def nonfinite_fields(batch: RolloutBatch) -> list[str]:
    """The floating tensor fields of a rollout holding a NaN or an infinity where it is read:
    [B, C] fields at each row's completion tokens (its first completion_lens), [B, P] ones at its
    prompt tokens (its last prompt_lens), others everywhere; padding may hold anything. Every
    floating field of the rollout kind is checked, optional ones when present. [] when all finite."""
    P, C = batch.prompt_ids.shape[1], batch.completion_ids.shape[1]
    valid = {("B", "C"): torch.arange(C)[None, :] < batch.completion_lens[:, None],
             ("B", "P"): torch.arange(P)[None, :] >= (P - batch.prompt_lens)[:, None]}
    bad = []
    for name, (_, dims) in _KINDS["rollout"][1].items():
        t = getattr(batch, name)
        if t is None or not t.is_floating_point():
            continue
        if not bool(torch.isfinite(t[valid[dims]] if dims in valid else t).all()):
            bad.append(name)
    return bad
