"""Tests for rewards.py (the built-in rewards) and simple_grpo/gen/reward_registry.py (the machinery)."""

from __future__ import annotations

import logging
import math
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterator

import pytest

import rewards
from simple_grpo.errors import UserError
from simple_grpo.gen.reward_registry import (
    COMPLETION_TOKENS_KEY,
    MAX_COMPLETION_TOKENS_KEY,
    OVERLONG_CACHE_KEY,
    REWARDS,
    RewardResult,
    RewardSpec,
    combine,
    get_reward,
    load_rewards,
    parse_reward_specs,
    register,
    soft_overlong_punishment,
    with_completion_info,
)


def tagged(answer: str, think: str = "reasoning") -> str:
    """A well-formed completion with the given answer."""
    return f"<think>{think}</think><answer>{answer}</answer>"


@pytest.fixture
def registry() -> Iterator[dict]:
    """The reward registry, restored to its current content after the test."""
    saved = dict(REWARDS)
    yield REWARDS
    REWARDS.clear()
    REWARDS.update(saved)


# ------------------------------------------------------------------------------------ format


@pytest.mark.parametrize(
    "completion, expected",
    [
        ("<think>a</think><answer>b</answer>", 1.0),  # well-formed, no whitespace
        ("  \n<think>\nstep 1\nstep 2\n</think>\n\n<answer> 42 </answer>\n", 1.0),  # whitespace/newlines around and between
        ("<think></think><answer>42</answer>", 1.0),  # empty think is allowed
        ("<think>a</think><answer>  </answer>", 0.0),  # blank answer is not an answer
        ("<answer>42</answer>", 0.0),  # missing think block
        ("<think>a</think>", 0.0),  # missing answer block
        ("42", 0.0),  # no tags at all
        ("", 0.0),  # empty completion
        ("<think>a</think><answer>1</answer><answer>2</answer>", 0.0),  # two answers
        ("<think>a</think><think>b</think><answer>1</answer>", 0.0),  # two think blocks
        ("<answer>1</answer><think>a</think>", 0.0),  # answer before think
        ("<think>a<think>b</think></think><answer>1</answer>", 0.0),  # nested think
        ("<think>a<answer>0</answer></think><answer>1</answer>", 0.0),  # answer nested in think
        ("<think>a</think><answer><think>b</think>1</answer>", 0.0),  # think nested in answer
        ("Sure! <think>a</think><answer>1</answer>", 0.0),  # text before the blocks
        ("<think>a</think> so <answer>1</answer>", 0.0),  # text between the blocks
        ("<think>a</think><answer>1</answer> Done.", 0.0),  # text after the answer
        ("<think>a</think><answer>1<answer>", 0.0),  # malformed closing tag (opening tag instead)
        ("<think>a</think><answer>1</answer", 0.0),  # malformed closing tag (no '>')
        ("<think>a<think><answer>1</answer>", 0.0),  # think never closed
        ("<THINK>a</THINK><ANSWER>1</ANSWER>", 0.0),  # tags are case-sensitive
    ],
)
def test_format(completion: str, expected: float) -> None:
    assert rewards.format_reward(completion, {}) == expected, f"format({completion!r})"


# ------------------------------------------------------------------------------------ correct


@pytest.mark.parametrize(
    "completion, gold, expected",
    [
        (tagged("42"), "42", 1.0),  # plain integer
        (tagged("41"), "42", 0.0),  # wrong answer
        (tagged("-3"), "-3", 1.0),  # negative number
        (tagged("3"), "-3", 0.0),  # sign matters
        (tagged("0.5"), "\\frac{1}{2}", 1.0),  # decimal vs LaTeX fraction gold
        (tagged("\\frac{1}{2}"), "0.5", 1.0),  # bare LaTeX fraction vs decimal gold
        (tagged("\\boxed{7}"), "7", 1.0),  # boxed answer
        (tagged("$7$"), "7", 1.0),  # $-delimited answer
        (tagged("7"), "$7$", 1.0),  # $-delimited gold
        (tagged("x^{2}"), "$x^2$", 1.0),  # symbolic answer
        (tagged("2\\sqrt{2}"), "2\\sqrt{2}", 1.0),  # bare LaTeX with a command
        (tagged("2\\sqrt{2}"), "2", 0.0),  # bare LaTeX is not misread as its leading number
        (tagged("1,000"), "1000", 1.0),  # thousands separator in the answer
        (tagged("1000"), "1,000", 1.0),  # thousands separator in the gold
        (tagged("1,000 meters"), "1000", 1.0),  # number with a unit
        (tagged("18 dollars"), "18", 1.0),  # number followed by words
        (tagged("\\$18"), "18", 1.0),  # escaped dollar sign as currency
        (tagged("The answer is 42."), "42", 1.0),  # a sentence around the number
        (tagged("41 or 42"), "42", 0.0),  # hedging between two answers is not rewarded
        (tagged("2x"), "2", 0.0),  # an expression is not its coefficient
        (tagged("x = 5"), "5", 1.0),  # an equation assigning the answer
        (tagged("50%"), "0.5", 1.0),  # percentage
        (tagged(""), "42", 0.0),  # empty answer
        ("42", "42", 0.0),  # no answer tags at all: nothing to check
        ("", "42", 0.0),  # empty completion
        ("<think>42</think><answer>42", "42", 0.0),  # answer tag never closed
        ("<answer>1</answer> then <answer>42</answer>", "42", 1.0),  # the LAST answer counts
        ("<answer>42</answer> then <answer>1</answer>", "42", 0.0),  # ... even when an earlier one was right
        ("<answer>1<answer>42</answer>", "42", 1.0),  # unclosed first answer: the closed one counts
        ("<answer>42</answer>", "42", 1.0),  # format is not `correct`'s business
        (tagged("4" * 600), "4" * 600, 0.0),  # over MAX_ANSWER_CHARS: not a final answer
    ],
)
def test_correct(completion: str, gold: str, expected: float) -> None:
    assert rewards.correct(completion, {"answer": gold}) == expected, f"correct({completion!r}, gold={gold!r})"


def test_correct_unparseable_gold_raises() -> None:
    # A gold answer math-verify cannot read is a dataset problem: raise (the combiner logs it).
    with pytest.raises(ValueError, match="gold answer"):
        rewards.correct(tagged("1"), {"answer": ""})


def test_correct_from_worker_threads() -> None:
    # math-verify's default timeout uses signal.alarm, which raises ValueError outside the main
    # thread; rewards.py turns the timeout off there. The trainer may score in a thread pool.
    cases = [(tagged("\\frac{1}{2}"), "0.5", 1.0), (tagged("7"), "8", 0.0), (tagged("1,000"), "1000", 1.0)]
    with ThreadPoolExecutor(max_workers=2) as pool:
        results = list(pool.map(lambda c: rewards.correct(c[0], {"answer": c[1]}), cases))
    assert results == [c[2] for c in cases], f"thread results {results}"

    box: list[float] = []
    thread = threading.Thread(target=lambda: box.append(rewards.correct(tagged("42"), {"answer": "42"})))
    thread.start()
    thread.join(timeout=30)
    assert box == [1.0], f"threading.Thread result {box}"


@pytest.mark.parametrize(
    "completion, gold, expected",
    [
        (tagged("42"), "42", 1.0),  # with answer tags it behaves like `correct`
        ("<answer>41</answer> but 42", "42", 0.0),  # ... and the tag wins over later numbers
        ("3 + 4 = 7, so the total is 1,000 apples", "1000", 1.0),  # last number, with a comma
        ("The answer is 42. Check: 40 + 2", "42", 0.0),  # the LAST number counts: 2
        ("first \\boxed{3} then \\boxed{\\frac{1}{2}} and 9", "0.5", 1.0),  # last \boxed{} beats numbers
        ("\\boxed{\\frac{1}{\\sqrt{4}}}", "1/2", 1.0),  # nested braces inside \boxed{}
        ("it is 3.5", "3.5", 1.0),  # decimal number is read whole
        ("from 3-4", "4", 1.0),  # a hyphen between numbers is not a minus sign
        ("no numbers here", "1", 0.0),  # nothing to check
        ("", "1", 0.0),  # empty completion
    ],
)
def test_correct_lenient(completion: str, gold: str, expected: float) -> None:
    result = rewards.correct_lenient(completion, {"answer": gold})
    assert result == expected, f"correct_lenient({completion!r}, gold={gold!r}) = {result}"


# ------------------------------------------------------------------------------------ overlong


@pytest.mark.parametrize(
    "num_tokens, max_tokens, cache, expected",
    [
        (0, 100, 20, 0.0),  # empty completion: no punishment
        (80, 100, 20, 0.0),  # L = L_max - L_cache = 80: last length without punishment
        (81, 100, 20, -0.05),  # L = 81: (80 - 81) / 20 = -0.05
        (90, 100, 20, -0.5),  # middle of the cache: (80 - 90) / 20 = -0.5
        (100, 100, 20, -1.0),  # L = L_max: (80 - 100) / 20 = -1
        (101, 100, 20, -1.0),  # L = L_max + 1: beyond the limit, -1
        (81, 100, None, -0.05),  # default cache = 0.2 * 100 = 20: same as above
        (1, 10, 10, -0.1),  # cache = L_max: punishment starts right away, (0 - 1) / 10
        (4, 4, None, -1.0),  # tiny L_max: default cache round(0.8) = 1, (3 - 4) / 1
    ],
)
def test_soft_overlong_punishment(num_tokens: int, max_tokens: int, cache: int | None, expected: float) -> None:
    result = soft_overlong_punishment(num_tokens, max_tokens, cache)
    assert math.isclose(result, expected), f"L={num_tokens} L_max={max_tokens} cache={cache}: {result}"


@pytest.mark.parametrize(
    "num_tokens, max_tokens, cache, error",
    [
        (10, 100, 0, UserError),  # cache must be > 0
        (10, 100, -5, UserError),  # negative cache
        (10, 100, 101, UserError),  # cache larger than L_max
        (10, 100, 2.5, UserError),  # non-integer cache
        (10, 0, None, UserError),  # L_max must be positive
        (-1, 100, 20, ValueError),  # negative token count is a bug
        (1.5, 100, 20, ValueError),  # token count must be an int
    ],
)
def test_soft_overlong_punishment_validates(num_tokens: int, max_tokens: int, cache: int | None, error: type) -> None:
    with pytest.raises(error):
        soft_overlong_punishment(num_tokens, max_tokens, cache)


def test_overlong_reward_reads_example_keys() -> None:
    # The reward reads the trainer's "_" keys; with_completion_info sets them on a copy.
    example = {"answer": "1"}
    info = with_completion_info(example, num_tokens=90, max_tokens=100, overlong_cache=20)
    assert rewards.overlong("text", info) == -0.5, "(80 - 90) / 20"
    assert COMPLETION_TOKENS_KEY not in example, "with_completion_info must not modify its input"
    info = {COMPLETION_TOKENS_KEY: 81, MAX_COMPLETION_TOKENS_KEY: 100}
    assert math.isclose(rewards.overlong("text", info), -0.05), "default cache 20"
    assert rewards.overlong("", {**info, OVERLONG_CACHE_KEY: 19}) == 0.0, "81 <= 100 - 19"
    with pytest.raises(KeyError, match="_completion_tokens"):
        rewards.overlong("text", {"answer": "1"})


# ------------------------------------------------------------------------------------ registry


def test_builtins_registered_and_defaults_valid() -> None:
    for name in ("format", "correct", "correct_lenient", "overlong"):
        assert name in REWARDS, f"built-in reward {name!r} not registered"
    assert all(spec.name in REWARDS for spec in rewards.DEFAULT_REWARDS + rewards.TAGGED_REWARDS), "defaults"


def test_register_rejects_bad_and_duplicate_names(registry: dict) -> None:
    with pytest.raises(UserError, match="bad reward name"):
        register("a:b")
    with pytest.raises(UserError, match="registered twice"):
        register("format")(lambda c, e: 0.0)


def test_unknown_reward_lists_available_names() -> None:
    with pytest.raises(UserError, match=r"unknown reward 'nope'.*correct.*format"):
        get_reward("nope")
    with pytest.raises(UserError, match="unknown reward 'nope'"):
        combine(["x"], [{}], [RewardSpec("nope")])


def test_load_rewards_from_file(tmp_path: Path, registry: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    # Users may point the trainer at their own rewards file.
    monkeypatch.setitem(sys.modules, "rewards", sys.modules["rewards"])  # restored afterwards
    path = tmp_path / "my_rewards.py"
    path.write_text("from simple_grpo.gen.reward_registry import register\n"
                    "@register('my_len')\ndef my_len(c, e):\n    return float(len(c))\n")
    module = load_rewards(path)
    assert module.my_len("abc", {}) == 3.0 and get_reward("my_len") is module.my_len, "loaded reward"
    with pytest.raises(UserError, match="does not exist"):
        load_rewards(tmp_path / "missing.py")


@pytest.mark.parametrize(
    "text, expected",
    [
        ("format:0.5,correct:1.0,overlong", [("format", 0.5), ("correct", 1.0), ("overlong", 1.0)]),  # docs example
        ("correct", [("correct", 1.0)]),  # single name, default weight
        (" format : 0.5 , correct ", [("format", 0.5), ("correct", 1.0)]),  # spaces are ignored
        ("format:0,correct:-1e-1", [("format", 0.0), ("correct", -0.1)]),  # zero and negative weights
    ],
)
def test_parse_reward_specs(text: str, expected: list[tuple[str, float]]) -> None:
    specs = parse_reward_specs(text)
    assert [(s.name, s.weight) for s in specs] == expected, f"parse_reward_specs({text!r})"


@pytest.mark.parametrize(
    "text, message",
    [
        ("format:abc", "bad weight 'abc'"),  # weight is not a number
        ("format:", "bad weight ''"),  # empty weight
        ("format:nan", "finite"),  # NaN weight
        ("format:inf", "finite"),  # infinite weight
        ("format,,correct", "bad reward list"),  # empty item
        ("", "bad reward list"),  # nothing at all
        (":0.5", "missing name"),  # weight without a name
        ("format,format:2", "listed twice"),  # duplicate name
        ("formatt", "unknown reward 'formatt'"),  # typo in a name
    ],
)
def test_parse_reward_specs_errors(text: str, message: str) -> None:
    with pytest.raises(UserError, match=message):
        parse_reward_specs(text)


# ------------------------------------------------------------------------------------ combine


def test_combine_weights_totals_and_unweighted_breakdown() -> None:
    completions = [tagged("42"), tagged("41"), "42"]
    examples = [{"answer": "42"}] * 3
    specs = [RewardSpec("format", 0.5), RewardSpec("correct", 2.0)]
    result = combine(completions, examples, specs)
    assert isinstance(result, RewardResult), "combine returns a RewardResult"
    assert result.totals == [2.5, 0.5, 0.0], f"0.5*format + 2*correct: {result.totals}"
    assert result.breakdown == {"format": [1.0, 1.0, 0.0], "correct": [1.0, 0.0, 0.0]}, "unweighted"
    assert result.failures == {}, "no failures"
    totals, breakdown, failures = result  # also unpacks as a tuple
    assert totals == result.totals and breakdown is result.breakdown and failures == {}, "unpacking"


def test_combine_counts_failures_and_logs_once(registry: dict, caplog: pytest.LogCaptureFixture) -> None:
    def boom(completion: str, example: dict) -> float:
        raise RuntimeError(f"kaboom on {completion}")

    def nan_on_b(completion: str, example: dict) -> float:
        return float("nan") if completion == "b" else 1.0

    register("boom")(boom)
    register("nan_on_b")(nan_on_b)
    register("returns_none")(lambda c, e: None)
    seen: list[tuple[str, int]] = []
    specs = [RewardSpec("boom", 1.0), RewardSpec("nan_on_b", 2.0), RewardSpec("returns_none", 1.0)]
    with caplog.at_level(logging.WARNING, logger="simple_grpo.rewards"):
        result = combine(["a", "b"], [{}, {}], specs, failure_value=-0.5,
                         on_failure=lambda name, i, err: seen.append((name, i)))
    # boom: -0.5 both; nan_on_b: 1.0 then failure -0.5, weighted by 2; returns_none: -0.5 both.
    assert result.totals == [-0.5 + 2.0 - 0.5, -0.5 - 1.0 - 0.5], f"totals {result.totals}"
    assert result.breakdown["nan_on_b"] == [1.0, -0.5], "breakdown holds failure_value, unweighted"
    assert result.failures == {"boom": 2, "nan_on_b": 1, "returns_none": 2}, f"failures {result.failures}"
    assert seen == [("boom", 0), ("boom", 1), ("nan_on_b", 1), ("returns_none", 0), ("returns_none", 1)], "hook"
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 3, f"one warning per failing reward per call: {messages}"
    assert "'boom'" in messages[0] and "RuntimeError: kaboom on a" in messages[0], messages[0]
    assert "'nan_on_b'" in messages[1] and "nan" in messages[1], messages[1]
    assert "'returns_none'" in messages[2] and "NoneType" in messages[2], messages[2]


def test_combine_overlong_without_trainer_keys_is_a_failure(caplog: pytest.LogCaptureFixture) -> None:
    # A trainer that forgot the "_" keys gets a logged failure naming the key, not a crash.
    with caplog.at_level(logging.WARNING, logger="simple_grpo.rewards"):
        result = combine(["x"], [{}], parse_reward_specs("overlong"))
    assert result.failures == {"overlong": 1} and result.totals == [0.0], f"result {result}"
    assert "_completion_tokens" in caplog.text, caplog.text


def test_combine_rejects_mismatched_lengths() -> None:
    with pytest.raises(ValueError, match="2 completions but 1 examples"):
        combine(["a", "b"], [{}], [RewardSpec("format")])
