"""The batch contract: the settings a rollout batch was made with that change the math the trainer
does with it. A producer (the trainer's own rollouts, a generation worker) puts its contract in
every RolloutBatch it uploads (the JSON header, simple_grpo/wire/codec.py); the trainer drops a
batch whose contract differs from its own (simple_grpo/train/rollout_source.py), naming each
differing field.

On the wire it is a JSON object with exactly the fields below, each of its declared type:

    {"scale": "std", "rewards": "format:0.5,correct:1.0", "dynamic_sampling": false,
     "filter_metric": "off", "max_new_tokens": 48, "min_new_tokens": 0, "top_p": 1.0,
     "temperature": 1.0, "group_size": 8, "overlong_cache": 10, "model": "3f2a...",
     "prompt": "9c41...", "task": "arithmetic;question_field=question;answer_field=answer",
     "reward_code": "d07e...;failure_value=0.0"}

The fields up to `model` came with codec schema 3; `prompt`, `task` and `reward_code` are newer. A
contract that lacks fields (an older sender) or has unknown ones (a newer sender) is refused with
one line naming them.

How a config becomes a contract (simple_grpo/gen/batch_contract.py) is the trainer's business;
this module only defines, checks and compares the record, so both ends of the wire read one
definition.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

_MAX_TEXT = 1000  # characters of a str field: a reward list, not a document


@dataclass(frozen=True)
class BatchContract:
    """What a batch's advantages, rewards, samples and model depend on."""
    scale: str  # advantage scale: "std" (GRPO, DAPO) | "none" (Dr.GRPO)
    rewards: str  # the reward specs in order, "name:weight,..." (DAPO's added 'overlong' included)
    dynamic_sampling: bool  # groups flat in filter_metric dropped and refilled
    filter_metric: str  # what dynamic sampling filters on; "off" without dynamic sampling
    max_new_tokens: int  # completion length limit (and L_max of the overlong reward)
    min_new_tokens: int  # EOS held back for this many tokens
    top_p: float  # nucleus sampling
    temperature: float  # sampling temperature (= the batch's `temperature`)
    group_size: int  # G completions per prompt
    overlong_cache: int  # DAPO's L_cache in tokens, resolved (never None)
    model: str  # a short id of the base model the producer loaded
    prompt: str  # a short id of a fixed probe question rendered and tokenized as every prompt is
    task: str  # the task (a local file by its name) with its question and answer fields
    reward_code: str  # a short id of the reward functions' source files, then ";failure_value=<value>"


# field -> the Python types its value may have (bool is not an int here, nor a float)
FIELD_TYPES: dict[str, tuple[type, ...]] = {
    "scale": (str,), "rewards": (str,), "dynamic_sampling": (bool,), "filter_metric": (str,),
    "max_new_tokens": (int,), "min_new_tokens": (int,), "top_p": (int, float),
    "temperature": (int, float), "group_size": (int,), "overlong_cache": (int,), "model": (str,),
    "prompt": (str,), "task": (str,), "reward_code": (str,),
}
assert list(FIELD_TYPES) == [f.name for f in dataclasses.fields(BatchContract)], \
    "FIELD_TYPES must list BatchContract's fields in order"


def _type_error(name: str, value: Any) -> str | None:
    """Why `value` is not a valid value of field `name`, or None."""
    kinds = FIELD_TYPES[name]
    if type(value) not in kinds:
        return f"contract field {name} must be {' or '.join(k.__name__ for k in kinds)}, " \
               f"got {type(value).__name__}"
    if isinstance(value, str) and len(value) > _MAX_TEXT:
        return f"contract field {name} is longer than {_MAX_TEXT} characters"
    if type(value) is int and value < 0:
        return f"contract field {name} must be >= 0, got {value}"
    if type(value) is float and not math.isfinite(value):
        return f"contract field {name} must be finite, got {value}"
    return None


def check_contract(c: Any) -> None:
    """Raise ValueError (one line) unless `c` is a BatchContract whose fields have their types."""
    if not isinstance(c, BatchContract):
        raise ValueError(f"contract must be a BatchContract or None, got {type(c).__name__}")
    for name in FIELD_TYPES:
        why = _type_error(name, getattr(c, name))
        if why:
            raise ValueError(why)


def contract_to_json(c: BatchContract) -> dict[str, Any]:
    """The JSON object of a (checked) contract."""
    check_contract(c)
    return dataclasses.asdict(c)


def contract_from_json(obj: Any) -> BatchContract:
    """A JSON object -> BatchContract; ValueError (one line) for a missing or unknown field or a
    value of another type."""
    if not isinstance(obj, dict):
        raise ValueError(f"contract must be a JSON object or null, got {type(obj).__name__}")
    missing = [k for k in FIELD_TYPES if k not in obj]
    unknown = sorted(str(k) for k in obj if k not in FIELD_TYPES)
    if missing:
        raise ValueError(f"contract lacks field(s) {', '.join(missing)} (an older sender: upgrade "
                         f"simple_grpo on the sending side)")
    if unknown:
        raise ValueError(f"contract has unknown field(s) {', '.join(unknown)[:100]} (a newer sender: "
                         f"upgrade simple_grpo on this side)")
    c = BatchContract(**obj)
    check_contract(c)
    return c


def contract_differences(ours: BatchContract, theirs: BatchContract) -> list[str]:
    """The names of the fields whose values differ, in field order ([] when the contracts agree)."""
    return [name for name in FIELD_TYPES if getattr(ours, name) != getattr(theirs, name)]


__all__ = ["BatchContract", "FIELD_TYPES", "check_contract", "contract_to_json", "contract_from_json",
           "contract_differences"]
