"""Where the trainer's prompts come from: tasks, chat prompts, and a resumable shuffled stream.

`load_examples(task, split)` returns a list of dicts, each with at least `question` (str) and
`answer` (str, the gold final answer such as "42"); every other field of the source row is kept.
`task` is one of:

- `arithmetic`: built in, no download. "What is a + b?" for all 100 pairs a, b in 0..9. The test
  split is a fixed 20 pairs (chosen with a fixed seed, not `seed`), train the other 80.
- `arithmetic2`: the same for two-digit numbers, a, b in 10..99: 100 fixed test pairs, 8000 train.
- `rg:<name>`: a reasoning-gym task (`pip install reasoning-gym`), e.g. `rg:gsm_symbolic`,
  `rg:basic_arithmetic`; `size` rows (default 1000) generated with seed `seed` for train and with a
  fixed seed for test, so the test set is the same across runs. The two are drawn independently:
  tasks with few distinct questions can repeat a question in both.
- a local file `*.jsonl`, `*.json` (a list of objects, or JSON lines) or `*.parquet`. If the path
  contains `{split}` it is formatted with the split (`data/{split}.jsonl`); otherwise the file is
  the train split and the test split is its sibling with `.test` before the extension
  (`data.jsonl` -> `data.test.jsonl`).
- anything else: a Hugging Face hub dataset, `name` or `name:config` (`openai/gsm8k:main`),
  loaded with `datasets.load_dataset(name, config, split=split)`.

Fields are renamed with `question_field` / `answer_field` (the `--question_field=...` options).
Conversational rows (OpenAI / TRL chat format) hold a list of turns `{"role": ..., "content": ...}`
in `messages` (or in the question field): the last user turn is the question, a system turn is
the row's system prompt (kept as `_system_prompt`; it wins over `--system_prompt`), other turns are
not used, and the gold answer comes from `answer_field` as for other rows.
Answers are strings; GSM8K-style answers "...reasoning...\\n#### 1,234" become the final number
after the last "####" with commas removed ("1234"). `size` keeps a random subset of that many rows
(chosen by `seed`, original order kept); for `rg:` tasks it is the number of rows generated.
"""
from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path
from typing import Any, Iterator

from simple_grpo.errors import UserError

DEFAULT_SYSTEM_PROMPT = (
    "Think step by step inside <think> </think>, then give only the final number inside "
    "<answer> </answer>. Respond in the format <think> ... </think><answer> ... </answer>"
)

FILE_SUFFIXES = (".jsonl", ".json", ".parquet")
RG_TEST_SEED = 1_000_000_007  # fixed seed of every rg: test split (train uses `seed`)
RG_DEFAULT_SIZE = 1000
_ARITH_TEST_SEED = 1234  # fixed: the held-out arithmetic pairs never depend on the run's seed
_ACCEPTED = ("accepted tasks: 'arithmetic', 'arithmetic2', 'rg:<reasoning-gym name>', a local "
             "*.jsonl / *.json / *.parquet file (may contain {split}), or a Hugging Face dataset "
             "'name' or 'name:config'")


def normalize_answer(answer: Any) -> str:
    """The gold answer as a string; GSM8K "...#### 1,234" becomes "1234", 3.0 becomes "3"."""
    if isinstance(answer, float) and answer.is_integer():
        answer = int(answer)
    text = str(answer)
    if "####" in text:
        text = text.rsplit("####", 1)[1].replace(",", "")
    return text.strip()


def _arithmetic(split: str, lo: int, hi: int, n_test: int) -> list[dict]:
    """All (a, b) pairs in lo..hi, split into a fixed held-out test set and the rest."""
    pairs = [(a, b) for a in range(lo, hi + 1) for b in range(lo, hi + 1)]
    test = set(random.Random(_ARITH_TEST_SEED).sample(pairs, n_test))
    chosen = [p for p in pairs if (p in test) == (split == "test")]
    return [{"question": f"What is {a} + {b}?", "answer": str(a + b)} for a, b in chosen]


def _reasoning_gym(name: str, split: str, seed: int, size: int | None) -> list[dict]:
    """`size` rows of reasoning-gym task `name`; train uses `seed`, test a fixed other seed."""
    try:
        import reasoning_gym
    except ImportError:
        raise UserError(f"task 'rg:{name}' needs reasoning-gym: pip install reasoning-gym") from None
    from reasoning_gym.factory import DATASETS

    if name not in DATASETS:
        raise UserError(f"unknown reasoning-gym task {name!r}; known: {', '.join(sorted(DATASETS))}")
    if split == "train" and seed == RG_TEST_SEED:
        raise UserError(f"seed {seed} is the fixed seed of the rg: test split; pick another seed")
    ds = reasoning_gym.create_dataset(name, size=size or RG_DEFAULT_SIZE,
                                      seed=seed if split == "train" else RG_TEST_SEED)
    return [dict(row) for row in ds]


def _split_path(task: str, split: str) -> Path:
    """The file holding `split` of a local-file task (see the module docstring)."""
    if "{split}" in task:
        return Path(task.format(split=split))
    path = Path(task)
    if split == "train":
        return path
    sibling = path.with_name(f"{path.stem}.{split}{path.suffix}")
    if not sibling.exists():
        raise UserError(f"no {split} split for {task}: put it in {sibling}, or name the files with "
                        f"{{split}}, e.g. {path.with_name('{split}' + path.suffix)}, or name held-out "
                        f"prompts with --eval_task")
    return sibling


def _read_file(path: Path) -> list[dict]:
    """Rows of a .jsonl, .json (list of objects or JSON lines) or .parquet file."""
    if not path.is_file():
        raise UserError(f"data file not found: {path}")
    if path.suffix == ".parquet":
        try:
            import pyarrow.parquet as pq  # a dependency of `datasets`, so normally present
        except ImportError:
            raise UserError(f"reading {path} needs pyarrow: pip install pyarrow") from None
        return pq.read_table(path).to_pylist()
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError:
            data = None  # not one JSON document: read it as JSON lines below
        if data is not None:
            if isinstance(data, dict):  # a one-line JSON-lines file
                return [data]
            if not isinstance(data, list):
                raise UserError(f"{path}: expected a JSON list of objects, got {type(data).__name__}")
            return data
    rows = []
    for i, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise UserError(f"{path}:{i}: not valid JSON ({e.msg})") from None
    return rows


def _hub(task: str, split: str) -> list[dict]:
    """A Hugging Face hub dataset 'name' or 'name:config'."""
    name, _, config = task.partition(":")
    try:
        import datasets
    except ImportError:
        raise UserError(f"task {task!r} looks like a hub dataset, which needs: pip install datasets") from None
    try:
        ds = datasets.load_dataset(name, config or None, split=split)
    except Exception as e:  # hub, network, bad config/split: all mean "fix the task option"
        msg = " ".join(str(e).split())[:300]
        raise UserError(f"could not load task {task!r} (split {split!r}) from the Hugging Face hub: "
                        f"{type(e).__name__}: {msg}; {_ACCEPTED}") from e
    return [dict(row) for row in ds]


def _text(content) -> str | None:
    """A turn's content: a string, or the text parts of a list of parts ({"type": "text", ...})."""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) for p in content):
        return "".join(str(p.get("text", "")) for p in content if p.get("type", "text") == "text")
    return None


def _conversation(turns, where: str) -> dict:
    """{"question": the last user turn, "_system_prompt": the system turn's text, if any}."""
    if not all(isinstance(t, dict) and isinstance(t.get("role"), str) for t in turns):
        raise UserError(f"{where}: expected a list of {{'role': ..., 'content': ...}} turns")
    users = [t for t in turns if t["role"] == "user"]
    if not users or _text(users[-1].get("content")) is None:
        raise UserError(f"{where}: no user turn with text content (the last one is the question)")
    out = {"question": _text(users[-1].get("content"))}
    system = [_text(t.get("content")) for t in turns if t["role"] in ("system", "developer")]
    if system and system[0] is not None:
        out["_system_prompt"] = system[0]
    return out


def _rename_fields(rows: list, task: str, question_field: str, answer_field: str) -> list[dict]:
    """Copy each row with `question` / `answer` taken from the given fields (answer normalized);
    a conversational row's question (and system prompt) from its turns."""
    out = []
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            raise UserError(f"{task}: example {i} is a {type(row).__name__}, expected an object")
        turns = row.get(question_field, row.get("messages") if question_field == "question" else None)
        if isinstance(turns, list):
            if answer_field not in row:
                raise UserError(f"{task}: example {i} has no field {answer_field!r} (its fields: "
                                f"{', '.join(map(str, row))}); set --answer_field=<field>")
            chat = _conversation(turns, f"{task}: example {i}")
            out.append({**row, **chat, "answer": normalize_answer(row[answer_field])})
            continue
        for field, option in ((question_field, "question_field"), (answer_field, "answer_field")):
            if field not in row:
                raise UserError(f"{task}: example {i} has no field {field!r} (its fields: "
                                f"{', '.join(map(str, row)) or 'none'}); set --{option}=<field>")
        question = row[question_field]
        if not isinstance(question, str):
            raise UserError(f"{task}: example {i} field {question_field!r} is a "
                            f"{type(question).__name__}, expected text; set --question_field=<field>")
        out.append({**row, "question": question, "answer": normalize_answer(row[answer_field])})
    return out


def load_examples(task: str, split: str = "train", *, seed: int = 0,
                  question_field: str = "question", answer_field: str = "answer",
                  size: int | None = None) -> list[dict]:
    """The examples of `split` of `task` as dicts with `question` and `answer` strings (see above)."""
    if size is not None and size < 1:
        raise UserError(f"size must be at least 1, got {size}")
    builtin = {"arithmetic": (0, 9, 20), "arithmetic2": (10, 99, 100)}
    if task in builtin or task.startswith("rg:"):
        if split not in ("train", "test"):
            raise UserError(f"task {task!r} has splits 'train' and 'test', not {split!r}")
    if task in builtin:
        rows: list = _arithmetic(split, *builtin[task])
    elif task.startswith("rg:"):
        rows = _reasoning_gym(task[3:], split, seed, size)
    elif task.endswith(FILE_SUFFIXES):
        rows = _read_file(_split_path(task, split))
    elif Path(task).exists():
        raise UserError(f"{task} exists but is not a *.jsonl / *.json / *.parquet file; {_ACCEPTED}")
    else:
        rows = _hub(task, split)
    if not rows:
        raise UserError(f"task {task!r} split {split!r} has no examples")
    examples = _rename_fields(rows, task, question_field, answer_field)
    if size is not None and size < len(examples):
        keep = sorted(random.Random(seed).sample(range(len(examples)), size))
        examples = [examples[i] for i in keep]
    return examples


def load_eval_examples(task: str, eval_task: str | None = None, split: str = "test", **kw) -> list[dict]:
    """The held-out examples (--eval_task, --eval_split): `eval_task` when given, in any form of
    `task`, where a local file without {split} in its path is read whole; else `task`'s `split`
    (a local file's: its sibling, see the module docstring). `kw`: load_examples' keywords."""
    if not eval_task:
        return load_examples(task, split, **kw)
    if eval_task.endswith(FILE_SUFFIXES) and "{split}" not in eval_task:
        return load_examples(eval_task, "train", **kw)  # a file's train split is the file itself
    return load_examples(eval_task, split, **kw)


def render_prompt(tokenizer, question: str, system_prompt: str | None, **template_kwargs) -> str:
    """The chat-formatted prompt text: [system], user question, then the assistant header;
    `template_kwargs` are extra variables of the chat template (e.g. enable_thinking=False)."""
    if not getattr(tokenizer, "chat_template", None):
        raise UserError(f"tokenizer {getattr(tokenizer, 'name_or_path', '')!r} has no chat template; "
                        "use an instruct/chat model")
    messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
    messages.append({"role": "user", "content": question})
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True,
                                         **template_kwargs)
    assert isinstance(text, str), f"apply_chat_template returned {type(text).__name__}, not str"
    return text


def prompt_renderer(tokenizer, system_prompt: str | None, chat_template_kwargs: dict | None = None):
    """example -> rendered prompt text. The system prompt is the example's own (`_system_prompt`,
    from a conversational row), else `system_prompt`: None is DEFAULT_SYSTEM_PROMPT, "" none."""
    system = DEFAULT_SYSTEM_PROMPT if system_prompt is None else system_prompt
    kw = dict(chat_template_kwargs or {})
    return lambda ex: render_prompt(tokenizer, ex["question"], ex.get("_system_prompt", system), **kw)


class PromptStream:
    """An endless, seeded, resumable stream of examples, sharded across `world_size` ranks.

    Each epoch is a fresh permutation (seeded by `seed` and the epoch number). Rank r takes
    positions r, r + w, r + 2w, ... of that permutation, cut to len // w so every rank has the same
    epoch length; ranks therefore never see the same example within an epoch, and the few dropped
    examples differ from epoch to epoch. `state_dict` / `load_state_dict` resume exactly.
    """

    def __init__(self, examples: list[dict], *, seed: int, rank: int = 0, world_size: int = 1):
        if world_size < 1 or not 0 <= rank < world_size:
            raise UserError(f"bad shard: rank {rank} of world_size {world_size}")
        if len(examples) < world_size:
            raise UserError(f"{len(examples)} examples cannot be shared by {world_size} ranks")
        self.examples = list(examples)
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.epoch, self.position = 0, 0
        self._order = self._epoch_order(0)

    @property
    def epoch_size(self) -> int:
        """How many examples this rank gets per epoch."""
        return len(self.examples) // self.world_size

    def _epoch_order(self, epoch: int) -> list[int]:
        order = list(range(len(self.examples)))
        random.Random(f"simple_grpo:{self.seed}:{epoch}").shuffle(order)  # str seed: stable hash
        return order[self.rank::self.world_size][:self.epoch_size]

    def __iter__(self) -> Iterator[dict]:
        return self

    def __next__(self) -> dict:
        if self.position >= self.epoch_size:
            self.epoch, self.position = self.epoch + 1, 0
            self._order = self._epoch_order(self.epoch)
        example = self.examples[self._order[self.position]]
        self.position += 1
        return dict(example)  # a copy: callers may add fields without touching the dataset

    def next_batch(self, n: int) -> list[dict]:
        """The next `n` examples (crossing epoch boundaries as needed)."""
        assert n >= 0, f"batch size must be >= 0, got {n}"
        return [next(self) for _ in range(n)]

    def sampling_seed(self) -> int:
        """The seed of the sampling that draws completions for the next examples: a function of
        the stream and where it stands, so whoever samples this stream's next batch (the trainer's
        rank, or the overlap sampler for it) draws the same numbers, and a resumed run draws what
        the uninterrupted one did, with no RNG state kept."""
        key = f"simple_grpo:sample:{self.seed}:{self.rank}/{self.world_size}:{self.epoch}:{self.position}"
        return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "big") >> 1

    def state_dict(self) -> dict:
        """JSON-able position in the stream."""
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed,
                "rank": self.rank, "world_size": self.world_size,
                "num_examples": len(self.examples)}

    def load_state_dict(self, state: dict) -> None:
        """Continue from `state` (from `state_dict` of a stream over the same examples)."""
        for key in ("world_size", "num_examples"):
            have = self.world_size if key == "world_size" else len(self.examples)
            if key in state and state[key] != have:
                raise UserError(f"cannot resume the prompt stream: saved {key}={state[key]}, "
                                f"now {have}; resume with the same data and world size")
        self.seed, self.epoch, self.position = int(state["seed"]), int(state["epoch"]), int(state["position"])
        assert 0 <= self.position <= self.epoch_size, f"position {self.position} out of range"
        self._order = self._epoch_order(self.epoch)


class RankStreams:
    """Every trainer rank's PromptStream side by side (the overlap sampler's): `next_batch` takes
    one example from each rank's stream in turn, so group g of a step's batch is rank g % N's and
    part r of it (rollout.split: groups r, r + N, ...) holds the prompts rank r would have drawn
    itself (refill rounds continue the turn)."""

    def __init__(self, examples: list[dict], *, seed: int, world_size: int = 1):
        self.shards = [PromptStream(examples, seed=seed, rank=r, world_size=world_size)
                       for r in range(world_size)]
        self.turn = 0  # the rank whose stream gives the next example

    def next_batch(self, n: int) -> list[dict]:
        assert n >= 0, f"batch size must be >= 0, got {n}"
        out = []
        for _ in range(n):
            out.append(next(self.shards[self.turn]))
            self.turn = (self.turn + 1) % len(self.shards)
        return out

    def sampling_seed(self) -> int:
        """One rank: that rank's stream's (the trainer's own draws); several: of all of them."""
        if len(self.shards) == 1:
            return self.shards[0].sampling_seed()
        key = ":".join(str(s.sampling_seed()) for s in self.shards) + f":{self.turn}"
        return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "big") >> 1

    def state_dict(self) -> dict:
        return {"shards": [s.state_dict() for s in self.shards], "turn": self.turn}

    def load_state_dict(self, state: dict) -> None:
        if len(state.get("shards", ())) != len(self.shards):
            raise UserError(f"cannot resume the sampler's prompt streams: saved for "
                            f"{len(state.get('shards', ()))} ranks, now {len(self.shards)}")
        for s, st in zip(self.shards, state["shards"]):
            s.load_state_dict(st)
        self.turn = int(state["turn"])
