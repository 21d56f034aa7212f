"""The reward functions: edit this file to change what the model is trained towards.

A reward is a plain function ``(completion: str, example: dict) -> float`` registered under a
name with ``@register("name")``; pick rewards on the command line with
``--rewards format:0.5,correct:1.0,overlong`` (``name[:weight]``, weight 1.0 if left out).
Rewards of your own can also live in a file of their own, registered the same way and loaded
beside these with ``--rewards_file my_rewards.py`` (its ``DEFAULT_REWARDS``, if any, is then the
default).

``example`` is the dataset row (``example["answer"]`` is the gold answer string, e.g. ``"42"``,
``"\\frac{1}{2}"``, ``"$x^2$"``) plus a few keys the trainer adds (see
``simple_grpo/gen/reward_registry.py``): ``"_completion_tokens"``, ``"_max_completion_tokens"`` and
optionally ``"_overlong_cache"``. Do not modify ``example``.

A reward that raises or returns NaN does not stop training: it counts as ``--reward_failure_value``
(default 0) and is logged.

Example of a new reward::

    @register("short")
    def short(completion: str, example: dict) -> float:
        return 1.0 if len(completion) < 200 else 0.0
"""

from __future__ import annotations

import re
import threading

from math_verify import parse, verify

from simple_grpo.gen.reward_registry import (
    COMPLETION_TOKENS_KEY,
    MAX_COMPLETION_TOKENS_KEY,
    OVERLONG_CACHE_KEY,
    RewardSpec,
    register,
    soft_overlong_punishment,
)

# Used when --rewards is not given. The default run's 135M model never writes <answer> tags, so
# it is rewarded for the right final number anywhere (`correct_lenient`); models that follow the
# tag format train better with TAGGED_REWARDS: format at half the weight of correctness, enough
# to pick up the tags early, small enough that a well-formatted wrong answer (0.5) never beats a
# correct one (1.5). DAPO's soft overlong punishment is added by the trainer (--overlong_reward).
DEFAULT_REWARDS = [RewardSpec("correct_lenient", 1.0)]
TAGGED_REWARDS = [RewardSpec("format", 0.5), RewardSpec("correct", 1.0)]


# --------------------------------------------------------------------------------------------
# format: exactly "<think>...</think> <answer>...</answer>", nothing else
# --------------------------------------------------------------------------------------------

# Whitespace (spaces, newlines) is allowed around and between the two blocks.
_FORMAT = re.compile(r"\s*<think>(.*?)</think>\s*<answer>(.*?)</answer>\s*", re.DOTALL)
# Any think/answer tag, to refuse extra or nested tags inside either block.
_ANY_TAG = re.compile(r"</?\s*(?:think|answer)\s*>", re.IGNORECASE)


@register("format")
def format_reward(completion: str, example: dict) -> float:
    """1.0 if the completion is one <think> block then one non-empty <answer> block, else 0.0."""
    match = _FORMAT.fullmatch(completion)
    if match is None:
        return 0.0
    think, answer = match.groups()
    # Every character outside the two groups is a tag or whitespace, so any extra tag
    # (a second answer, a nested <think>, ...) ends up inside one of the groups.
    if _ANY_TAG.search(think) or _ANY_TAG.search(answer) or not answer.strip():
        return 0.0
    return 1.0


# --------------------------------------------------------------------------------------------
# correct / correct_lenient: the answer is mathematically equal to example["answer"]
# --------------------------------------------------------------------------------------------

# Content of an <answer> block that contains no other <answer> opening tag.
_ANSWER = re.compile(r"<answer>((?:(?!<answer>).)*?)</answer>", re.DOTALL)
# Longer "answers" are not final answers; the cap also keeps math-verify fast (see below).
MAX_ANSWER_CHARS = 500


def last_answer(completion: str) -> str | None:
    """The stripped content of the LAST <answer>...</answer> block, or None if there is none."""
    answers = _ANSWER.findall(completion)
    return answers[-1].strip() if answers else None


@register("correct")
def correct(completion: str, example: dict) -> float:
    """1.0 if the last <answer> block equals example["answer"] (checked by math-verify), else 0.0."""
    answer = last_answer(completion)
    if answer is None:
        return 0.0
    return 1.0 if is_equivalent(answer, str(example["answer"])) else 0.0


# A number as written in prose: "1,000", "-3", "2.5" (not the "4" of "3.4" nor the "-4" of "3-4").
_NUMBER = re.compile(r"(?<![\w.])-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?")


@register("correct_lenient")
def correct_lenient(completion: str, example: dict) -> float:
    """Like `correct`, but without <answer> tags it checks the last \\boxed{...}, or else the
    last number, anywhere in the completion. For base models that do not use the tags."""
    answer = last_answer(completion)
    if answer is None:
        answer = last_boxed(completion)
    if answer is None:
        numbers = _NUMBER.findall(completion)
        answer = numbers[-1] if numbers else None
    if answer is None:
        return 0.0
    return 1.0 if is_equivalent(answer, str(example["answer"])) else 0.0


def last_boxed(text: str) -> str | None:
    """The content of the last ``\\boxed{...}`` (nested braces allowed), or None."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    depth, begin = 0, start + len("\\boxed{")
    for i in range(begin - 1, len(text)):
        depth += {"{": 1, "}": -1}.get(text[i], 0)
        if depth == 0:
            return text[begin:i]
    return None  # unbalanced braces: cut off mid-answer


# ---- math-verify plumbing -------------------------------------------------------------------
#
# math_verify.parse(text) extracts LaTeX ($...$, \(...\), \boxed{}) and plain expressions
# ("1,000", "1/2"); verify(gold, answer) compares the parsed results (numbers, fractions,
# percentages, sets, equations "x = 5", ...). Two things to know:
# * Bare LaTeX without $ is misread by the plain-expression extractor: "2\sqrt{2}" parses as 2.
#   So bare answers are parsed wrapped in $...$, and plain only for "a number among words".
# * Its timeouts use signal.alarm, which only works in the main thread: from any other thread
#   parse/verify raise ValueError (even with raise_on_error=False). Off the main thread we pass
#   timeout None, which disables the timeout (math-verify logs a warning about it once); the
#   MAX_ANSWER_CHARS cap keeps the unguarded parsing short.

MATH_VERIFY_TIMEOUT_S = 5

# Already delimited: $...$, \(...\), \[...\] or \boxed{...}.
_DELIMITED = re.compile(r"\$|\\\(|\\\[|\\boxed\{")
# A single number among words: "42", "The answer is 42.", "18 dollars", "50%", "1,000 meters".
_NUMBER_AMONG_WORDS = re.compile(
    r"(?:[A-Za-z][A-Za-z :]*\s)?-?\d[\d,]*(?:\.\d+)?(?:\s*%|\s+[A-Za-z][A-Za-z ]*)?\.?"
)


def _timeout() -> int | None:
    """math-verify's timeout in seconds: only usable in the main thread (signal.alarm)."""
    return MATH_VERIFY_TIMEOUT_S if threading.current_thread() is threading.main_thread() else None


def _parse(text: str) -> list:
    """math_verify.parse with both LaTeX and plain-expression extraction (its default)."""
    return parse(text, parsing_timeout=_timeout())


def _candidates(text: str) -> list[str]:
    """The ways to hand ``text`` to math-verify, most faithful first."""
    if _DELIMITED.search(text):
        return [text, f"${text}$"]  # "$7$", "\boxed{7}"; wrapping rescues "\$5"
    candidates = [f"${text}$"]  # bare LaTeX or a plain number: "\frac{1}{2}", "0.5", "x = 5"
    if _NUMBER_AMONG_WORDS.fullmatch(text):
        candidates.append(text)  # "18 dollars": as LaTeX this would be 18*d*o*l*l*a*r*s
    return candidates


def is_equivalent(answer: str, gold: str) -> bool:
    """Whether ``answer`` is mathematically equal to the gold answer, according to math-verify.

    Raises ValueError if the gold answer cannot be parsed at all (a dataset problem).
    """
    if not answer or len(answer) > MAX_ANSWER_CHARS:
        return False
    gold_parsed = next((p for p in map(_parse, _candidates(gold.strip())) if p), None)
    if gold_parsed is None:
        raise ValueError(f"math-verify cannot parse the gold answer {gold!r}")
    # verify(gold, answer): argument order matters (gold first).
    return any(
        verify(gold_parsed, _parse(candidate), timeout_seconds=_timeout())
        for candidate in _candidates(answer)
    )


# --------------------------------------------------------------------------------------------
# overlong: DAPO's soft punishment for completions near or past the generation limit
# --------------------------------------------------------------------------------------------


@register("overlong")
def overlong(completion: str, example: dict) -> float:
    """0 for completions up to L_max - L_cache tokens, then linearly down to -1 at L_max,
    and -1 beyond (see soft_overlong_punishment). Needs the trainer's "_..." keys."""
    for key in (COMPLETION_TOKENS_KEY, MAX_COMPLETION_TOKENS_KEY):
        if key not in example:
            raise KeyError(f"'overlong' needs example[{key!r}], which the trainer sets")
    return soft_overlong_punishment(
        example[COMPLETION_TOKENS_KEY],
        example[MAX_COMPLETION_TOKENS_KEY],
        example.get(OVERLONG_CACHE_KEY),
    )
