"""The batch contract: what a config's contract holds (the model id too), and the trainer's
RefConnection dropping, counting and naming each batch made with other settings, over real HTTP on
127.0.0.1 (a table with one row per contract field, a table of worker options that change the
prompts, the task or the reward code, and a real Worker started with another preset)."""
from __future__ import annotations

import dataclasses
import sys

import pytest
import torch

import rewards  # noqa: F401  (the built-in rewards, registered before any test's snapshot)
from simple_grpo.cli import parse_config
from simple_grpo.models import build_tiny_model, build_tiny_tokenizer, load_tokenizer
from simple_grpo.gen.batch_contract import FIXES, expected_contract, model_id
from simple_grpo.common.config import TrainConfig, resolve
from simple_grpo.gen.reward_registry import reward_specs
from simple_grpo.gen.reward_registry import REWARDS
from simple_grpo.train.rollout_source import RefConnection
from simple_grpo.gen.worker import Worker
from simple_grpo.wire.client import RefClient
from simple_grpo.wire.codec import RolloutBatch
from simple_grpo.wire.contract import BatchContract, contract_differences

SMALL = dict(prompts_per_step=2, num_generations=4, micro_batch_size=4, max_new_tokens=8)
# the tiny byte-level tokenizer, its ChatML template also reading Qwen3's enable_thinking variable
TOKENIZER = build_tiny_tokenizer()
TOKENIZER.chat_template += ("{% if enable_thinking is defined and not enable_thinking %}"
                            "<think>\n\n</think>\n\n{% endif %}")


def config(**kw) -> TrainConfig:
    return resolve(parse_config(TrainConfig, [f"--{k}={v}" for k, v in kw.items()]))


def contract_of(cfg: TrainConfig, model: str = "m", tokenizer=TOKENIZER) -> BatchContract:
    return expected_contract(cfg, reward_specs(cfg), model, tokenizer)


@pytest.mark.parametrize("options, want", [
    # grpo, the defaults (rewards.DEFAULT_REWARDS): no dynamic sampling (metric "off"), L_cache 0.2 * 48
    ({}, dict(scale="std", rewards="correct_lenient:1.0", dynamic_sampling=False,
              filter_metric="off", max_new_tokens=48, min_new_tokens=0, top_p=1.0, temperature=1.0,
              group_size=8, overlong_cache=10)),
    # dr_grpo: unscaled advantages
    (dict(preset="dr_grpo", rewards="correct:1"), dict(scale="none", rewards="correct:1.0")),
    # dapo: 'overlong' appended to the rewards, dynamic sampling on correctness (--eval_reward)
    (dict(preset="dapo", rewards="correct_lenient:2"),
     dict(rewards="correct_lenient:2.0,overlong:1.0", dynamic_sampling=True,
          filter_metric="correct_lenient")),
    # sampling options and an explicit L_cache
    (dict(max_new_tokens=16, min_new_tokens=4, top_p=0.9, temperature=0.7, num_generations=4,
          overlong_cache=3), dict(max_new_tokens=16, min_new_tokens=4, top_p=0.9, temperature=0.7,
                                  group_size=4, overlong_cache=3)),
    # L_cache's default follows max_new_tokens: round(0.2 * 16) = 3; at least 1
    (dict(max_new_tokens=16), dict(max_new_tokens=16, overlong_cache=3)),
    (dict(max_new_tokens=2), dict(max_new_tokens=2, overlong_cache=1)),
])
def test_contract_of_a_config(options, want):
    base = contract_of(config())
    got = contract_of(config(**options))
    if want.get("rewards", base.rewards) != base.rewards:  # other reward functions: other code
        assert got.reward_code != base.reward_code
        want = {**want, "reward_code": got.reward_code}
    assert got == dataclasses.replace(base, **want)
    assert got.model == "m"


def test_a_template_that_writes_todays_date_gives_one_prompt_id_on_every_day(monkeypatch):
    """Llama 3's templates write the day (strftime_now): a trainer and a worker started on other
    days render other prompts by that date alone, and must still agree on the contract."""
    import datetime

    from transformers.utils import chat_template_utils

    tok = build_tiny_tokenizer()
    tok.chat_template = "Today is {{ strftime_now('%d %b %Y') }}.\n" + tok.chat_template
    ids, texts = [], []
    for day in (datetime.datetime(2026, 12, 7, 23, 59), datetime.datetime(2026, 12, 8, 0, 1)):
        fake = type("FakeDatetime", (datetime.datetime,), {"now": classmethod(lambda cls, tz=None, day=day: day)})
        monkeypatch.setattr(chat_template_utils, "datetime", fake)  # the clock the template reads
        texts.append(tok.apply_chat_template([{"role": "user", "content": "q"}], tokenize=False))
        ids.append(contract_of(config(), tokenizer=tok).prompt)
    assert texts[0].startswith("Today is 07 Dec 2026.") and texts[1].startswith("Today is 08 Dec 2026.")
    assert ids[0] == ids[1]
    assert ids[0] != contract_of(config(), tokenizer=build_tiny_tokenizer()).prompt, "the line counts"


def test_differences_name_the_fields_in_order():
    a = contract_of(config())
    assert contract_differences(a, a) == []
    b = dataclasses.replace(a, top_p=0.9, scale="none", model="x")
    assert contract_differences(a, b) == ["scale", "top_p", "model"]


def test_model_id_is_the_base_checkpoint_in_any_float_dtype():
    from peft import LoraConfig, get_peft_model

    fp32 = build_tiny_model(seed=3)
    ident = model_id(fp32)
    assert len(ident) == 16 and int(ident, 16) >= 0
    assert model_id(build_tiny_model(seed=3).to(torch.bfloat16)) == ident  # a bf16 copy
    assert model_id(build_tiny_model(seed=4)) != ident  # other weights
    assert model_id(build_tiny_model(seed=3, layers=3)) != ident  # another architecture
    wrapped = get_peft_model(build_tiny_model(seed=3), LoraConfig(r=2, target_modules=["q_proj"]))
    assert model_id(wrapped) == ident  # a PEFT-wrapped model: its base's


# --- the trainer's check, over HTTP

OURS = BatchContract(scale="std", rewards="overlong:1.0", dynamic_sampling=False, filter_metric="off",
                     max_new_tokens=8, min_new_tokens=0, top_p=1.0, temperature=1.0, group_size=4,
                     overlong_cache=2, model="0123456789abcdef", prompt="0f1e2d3c4b5a6978",
                     task="arithmetic;question_field=question;answer_field=answer",
                     reward_code="89abcdef01234567;failure_value=0.0")


def _batch(producer: str, contract: BatchContract | None) -> RolloutBatch:
    rows, C = 8, 3
    temperature = contract.temperature if contract is not None else 1.0
    return RolloutBatch(prompt_ids=torch.full((rows, 2), 5), prompt_lens=torch.full((rows,), 2),
                        completion_ids=torch.full((rows, C), 7), completion_lens=torch.full((rows,), C),
                        rewards=torch.zeros(rows), advantages=torch.zeros(rows),
                        meta={"producer": producer}, temperature=temperature, contract=contract)


CASES = [  # (field, the worker's value, the option the warning tells to share), one per field
    ("scale", "none", "--preset and --scale"),  # dr_grpo's unscaled advantages
    ("rewards", "overlong:0.5", "--rewards, --preset and --overlong_reward"),  # another weight
    ("dynamic_sampling", True, "--preset and --dynamic_sampling"),  # groups filtered and refilled
    ("filter_metric", "reward", "--filter_metric and --eval_reward"),  # filtered on another metric
    ("max_new_tokens", 16, "--max_new_tokens"),  # longer completions, another L_max
    ("min_new_tokens", 8, "--min_new_tokens"),  # EOS held back
    ("top_p", 0.9, "--top_p"),  # nucleus sampling: another sampling distribution
    ("temperature", 0.7, "--temperature"),  # log-probs of another softmax
    ("group_size", 2, "--num_generations"),  # 8 rows as 4 groups of 2: the row count agrees
    ("overlong_cache", 4, "--overlong_cache and --max_new_tokens"),  # another length penalty
    ("model", "fedcba9876543210", "--model"),  # another base model
    ("prompt", "1111222233334444", "--system_prompt, --chat_template_kwargs and --model"),  # prompts
    ("task", "arithmetic2;question_field=question;answer_field=answer",  # other questions
     "--task, --question_field and --answer_field"),
    ("reward_code", "89abcdef01234567;failure_value=-1.0",  # failures scored otherwise
     "rewards.py, --rewards_file and --reward_failure_value"),
]
assert [c[0] for c in CASES] == [f.name for f in dataclasses.fields(BatchContract)], "one row per field"


@pytest.mark.parametrize("field, value, fix", CASES, ids=[c[0] for c in CASES])
def test_a_batch_of_another_contract_is_dropped_counted_and_named(ref_server, capsys, field, value, fix):
    srv = ref_server()
    client = RefClient(srv.url)
    client.upload(_batch("w-bad", dataclasses.replace(OURS, **{field: value})))
    client.upload(_batch("w-good", OURS))  # the trainer's own settings: taken
    conn = RefConnection(srv.url, None, timeout=10, batch_rows=8, contract=OURS)
    assert conn.next_batch(weight_version=0).meta["producer"] == "w-good"
    assert conn.counts["rejected_batches"] == 1 and conn.counts["stale_dropped"] == 0
    warnings = [x for x in capsys.readouterr().err.splitlines() if "dropping a batch" in x]
    assert warnings == [f"[trainer] dropping a batch from w-bad: its {field} is {value!r}, this "
                        f"trainer's is {getattr(OURS, field)!r} (start workers with the trainer's {fix})"]
    conn.close()


def test_a_batch_without_a_contract_is_dropped_and_every_difference_is_named(ref_server, capsys):
    srv = ref_server()
    client = RefClient(srv.url)
    client.upload(_batch("w-none", None))  # no contract: never trained on
    client.upload(_batch("w-two", dataclasses.replace(OURS, top_p=0.9, max_new_tokens=16)))
    client.upload(_batch("w-two", dataclasses.replace(OURS, top_p=0.9, max_new_tokens=16)))
    client.upload(_batch("w-good", OURS))
    conn = RefConnection(srv.url, None, timeout=10, batch_rows=8, contract=OURS)
    assert conn.next_batch(weight_version=0).meta["producer"] == "w-good"
    assert conn.counts["rejected_batches"] == 3  # each dropped batch once, two fields or not
    warnings = [x for x in capsys.readouterr().err.splitlines() if "dropping a batch" in x]
    assert warnings == [  # one line per distinct reason: the second w-two batch adds none
        "[trainer] dropping a batch from w-none: it carries no batch contract (start workers with "
        "this version's grpo_ref_split.py --mode=generate)",
        "[trainer] dropping a batch from w-two: its max_new_tokens is 16, this trainer's is 8 (start "
        "workers with the trainer's --max_new_tokens)",
        "[trainer] dropping a batch from w-two: its top_p is 0.9, this trainer's is 1.0 (start "
        "workers with the trainer's --top_p)"]
    conn.close()


def test_a_worker_started_with_another_preset_is_refused(tiny_model_dir, tiny_model, ref_server, capsys):
    """A real Worker with --preset=dr_grpo (unscaled advantages) next to a grpo trainer: its batch
    crosses the wire with its contract and the trainer drops it naming 'scale'; a worker with the
    trainer's options is trained on."""
    srv = ref_server()
    common = {"model": tiny_model_dir, "ref_url": srv.url, "rewards": "overlong", "ref_timeout": 20,
              **SMALL}
    trainer_cfg = config(**common)
    ours = expected_contract(trainer_cfg, reward_specs(trainer_cfg), model_id(tiny_model),
                             load_tokenizer(str(tiny_model_dir)))
    for preset, index in (("dr_grpo", 0), ("grpo", 1)):  # the refused one first in the queue
        w = Worker(config(**common, preset=preset, worker_index=index), RefClient(srv.url))
        [(batch, _)] = w.make_batches()
        assert batch.contract.scale == {"dr_grpo": "none", "grpo": "std"}[preset]
        assert w.upload(batch) == "queued"
    conn = RefConnection(srv.url, None, timeout=30, batch_rows=8, contract=ours)
    got = conn.next_batch(weight_version=0)
    assert got.contract == ours and got.contract.model == model_id(tiny_model)
    assert conn.counts["rejected_batches"] == 1
    warnings = [x for x in capsys.readouterr().err.splitlines() if "dropping a batch" in x]
    assert warnings == [f"[trainer] dropping a batch from {w.id}: its scale is 'none', this trainer's "
                        f"is 'std' (start workers with the trainer's --preset and --scale)"]
    conn.close()


# --- worker options that change the prompts, the task or the reward code

MINE = """from simple_grpo.gen.reward_registry import register

@register("contract_mine")
def mine(completion, example):
    return {body}
"""
HELPED = """import re
from simple_grpo.gen.reward_registry import register

_NUMBER = re.compile({pattern!r})


def _score(text):
    return {score}


@register("contract_mine")
def mine(completion, example):
    return _score(completion)
"""
REWARD_FILES = {"a/mine.py": MINE.format(body="len(completion) / 100.0"),  # the trainer's
                "b/mine.py": MINE.format(body="len(completion) / 100.0"),  # a copy in another folder
                "c/mine.py": MINE.format(body="-len(completion) / 100.0"),  # the same name, other code
                "d/mine.py": HELPED.format(pattern=r"\d+", score="float(bool(_NUMBER.search(text)))"),
                "e/mine.py": HELPED.format(pattern=r"\d+", score="float(len(_NUMBER.findall(text)))"),
                "f/mine.py": HELPED.format(pattern=r"-?\d+", score="float(bool(_NUMBER.search(text)))")}
MINE_A, MINE_B, MINE_C, MINE_D, MINE_E, MINE_F = ({"rewards_file": f, "rewards": "contract_mine"}
                                                  for f in REWARD_FILES)

OPTION_CASES = [  # (the trainer's options, the worker's, the fields that differ)
    # identical configs: the contracts agree
    ({}, {}, []),
    # the same data file, at another path on the worker's box: the same task
    (dict(task="/data/run/train.jsonl"), dict(task="/mnt/shared/train.jsonl"), []),
    # the same reward code, from a copy of the trainer's --rewards_file in another folder
    (MINE_A, MINE_B, []),
    # a chat template variable the template never reads: the same prompts
    ({}, dict(chat_template_kwargs='{"unused": 1}'), []),
    # --system_prompt: another system turn
    ({}, dict(system_prompt="Answer with a number."), ["prompt"]),
    # --system_prompt= (empty): no system turn at all
    ({}, dict(system_prompt=""), ["prompt"]),
    # --chat_template_kwargs that the template reads: an empty think block after the header
    ({}, dict(chat_template_kwargs='{"enable_thinking": false}'), ["prompt"]),
    # --task: other questions and answers
    ({}, dict(task="arithmetic2"), ["task"]),
    # --question_field: the question read from another field of each row
    ({}, dict(question_field="problem"), ["task"]),
    # --answer_field: the gold answer read from another field
    ({}, dict(answer_field="solution"), ["task"]),
    # --reward_failure_value: a reward that fails scored otherwise
    ({}, dict(reward_failure_value=-1.0), ["reward_code"]),
    # --rewards_file: the same reward name, other code
    (MINE_A, MINE_C, ["reward_code"]),
    # the reward function's own lines unchanged, the helper it calls changed
    (MINE_D, MINE_E, ["reward_code"]),
    # the reward and its helper unchanged, the module's regex the helper reads changed
    (MINE_D, MINE_F, ["reward_code"]),
]


@pytest.fixture
def own_process(tmp_path):
    """-> contract(options): the contract a producer started with `options` computes, its
    --rewards_file (a path under tmp_path) loaded into a registry of the built-in rewards alone,
    as in a process of its own; the registry and the loaded files are restored afterwards."""
    for name, text in REWARD_FILES.items():
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_text(text)
    saved, mods = dict(REWARDS), set(sys.modules)

    def contract(options: dict) -> BatchContract:
        REWARDS.clear()
        REWARDS.update(saved)
        if "rewards_file" in options:
            options = {**options, "rewards_file": str(tmp_path / options["rewards_file"])}
        return contract_of(config(**options))

    yield contract
    REWARDS.clear()
    REWARDS.update(saved)
    for name in set(sys.modules) - mods:
        if name.startswith("user_rewards_"):
            del sys.modules[name]


@pytest.mark.parametrize("trainer, worker, fields", OPTION_CASES, ids=[
    f"{'+'.join(w) or 'same'}-{'-'.join(f) or 'match'}" for _, w, f in OPTION_CASES])
def test_a_worker_with_other_prompts_task_or_reward_code_is_refused(own_process, ref_server, capsys,
                                                                     trainer, worker, fields):
    """The worker's contract from its own options: each changed option is a difference in the
    field that covers it, and the trainer drops its batch, counted, with one line naming it."""
    ours, theirs = own_process(trainer), own_process(worker)
    assert contract_differences(ours, theirs) == fields
    srv = ref_server()
    client = RefClient(srv.url)
    client.upload(_batch("w-other", theirs))
    client.upload(_batch("w-same", ours))
    conn = RefConnection(srv.url, None, timeout=10, batch_rows=8, contract=ours)
    assert conn.next_batch(weight_version=0).meta["producer"] == ("w-same" if fields else "w-other")
    assert conn.counts["rejected_batches"] == len(fields)
    warnings = [x for x in capsys.readouterr().err.splitlines() if "dropping a batch" in x]
    assert warnings == [f"[trainer] dropping a batch from w-other: its {f} is {getattr(theirs, f)!r}, "
                        f"this trainer's is {getattr(ours, f)!r} (start workers with the trainer's "
                        f"{FIXES[f]})" for f in fields]
    conn.close()


def test_reward_code_covers_what_the_rewards_file_imports(tmp_path, monkeypatch):
    """A reward's source counts its own file and what that file imports one level deep: a local
    helper module's text (changed: another reward_code) and the versions of installed libraries
    (another version: another one); the standard library (re) adds nothing."""
    import importlib.metadata
    import importlib.util

    from simple_grpo.gen.batch_contract import reward_source

    (tmp_path / "contract_helper.py").write_text("def score(text):\n    return 1.0\n")
    (tmp_path / "contract_rewards.py").write_text(
        "import re\nimport numpy\nfrom contract_helper import score\n\n\n"
        "def helped(completion, example):\n    return score(completion) + len(re.findall('x', completion))\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "contract_helper", raising=False)
    spec = importlib.util.spec_from_file_location("contract_rewards_under_test", tmp_path / "contract_rewards.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    first = reward_source(module.helped)
    numpy = f"numpy=={importlib.metadata.version('numpy')}"
    assert first[0] == "helped" and first[2:] == sorted(["def score(text):\n    return 1.0\n", numpy]), first
    (tmp_path / "contract_helper.py").write_text("def score(text):\n    return 2.0\n")  # the helper changes
    second = reward_source(module.helped)
    assert second != first
    real = importlib.metadata.version
    monkeypatch.setattr(importlib.metadata, "version", lambda d: "0.0.1" if d == "numpy" else real(d))
    assert reward_source(module.helped)[2:] == sorted(["def score(text):\n    return 2.0\n", "numpy==0.0.1"])
    monkeypatch.delitem(sys.modules, "contract_helper", raising=False)
