"""The batch contract (simple_grpo/wire/contract.py) of a TrainConfig: the trainer computes the one
it expects and every producer (the trainer's own rollouts, each generation worker) the one it
uploads, from the same config fields, so a worker started with other options is told apart.

`model_id` names the base model: it is computed once when the model is loaded, before any update
(a worker's later weight downloads and a resumed trainer's checkpoint do not change it).
`expected_contract` is computed once at start-up, after the tokenizer and the rewards are loaded:
it renders a probe prompt with the tokenizer (`prompt_id`) and reads the files the rewards are
defined in (`reward_code`)."""
from __future__ import annotations

import contextlib
import functools
import hashlib
import inspect
import json
from pathlib import Path

import torch

from simple_grpo.wire.contract import BatchContract

# field -> the trainer options a worker must share for it ("start workers with the trainer's ...")
FIXES: dict[str, str] = {
    "scale": "--preset and --scale",
    "rewards": "--rewards, --preset and --overlong_reward",
    "dynamic_sampling": "--preset and --dynamic_sampling",
    "filter_metric": "--filter_metric and --eval_reward",
    "max_new_tokens": "--max_new_tokens",
    "min_new_tokens": "--min_new_tokens",
    "top_p": "--top_p",
    "temperature": "--temperature",
    "group_size": "--num_generations",
    "overlong_cache": "--overlong_cache and --max_new_tokens",
    "model": "--model",
    "prompt": "--system_prompt, --chat_template_kwargs and --model",
    "task": "--task, --question_field and --answer_field",
    "reward_code": "rewards.py, --rewards_file and --reward_failure_value",
}

# the question of the probe example every producer renders for its `prompt` field
PROBE_QUESTION = "What is 12 + 30? Show your reasoning."


def _digest(obj) -> str:
    """16 hex digits of the sha256 of `obj` as canonical JSON."""
    text = json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def model_id(model) -> str:
    """16 hex digits of the sha256 of models.fingerprint(model) (architecture sizes and 64 embedding
    values), the values rounded to bfloat16 so an fp32 and a bf16 copy of one checkpoint agree (an
    fp16 copy may not: fp16 then bf16 rounds twice). A PEFT-wrapped model gives its base's."""
    from simple_grpo.models import fingerprint

    fp = fingerprint(model)
    probe = torch.tensor(fp["probe"], dtype=torch.float32).bfloat16().float().tolist()
    text = json.dumps({"arch": fp["arch"], "probe": probe}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def rewards_text(specs) -> str:
    """The reward specs in order as "name:weight,..." (weights as Python floats: 1 -> 1.0)."""
    return ",".join(f"{s.name}:{float(s.weight)!r}" for s in specs)


def overlong_cache(cfg) -> int:
    """--overlong_cache, or the default reward_registry.soft_overlong_punishment takes for None."""
    from simple_grpo.gen.reward_registry import DEFAULT_OVERLONG_CACHE_FRACTION

    if cfg.overlong_cache is not None:
        return int(cfg.overlong_cache)
    return max(1, round(DEFAULT_OVERLONG_CACHE_FRACTION * cfg.max_new_tokens))


@contextlib.contextmanager
def _probe_day():
    """While the probe renders, the clock chat templates read (transformers' `strftime_now` calls
    chat_template_utils.datetime.now()) says 2000-01-01, whatever day a producer starts on. The
    template data cannot carry a function of ours (transformers makes it plain data), hence the
    clock itself; tests/test_batch_contract.py checks that this is the clock templates read."""
    from transformers.utils import chat_template_utils

    real = chat_template_utils.datetime

    class _Day2000(real):
        @classmethod
        def now(cls, tz=None):
            return real(2000, 1, 1, tzinfo=tz)

    chat_template_utils.datetime = _Day2000
    try:
        yield
    finally:
        chat_template_utils.datetime = real


def prompt_id(cfg, tokenizer) -> str:
    """16 hex digits of the sha256 of a fixed probe example made into a prompt the way every
    prompt is: a row holding PROBE_QUESTION in --question_field, its fields renamed as
    data.load_examples renames them, rendered by data.prompt_renderer (--system_prompt, the
    tokenizer's chat template, --chat_template_kwargs), tokenized as rollout.sample tokenizes
    prompts; the text and the token ids are hashed. A template that writes today's date (its
    `strftime_now`, as Llama 3's do) writes a fixed one here, so producers started on other days
    agree (their prompts differ by that date alone)."""
    from simple_grpo.gen import data

    row = {cfg.answer_field: "42", cfg.question_field: PROBE_QUESTION}
    example = data._rename_fields([row], "the contract's probe", cfg.question_field, cfg.answer_field)[0]
    with _probe_day():
        text = data.prompt_renderer(tokenizer, cfg.system_prompt, cfg.chat_template_kwargs)(example)
    ids = tokenizer(text, add_special_tokens=False).input_ids
    return _digest({"text": text, "ids": [int(i) for i in ids]})


def task_id(cfg) -> str:
    """--task normalised (surrounding spaces dropped; a local file by its file name alone: one
    file sits in other folders on other boxes) with --question_field and --answer_field."""
    from simple_grpo.gen.data import FILE_SUFFIXES

    task = cfg.task.strip()
    if task.endswith(FILE_SUFFIXES):
        task = Path(task).name
    text = f"{task};question_field={cfg.question_field};answer_field={cfg.answer_field}"
    return text if len(text) <= 300 else f"sha256:{_digest(text)}"


@functools.cache
def _distributions() -> dict:
    """importlib.metadata.packages_distributions(), read once (it scans every installed package)."""
    import importlib.metadata

    return importlib.metadata.packages_distributions()


def _imports(namespace: dict) -> list[str]:
    """What the module of `namespace` (a function's __globals__) takes from elsewhere, one level
    deep: "name==version" of each installed distribution it imports from (a module, or a function
    or class of one), the text of each other local file it imports (helpers beside rewards.py);
    the standard library is left out."""
    import importlib.metadata
    import sys
    import sysconfig
    from types import ModuleType

    stdlib = tuple(str(Path(sysconfig.get_paths()[k]).resolve()) for k in ("stdlib", "platstdlib"))
    owners = _distributions()
    out = set()
    for value in list(namespace.values()):
        other = value if isinstance(value, ModuleType) else \
            sys.modules.get(getattr(value, "__module__", None) or "") if callable(value) else None
        if other is None or other.__name__ == namespace.get("__name__"):
            continue
        top = other.__name__.split(".")[0]
        if top in owners:
            out.update(f"{d}=={importlib.metadata.version(d)}" for d in owners[top])
            continue
        file = getattr(other, "__file__", None)
        if file and Path(file).suffix == ".py" and not str(Path(file).resolve()).startswith(stdlib):
            out.add(Path(file).read_text(encoding="utf-8").replace("\r\n", "\n"))
    return sorted(out)


def reward_source(fn) -> list[str]:
    """[the function's qualified name, the text of the whole file that defines it (so a helper or a
    constant beside it, such as a regex, counts, not only the function's own lines; line ends
    normalised), then what that file imports (`_imports`)]; a function with no file (made at run
    time): its own source, else its name alone. Files imported two levels deep are not covered."""
    from simple_grpo.gen.reward_registry import _qualname

    fn = inspect.unwrap(fn)
    try:
        file = inspect.getsourcefile(fn)
        text = Path(file).read_text(encoding="utf-8") if file and Path(file).is_file() else None
    except (OSError, TypeError, UnicodeDecodeError):
        text = None
    if text is None:
        try:
            text = inspect.getsource(fn)
        except (OSError, TypeError):  # built in, made at run time, a callable object
            return [_qualname(fn)]
    namespace = getattr(fn, "__globals__", None)
    return [getattr(fn, "__qualname__", type(fn).__qualname__), text.replace("\r\n", "\n"),
            *(_imports(namespace) if isinstance(namespace, dict) else [])]


def reward_code(specs, failure_value: float) -> str:
    """16 hex digits of the sha256 of each reward's name and `reward_source`, in order, then
    ";failure_value=" and --reward_failure_value."""
    from simple_grpo.gen.reward_registry import get_reward

    code = [[spec.name, *reward_source(get_reward(spec.name))] for spec in specs]
    return f"{_digest(code)};failure_value={float(failure_value)!r}"


def expected_contract(cfg, specs, model: str, tokenizer) -> BatchContract:
    """The contract of batches made with resolved config `cfg`, reward specs `specs`
    (reward_registry.reward_specs(cfg)), a model whose `model_id` is `model` and prompts rendered with
    `tokenizer` (the trainer's and every worker's one function). Without dynamic sampling
    the filter metric is "off" (it changes nothing then)."""
    from simple_grpo.gen.rollout import dynamic_filter_metric

    dynamic = bool(cfg.dynamic_sampling)
    return BatchContract(scale=str(cfg.scale), rewards=rewards_text(specs), dynamic_sampling=dynamic,
                         filter_metric=dynamic_filter_metric(cfg, specs) if dynamic else "off",
                         max_new_tokens=int(cfg.max_new_tokens), min_new_tokens=int(cfg.min_new_tokens),
                         top_p=float(cfg.top_p), temperature=float(cfg.temperature),
                         group_size=int(cfg.num_generations), overlong_cache=overlong_cache(cfg),
                         model=model, prompt=prompt_id(cfg, tokenizer), task=task_id(cfg),
                         reward_code=reward_code(specs, cfg.reward_failure_value))
