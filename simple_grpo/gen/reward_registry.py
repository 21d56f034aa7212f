"""Reward machinery: a registry of reward functions by name, weighted combination, CLI parsing.

A reward function is a plain ``(completion: str, example: dict) -> float``. The user-facing ones
live in the top-level ``rewards.py`` and register themselves with ``@register("name")``; a user's
own file of them is loaded beside those with ``--rewards_file=my_rewards.py``
(:func:`load_rewards_file`).

Besides the dataset's own fields (``"prompt"``, ``"answer"``, ...), the trainer puts a few
generation facts into each example dict before calling the rewards. Their keys start with an
underscore so they cannot clash with dataset columns (use :func:`with_completion_info`):

* ``"_completion_tokens"``      (int) number of tokens in this completion (EOS included if sampled).
* ``"_max_completion_tokens"``  (int) the generation limit L_max (``max_new_tokens``).
* ``"_overlong_cache"``         (int, optional) DAPO's L_cache; default ``0.2 * L_max``.

Reward functions must not mutate the example dict: the same dict is passed to every reward.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import math
import numbers
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from simple_grpo.errors import UserError

COMPLETION_TOKENS_KEY = "_completion_tokens"
MAX_COMPLETION_TOKENS_KEY = "_max_completion_tokens"
OVERLONG_CACHE_KEY = "_overlong_cache"
DEFAULT_OVERLONG_CACHE_FRACTION = 0.2  # DAPO: L_cache = 4096 for L_max = 20480

RewardFn = Callable[[str, dict], float]
FailureHook = Callable[[str, int, Exception], None]

REWARDS: dict[str, RewardFn] = {}
"""Every registered reward function, by name."""

logger = logging.getLogger("simple_grpo.rewards")

_REWARDS_MODULE = "rewards"  # the top-level rewards.py users edit


def register(name: str) -> Callable[[RewardFn], RewardFn]:
    """Decorator: ``@register("format")`` adds the function to :data:`REWARDS` under ``name``.

    Names may not contain ``:`` or ``,`` (they are used by :func:`parse_reward_specs`). Registering
    a different function under a taken name is a :class:`UserError`; re-registering the same
    function (same module and qualified name, e.g. when ``rewards.py`` is reloaded) replaces it.
    """
    if not isinstance(name, str) or not name.strip() or any(c in name for c in ":, \t\n"):
        raise UserError(f"bad reward name {name!r}: use a non-empty name without ':', ',' or spaces")

    def decorator(fn: RewardFn) -> RewardFn:
        old = REWARDS.get(name)
        if old is not None and _qualname(old) != _qualname(fn):
            raise UserError(
                f"reward name {name!r} is registered twice ({_qualname(old)} and {_qualname(fn)}); "
                "rename one of them"
            )
        REWARDS[name] = fn
        return fn

    return decorator


def _qualname(fn: Callable[..., Any]) -> str:
    """``module.qualname`` of a function, for messages and duplicate detection."""
    return f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', repr(fn))}"


def load_rewards(path: str | Path | None = None) -> Any:
    """Import the rewards module so that its ``@register`` calls run, and return it.

    With no ``path``, imports the top-level ``rewards`` module (``rewards.py`` at the repo root,
    which must be on ``sys.path``). With a path, loads that file as the module ``rewards``, in
    place of rewards.py (``--rewards_file`` adds a file beside it instead: :func:`load_rewards_file`).
    The module's ``DEFAULT_REWARDS`` holds the default list of :class:`RewardSpec`.
    """
    if path is None:
        try:
            return importlib.import_module(_REWARDS_MODULE)
        except ModuleNotFoundError as e:
            if e.name != _REWARDS_MODULE:
                raise
            raise UserError(
                "cannot import rewards.py: run from the repository root or pass the file's path"
            ) from e
    file = Path(path)
    if not file.is_file():
        raise UserError(f"rewards file {str(file)!r} does not exist")
    spec = importlib.util.spec_from_file_location(_REWARDS_MODULE, file)
    if spec is None or spec.loader is None:
        raise UserError(f"cannot load {str(file)!r} as a Python module")
    module = importlib.util.module_from_spec(spec)
    sys.modules[_REWARDS_MODULE] = module
    spec.loader.exec_module(module)
    return module


def load_rewards_file(path: str | Path) -> Any:
    """``--rewards_file``: import the user's file of reward functions after ``rewards.py``, so its
    ``@register`` names join the built-in ones (a name taken twice is a :class:`UserError`), and
    return it (its optional ``DEFAULT_REWARDS`` replaces rewards.py's). Loaded once per file."""
    file = Path(path).expanduser().resolve()
    if not file.is_file():
        raise UserError(f"--rewards_file {str(path)!r} does not exist")
    import hashlib

    name = f"user_rewards_{file.stem}_{hashlib.sha1(str(file).encode()).hexdigest()[:8]}"  # one per file
    if name in sys.modules:
        return sys.modules[name]
    try:
        load_rewards()  # the built-in rewards first
    except UserError:
        pass  # rewards.py not importable from here: the user's file alone
    spec = importlib.util.spec_from_file_location(name, file)
    if spec is None or spec.loader is None:
        raise UserError(f"--rewards_file {str(path)!r} cannot be loaded as a Python module")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except UserError:
        del sys.modules[name]
        raise
    except Exception as e:  # noqa: BLE001 - the user's code: say where it failed, in one line
        del sys.modules[name]
        import traceback

        frames = [f for f in traceback.extract_tb(e.__traceback__) if f.filename == str(file)]
        line = e.lineno if isinstance(e, SyntaxError) else (frames[-1].lineno if frames else None)
        raise UserError(f"--rewards_file {str(path)!r} failed to load{f' at line {line}' if line else ''}: "
                        f"{type(e).__name__}: {e}") from None
    return module


def default_rewards(rewards_file: str | Path | None = None) -> list[RewardSpec]:
    """The rewards used without --rewards: ``DEFAULT_REWARDS`` of the --rewards_file when it has
    one, else rewards.py's."""
    user = load_rewards_file(rewards_file) if rewards_file else None
    where = rewards_file if getattr(user, "DEFAULT_REWARDS", None) else "rewards.py"
    specs = getattr(user, "DEFAULT_REWARDS", None) or load_rewards().DEFAULT_REWARDS
    if isinstance(specs, str):  # the --rewards form, "name:weight,..."
        return parse_reward_specs(specs)
    if not isinstance(specs, (list, tuple)) or not all(isinstance(x, RewardSpec) for x in specs):
        raise UserError(f"DEFAULT_REWARDS in {where} must be a list of RewardSpec(name, weight) or a string "
                        f"like 'correct:1.0,format:0.5', got {specs!r:.80}")
    return list(specs)


def get_reward(name: str) -> RewardFn:
    """The reward function registered as ``name``; a :class:`UserError` listing names if unknown.

    If the name is unknown and ``rewards.py`` was not imported yet, it is imported first.
    """
    if name not in REWARDS and _REWARDS_MODULE not in sys.modules:
        try:
            load_rewards()
        except UserError:
            pass  # fall through to the "unknown reward" message below
    if name not in REWARDS:
        available = ", ".join(sorted(REWARDS)) or "(none: is rewards.py importable?)"
        raise UserError(f"unknown reward {name!r}; available rewards: {available}")
    return REWARDS[name]


@dataclass
class RewardSpec:
    """One reward in the mix: a registered name and its weight in the total."""

    name: str
    weight: float = 1.0


def parse_reward_specs(text: str) -> list[RewardSpec]:
    """Parse the CLI form ``"format:0.5,correct:1.0,overlong"`` (``name[:weight]``, weight 1.0).

    Weights must be finite numbers (0 is allowed: the reward is logged but not trained on;
    negative weights are allowed). Names are checked against the registry; duplicates are refused.
    """
    specs: list[RewardSpec] = []
    items = [item.strip() for item in text.split(",")]
    if not text.strip() or any(not item for item in items):
        raise UserError(f"bad reward list {text!r}: expected 'name[:weight],...' e.g. 'format:0.5,correct'")
    for item in items:
        name, sep, weight_text = (part.strip() for part in item.partition(":"))
        if not name:
            raise UserError(f"bad reward {item!r} in {text!r}: missing name before ':'")
        weight = 1.0
        if sep:
            try:
                weight = float(weight_text)
            except ValueError:
                raise UserError(f"bad weight {weight_text!r} for reward {name!r}: expected a number") from None
        specs.append(RewardSpec(name, weight))
    validate_specs(specs)
    return specs


def validate_specs(specs: list[RewardSpec]) -> None:
    """Check names exist, are not repeated, and weights are finite; :class:`UserError` otherwise."""
    if not specs:
        raise UserError("no rewards given: at least one reward is needed")
    seen: set[str] = set()
    for spec in specs:
        get_reward(spec.name)  # raises UserError listing the available names
        if spec.name in seen:
            raise UserError(f"reward {spec.name!r} is listed twice; give it once with the summed weight")
        seen.add(spec.name)
        if isinstance(spec.weight, bool) or not isinstance(spec.weight, numbers.Real) or not math.isfinite(spec.weight):
            raise UserError(f"bad weight {spec.weight!r} for reward {spec.name!r}: expected a finite number")


@dataclass
class RewardResult:
    """What :func:`combine` returns; unpacks as ``totals, breakdown, failures = combine(...)``."""

    totals: list[float]
    """Weighted sum of the rewards, one per completion."""
    breakdown: dict[str, list[float]] = field(default_factory=dict)
    """UNWEIGHTED value of each reward function (by name), one per completion."""
    failures: dict[str, int] = field(default_factory=dict)
    """How many completions each reward failed on (raised, or returned NaN/inf/non-number)."""

    def __iter__(self) -> Iterator[Any]:
        return iter((self.totals, self.breakdown, self.failures))


def combine(
    completions: list[str],
    examples: list[dict],
    specs: list[RewardSpec],
    *,
    failure_value: float = 0.0,
    on_failure: FailureHook | None = None,
) -> RewardResult:
    """Score every completion with every reward in ``specs`` and sum them with their weights.

    ``examples[i]`` is the example (dataset row plus the ``_``-keys above) of ``completions[i]``.
    A reward that raises or returns something other than a finite number does NOT stop training:
    its value becomes ``failure_value``, ``failures[name]`` counts it, ``on_failure(name, index,
    error)`` is called if given, and one warning per failing reward per call is logged to the
    ``"simple_grpo.rewards"`` logger with the reward's name and its first error.
    """
    if len(completions) != len(examples):
        raise ValueError(f"{len(completions)} completions but {len(examples)} examples")
    validate_specs(specs)
    fns = [(spec, get_reward(spec.name)) for spec in specs]
    totals = [0.0] * len(completions)
    breakdown: dict[str, list[float]] = {}
    failures: dict[str, int] = {}
    for spec, fn in fns:
        values: list[float] = []
        first_error: Exception | None = None
        for i, (completion, example) in enumerate(zip(completions, examples)):
            try:
                value = _as_finite_float(fn(completion, example))
            # A user's reward may fail in any way; one bad completion must not kill a training run.
            # BaseException (KeyboardInterrupt, SystemExit) still propagates.
            except Exception as error:  # noqa: BLE001
                value = float(failure_value)
                failures[spec.name] = failures.get(spec.name, 0) + 1
                if first_error is None:
                    first_error = error
                if on_failure is not None:
                    on_failure(spec.name, i, error)
            values.append(value)
            totals[i] += spec.weight * value
        breakdown[spec.name] = values
        if first_error is not None:
            logger.warning(
                "reward %r (%s) failed on %d of %d completions, counted as %s; first error: %s: %s",
                spec.name, _qualname(fn), failures[spec.name], len(completions), failure_value,
                type(first_error).__name__, first_error,
            )
            logger.debug("traceback of the first %r failure", spec.name, exc_info=first_error)
    return RewardResult(totals, breakdown, failures)


def _as_finite_float(value: object) -> float:
    """``float(value)`` for a finite real number; ``ValueError``/``TypeError`` otherwise."""
    if not isinstance(value, numbers.Real):  # bool is accepted (True -> 1.0); None, str, tensors are not
        raise TypeError(f"returned {type(value).__name__} {value!r:.80}, expected a float")
    result = float(value)
    if not math.isfinite(result):
        raise ValueError(f"returned {result}, expected a finite float")
    return result


def with_completion_info(
    example: dict, num_tokens: int, max_tokens: int, overlong_cache: int | None = None
) -> dict:
    """A shallow copy of ``example`` with the ``_``-keys above set (what the trainer passes on)."""
    info = dict(example)
    info[COMPLETION_TOKENS_KEY] = num_tokens
    info[MAX_COMPLETION_TOKENS_KEY] = max_tokens
    if overlong_cache is not None:
        info[OVERLONG_CACHE_KEY] = overlong_cache
    return info


def soft_overlong_punishment(num_tokens: int, max_tokens: int, cache: int | None = None) -> float:
    """DAPO's soft overlong punishment for a completion of ``num_tokens`` tokens (L).

    With L_max = ``max_tokens`` and L_cache = ``cache`` (default ``0.2 * max_tokens``, at least 1)::

        0                                 if L <= L_max - L_cache
        ((L_max - L_cache) - L) / L_cache if L_max - L_cache < L <= L_max   (from just below 0 to -1)
        -1                                if L > L_max

    ``max_tokens`` must be a positive int and ``cache`` an int in ``(0, max_tokens]``
    (:class:`UserError` otherwise: they come from the configuration); ``num_tokens`` must be a
    non-negative int (``ValueError``).
    """
    if not _is_int(max_tokens) or max_tokens <= 0:
        raise UserError(f"max completion tokens must be a positive integer, got {max_tokens!r}")
    if cache is None:
        cache = max(1, round(DEFAULT_OVERLONG_CACHE_FRACTION * max_tokens))
    if not _is_int(cache) or not 0 < cache <= max_tokens:
        raise UserError(f"overlong cache must be an integer in (0, {max_tokens}], got {cache!r}")
    if not _is_int(num_tokens) or num_tokens < 0:
        raise ValueError(f"completion token count must be a non-negative integer, got {num_tokens!r}")
    safe = max_tokens - cache
    if num_tokens <= safe:
        return 0.0
    if num_tokens <= max_tokens:
        return float(safe - num_tokens) / float(cache)
    return -1.0


def _is_int(value: object) -> bool:
    """True for Python/NumPy integers, False for bools, floats and the rest."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def reward_specs(cfg) -> list[RewardSpec]:
    """The configured reward functions, plus DAPO's soft overlong punishment when enabled."""
    if cfg.rewards_file:  # the user's reward functions, beside rewards.py's
        load_rewards_file(cfg.rewards_file)
    if cfg.rewards is None:
        specs = default_rewards(cfg.rewards_file)
    else:
        specs = parse_reward_specs(cfg.rewards)
    if cfg.overlong_reward and not any(s.name == "overlong" for s in specs):
        specs.append(RewardSpec("overlong", 1.0))
    return specs
