"""Tasks, prompts and the prompt stream of simple_grpo.gen.data (no network: files are in tmp_path)."""
import json
import re

import pytest

from simple_grpo.errors import UserError
from simple_grpo.models import build_tiny_tokenizer
from simple_grpo.gen import data
from simple_grpo.gen.data import (DEFAULT_SYSTEM_PROMPT, PromptStream, load_examples,
                              normalize_answer, render_prompt)


def _pair(example: dict) -> tuple[int, int]:
    a, b = re.fullmatch(r"What is (\d+) \+ (\d+)\?", example["question"]).groups()
    return int(a), int(b)


@pytest.mark.parametrize("task,n_train,n_test,lo,hi", [
    ("arithmetic", 80, 20, 0, 9),        # all 100 single-digit pairs, 20 held out
    ("arithmetic2", 8000, 100, 10, 99),  # all 8100 two-digit pairs, 100 held out
])
def test_arithmetic_splits(task, n_train, n_test, lo, hi):
    train, test = load_examples(task, "train"), load_examples(task, "test")
    assert (len(train), len(test)) == (n_train, n_test)
    train_pairs, test_pairs = {_pair(e) for e in train}, {_pair(e) for e in test}
    assert not train_pairs & test_pairs, "a pair is in both splits"
    assert train_pairs | test_pairs == {(a, b) for a in range(lo, hi + 1) for b in range(lo, hi + 1)}
    for e in train + test:
        assert e["answer"] == str(sum(_pair(e)))
    # the held-out pairs are fixed: they do not depend on the run's seed
    assert load_examples(task, "test", seed=5) == test


def test_arithmetic_size_subsamples_by_seed():
    a, b = load_examples("arithmetic", size=10, seed=1), load_examples("arithmetic", size=10, seed=2)
    assert len(a) == 10 and a != b
    assert a == load_examples("arithmetic", size=10, seed=1)


@pytest.mark.parametrize("raw,want", [
    ("Natalia sold 48 clips.\n#### 72", "72"),  # GSM8K: the number after ####
    ("a #### b\n#### 1,234", "1234"),           # the last ####, commas removed
    ("#### -5 ", "-5"),                          # whitespace stripped
    (" 7 ", "7"),                                # plain answers are stripped
    (42, "42"),                                  # numbers become strings
    (3.0, "3"),                                  # integral floats lose ".0"
    (2.5, "2.5"),
])
def test_normalize_answer(raw, want):
    assert normalize_answer(raw) == want


def _write(path, rows, fmt):
    if fmt == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif fmt == "json":
        path.write_text(json.dumps(rows))
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq
        pq.write_table(pa.Table.from_pylist(rows), path)


@pytest.mark.parametrize("fmt", ["jsonl", "json", "parquet"])
def test_local_file_custom_fields_and_sibling_test_split(tmp_path, fmt):
    rows = [{"problem": f"q{i}", "solution": f"work\n#### {i},000", "id": i} for i in range(5)]
    _write(tmp_path / f"d.{fmt}", rows, fmt)
    _write(tmp_path / f"d.test.{fmt}", rows[:2], fmt)  # sibling test file: d.test.<ext>
    kw = dict(question_field="problem", answer_field="solution")
    train = load_examples(str(tmp_path / f"d.{fmt}"), **kw)
    assert [e["question"] for e in train] == [f"q{i}" for i in range(5)]
    assert [e["answer"] for e in train] == [f"{i}000" for i in range(5)]
    assert train[3]["id"] == 3, "other fields are kept"
    assert len(load_examples(str(tmp_path / f"d.{fmt}"), "test", **kw)) == 2


def test_split_placeholder_in_path(tmp_path):
    # a path containing {split} is formatted with the split name
    _write(tmp_path / "train.jsonl", [{"question": "a", "answer": "1"}], "jsonl")
    _write(tmp_path / "test.jsonl", [{"question": "b", "answer": "2"}], "jsonl")
    task = str(tmp_path / "{split}.jsonl")
    assert load_examples(task, "train")[0]["question"] == "a"
    assert load_examples(task, "test")[0]["question"] == "b"


def test_json_lines_in_dot_json(tmp_path):
    # a .json file that holds JSON lines (as HF datasets writes them) also reads
    _write(tmp_path / "d.json", [{"question": "a", "answer": 1}, {"question": "b", "answer": 2}],
           "jsonl")
    assert [e["answer"] for e in load_examples(str(tmp_path / "d.json"))] == ["1", "2"]


@pytest.mark.parametrize("setup,task,split,kwargs,match", [
    # missing answer field: names the field, the fields present, and the option
    ("rows", "d.jsonl", "train", {}, r"no field 'answer' \(its fields: question, sol\).*--answer_field="),
    # missing question field: names --question_field
    ("rows", "d.jsonl", "train", {"question_field": "prompt"}, r"no field 'prompt'.*--question_field="),
    # no test file beside the train file: says how to give one
    ("rows", "d.jsonl", "test", {}, r"no test split.*d\.test\.jsonl.*\{split\}"),
    # empty data
    ("empty", "d.jsonl", "train", {}, r"no examples"),
    # missing file
    ("rows", "nope.jsonl", "train", {}, r"not found"),
    # an existing file of an unknown format: lists what is accepted
    ("csv", "d.csv", "train", {}, r"accepted tasks"),
    # built-in tasks have only train and test
    ("rows", "arithmetic", "validation", {}, r"splits 'train' and 'test'"),
    # bad size
    ("rows", "arithmetic", "train", {"size": 0}, r"size must be"),
])
def test_user_errors(tmp_path, monkeypatch, setup, task, split, kwargs, match):
    monkeypatch.chdir(tmp_path)
    if setup == "rows":
        _write(tmp_path / "d.jsonl", [{"question": "q", "sol": "1"}], "jsonl")
    elif setup == "empty":
        (tmp_path / "d.jsonl").write_text("\n")
    else:
        (tmp_path / "d.csv").write_text("question,answer\nq,1\n")
    with pytest.raises(UserError, match=match):
        load_examples(task, split, **kwargs)


def test_hub_name_config_and_errors(monkeypatch):
    datasets = pytest.importorskip("datasets")
    calls = []

    def fake_load(name, config=None, split=None):
        calls.append((name, config, split))
        if name == "bad/name":
            raise FileNotFoundError("Dataset 'bad/name' doesn't exist on the Hub")
        return [{"question": "q", "answer": "so\n#### 1,000"}]

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    # "name:config" is split into the dataset name and its config
    assert load_examples("openai/gsm8k:main", "test")[0]["answer"] == "1000"
    assert calls[-1] == ("openai/gsm8k", "main", "test")
    # plain "name" has no config
    load_examples("openai/gsm8k")
    assert calls[-1] == ("openai/gsm8k", None, "train")
    # hub errors become a UserError naming the task
    with pytest.raises(UserError, match=r"'bad/name'.*FileNotFoundError.*accepted tasks"):
        load_examples("bad/name")


def test_render_prompt_with_and_without_system():
    tok = build_tiny_tokenizer()
    text = render_prompt(tok, "What is 1 + 2?", DEFAULT_SYSTEM_PROMPT)
    assert text.startswith("<|im_start|>system\n" + DEFAULT_SYSTEM_PROMPT)
    assert "<|im_start|>user\nWhat is 1 + 2?<|im_end|>" in text
    assert text.endswith("<|im_start|>assistant\n")
    assert "system" not in render_prompt(tok, "q", None)


def test_render_prompt_needs_chat_template():
    tok = build_tiny_tokenizer()
    tok.chat_template = None
    with pytest.raises(UserError, match="no chat template"):
        render_prompt(tok, "q", None)


def test_default_system_prompt_names_the_tags():
    for tag in ("<think>", "</think>", "<answer>", "</answer>"):
        assert tag in DEFAULT_SYSTEM_PROMPT


EXAMPLES = [{"question": f"q{i}", "answer": str(i)} for i in range(10)]


def _ids(batch):
    return [int(e["answer"]) for e in batch]


def test_stream_epochs_are_permutations_and_reshuffled():
    s = PromptStream(EXAMPLES, seed=0)
    e0, e1 = _ids(s.next_batch(10)), _ids(s.next_batch(10))
    assert sorted(e0) == sorted(e1) == list(range(10)), "each epoch covers every example once"
    assert e0 != e1, "each epoch has its own order"
    # same seed, same order; another seed, another order
    assert _ids(PromptStream(EXAMPLES, seed=0).next_batch(20)) == e0 + e1
    assert _ids(PromptStream(EXAMPLES, seed=1).next_batch(10)) != e0


def test_stream_resume_is_exact():
    straight = PromptStream(EXAMPLES, seed=3)
    want = [straight.next_batch(3) for _ in range(7)]  # 21 examples: crosses two epoch ends
    first = PromptStream(EXAMPLES, seed=3)
    got = [first.next_batch(3) for _ in range(3)]
    state = json.loads(json.dumps(first.state_dict()))  # must survive a JSON round trip
    resumed = PromptStream(EXAMPLES, seed=999)  # the seed comes from the state
    resumed.load_state_dict(state)
    got += [resumed.next_batch(3) for _ in range(4)]
    assert got == want


def test_stream_resume_rejects_other_data():
    state = PromptStream(EXAMPLES, seed=0).state_dict()
    with pytest.raises(UserError, match="num_examples"):
        PromptStream(EXAMPLES[:5], seed=0).load_state_dict(state)


@pytest.mark.parametrize("n", [10, 11])  # even split, and one example left over per epoch
def test_stream_shards_are_disjoint(n):
    examples = [{"question": f"q{i}", "answer": str(i)} for i in range(n)]
    ranks = [PromptStream(examples, seed=7, rank=r, world_size=2) for r in range(2)]
    assert all(s.epoch_size == n // 2 for s in ranks)
    for _ in range(3):  # three epochs
        a, b = (_ids(s.next_batch(n // 2)) for s in ranks)
        assert not set(a) & set(b), "two ranks got the same example in one epoch"
        assert len(set(a)) == len(a) == n // 2


def test_stream_copies_examples():
    s = PromptStream(EXAMPLES, seed=0)
    s.next_batch(1)[0]["extra"] = 1
    assert all("extra" not in e for e in EXAMPLES)


def test_stream_bad_shard():
    with pytest.raises(UserError, match="bad shard"):
        PromptStream(EXAMPLES, seed=0, rank=2, world_size=2)


@pytest.mark.parametrize("name", ["basic_arithmetic", "gsm_symbolic"])
def test_reasoning_gym_task(name):
    pytest.importorskip("reasoning_gym")
    train = load_examples(f"rg:{name}", "train", size=8, seed=0)
    test = load_examples(f"rg:{name}", "test", size=8, seed=0)
    assert len(train) == len(test) == 8
    assert all(isinstance(e["question"], str) and isinstance(e["answer"], str) for e in train)
    assert "metadata" in train[0], "reasoning-gym metadata is kept"
    assert [e["question"] for e in train] != [e["question"] for e in test]
    assert train == load_examples(f"rg:{name}", "train", size=8, seed=0), "seeded"
    # the test split does not depend on the run's seed
    assert test == load_examples(f"rg:{name}", "test", size=8, seed=1)


def test_reasoning_gym_unknown_name():
    pytest.importorskip("reasoning_gym")
    with pytest.raises(UserError, match="unknown reasoning-gym task 'nope'.*basic_arithmetic"):
        load_examples("rg:nope")


def test_reasoning_gym_missing_is_a_user_error(monkeypatch):
    import builtins
    real_import = builtins.__import__

    def no_rg(name, *args, **kwargs):
        if name.startswith("reasoning_gym"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_rg)
    with pytest.raises(UserError, match="pip install reasoning-gym"):
        data.load_examples("rg:basic_arithmetic")


# ----------------------------------------------------------------- chats, held-out tasks, templates

CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "first?"},
        {"role": "assistant", "content": "1"}, {"role": "user", "content": "What is 2 + 3?"}]


@pytest.mark.parametrize("row, kwargs, question, system", [
    # OpenAI/TRL `messages`: the last user turn is the question, the system turn the system prompt
    ({"messages": CHAT, "answer": "5"}, {}, "What is 2 + 3?", "Be brief."),
    # no system turn: none of its own (the --system_prompt then applies)
    ({"messages": CHAT[1:], "answer": "5"}, {}, "What is 2 + 3?", None),
    # the turns under another field, named by --question_field (TRL's conversational `prompt`)
    ({"prompt": CHAT[3:], "sol": "#### 5"}, {"question_field": "prompt", "answer_field": "sol"},
     "What is 2 + 3?", None),
    # content given as a list of parts: its text parts
    ({"messages": [{"role": "user", "content": [{"type": "text", "text": t} for t in "ab"]}],
      "answer": 5}, {}, "ab", None),
    # a plain `question` wins over a `messages` column
    ({"question": "plain", "messages": CHAT, "answer": "5"}, {}, "plain", None),
])
def test_conversational_rows(tmp_path, row, kwargs, question, system):
    _write(tmp_path / "chat.jsonl", [row], "jsonl")
    (ex,) = load_examples(str(tmp_path / "chat.jsonl"), **kwargs)
    assert (ex["question"], ex.get("_system_prompt"), ex["answer"]) == (question, system, "5")


@pytest.mark.parametrize("row, match", [
    ({"messages": [{"role": "assistant", "content": "x"}], "answer": "1"}, "no user turn"),  # nothing to ask
    ({"messages": ["hi"], "answer": "1"}, "list of .*role"),                                 # not turns
    ({"messages": CHAT}, r"no field 'answer'.*--answer_field"),                              # no gold answer
])
def test_conversational_row_errors(tmp_path, row, match):
    _write(tmp_path / "chat.jsonl", [row], "jsonl")
    with pytest.raises(UserError, match=match):
        load_examples(str(tmp_path / "chat.jsonl"))


def test_a_rows_system_turn_wins_and_template_kwargs_reach_the_template():
    tok = build_tiny_tokenizer()
    tok.chat_template = ("{% for m in messages %}[{{ m['role'] }}:{{ m['content'] }}]{% endfor %}"
                         "{% if enable_thinking is defined and not enable_thinking %}[no-think]{% endif %}")
    render = data.prompt_renderer(tok, "global", {"enable_thinking": False})
    assert render({"question": "q"}) == "[system:global][user:q][no-think]"
    assert render({"question": "q", "_system_prompt": "own"}) == "[system:own][user:q][no-think]"
    assert data.prompt_renderer(tok, "")({"question": "q"}) == "[user:q]", "empty: no system turn"


@pytest.mark.parametrize("files, task, eval_task, split, want", [
    # no --eval_task: the task's sibling .test file (the fallback rule)
    ({"d.jsonl": "t", "d.test.jsonl": "s"}, "d.jsonl", None, "test", "s"),
    # --eval_task a file: read whole, no sibling needed for the task
    ({"d.jsonl": "t", "held.jsonl": "h"}, "d.jsonl", "held.jsonl", "test", "h"),
    # --eval_task with {split}: formatted with --eval_split
    ({"d.jsonl": "t", "e-dev.jsonl": "v"}, "d.jsonl", "e-{split}.jsonl", "dev", "v"),
    # a {split} task without --eval_task: --eval_split picks its file
    ({"train.jsonl": "t", "dev.jsonl": "v"}, "{split}.jsonl", None, "dev", "v"),
    # a built-in task as --eval_task: its test split
    ({"d.jsonl": "t"}, "d.jsonl", "arithmetic", "test", "What is"),
])
def test_eval_examples(tmp_path, monkeypatch, files, task, eval_task, split, want):
    monkeypatch.chdir(tmp_path)
    for name, q in files.items():
        _write(tmp_path / name, [{"question": q, "answer": "1"}], "jsonl")
    got = data.load_eval_examples(task, eval_task, split)
    assert got and all(e["question"].startswith(want) for e in got)


def test_eval_examples_without_a_held_out_split_say_how(tmp_path):
    _write(tmp_path / "d.jsonl", [{"question": "q", "answer": "1"}], "jsonl")
    with pytest.raises(UserError, match=r"no test split.*d\.test\.jsonl.*--eval_task"):
        data.load_eval_examples(str(tmp_path / "d.jsonl"))
