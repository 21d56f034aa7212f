"""The example configs in configs/: every key is an option, each resolves through the real parser
(the model swapped for the tiny one, the task for a local file) and its batch sizes divide over the
ranks of its own launch line; the trainer and a worker sharing the generation-box file make
batches the trainer accepts; the LoRA one trains a step on the CPU."""
from __future__ import annotations

import dataclasses
import json
import re
import sys
from pathlib import Path

import pytest

from simple_grpo.cli import parse_config
from simple_grpo.common.config import TrainConfig, derive, resolve

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs").glob("*.json"))


def launch_ranks(config: Path) -> int:
    """Training ranks of the trainer command in the file's `_launch` lines, which must use it."""
    (line,) = [x for x in json.loads(config.read_text())["_launch"]
               if "grpo_ref_split.py" in x and "--mode=generate" not in x]
    assert f"--config=configs/{config.name}" in line, line
    if m := re.search(r"--(?:nproc_per_node|num_gpus)[= ](\d+)", line):
        return int(m.group(1))
    if line.split("=")[0].endswith("CUDA_VISIBLE_DEVICES") and " deepspeed " in line:
        return len(line.split()[0].split("=")[1].split(","))  # deepspeed takes every visible GPU
    return 1


@pytest.fixture
def local_task(tmp_path) -> str:
    rows = [{"question": f"What is {i} + 1?", "answer": f"so\n#### {i + 1}"} for i in range(8)]
    for name in ("data.jsonl", "data.test.jsonl"):
        (tmp_path / name).write_text("\n".join(map(json.dumps, rows)))
    return str(tmp_path / "data.jsonl")


def load(config: Path, model, task, *extra: str) -> TrainConfig:
    return resolve(parse_config(TrainConfig, [f"--config={config}", f"--model={model}",
                                              f"--task={task}", *extra]))


def test_there_are_the_documented_examples():
    assert {p.stem for p in CONFIGS} >= {"gsm8k-qwen2.5-3b-split", "gsm8k-qwen2.5-3b-8gpu",
                                         "lora-qwen2.5-7b-48gb", "generation-boxes"}


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.stem)
def test_config_resolves_and_divides_over_its_ranks(config, tiny_model_dir, local_task):
    data = json.loads(config.read_text())
    options = {f.name for f in dataclasses.fields(TrainConfig)} | set(TrainConfig.ALIASES)
    assert not {k for k in data if not k.startswith("_")} - options, "only known options"
    assert data["_about"] and data["model"].startswith("Qwen/"), "says what it is for, a real model"
    cfg = load(config, tiny_model_dir, local_task)
    for key, value in data.items():  # every value arrives as written (file < command line < nothing else)
        if not key.startswith("_") and key not in ("model", "task"):
            got = getattr(cfg, TrainConfig.ALIASES.get(key, key))
            assert got == value or (isinstance(got, tuple) and ",".join(map(str, got)) == value), key
    ranks = launch_ranks(config)
    derive(cfg, ranks)  # the batch sizes divide over the launch's ranks (else a UserError)
    if cfg.trainer_ranks != 1 or "trainer_ranks" in data:
        assert cfg.trainer_ranks == ranks, "workers upload one trainer rank's share"


def test_generation_box_file_makes_batches_the_trainer_accepts(tiny_model_dir, local_task):
    from simple_grpo.models import load_tokenizer
    from simple_grpo.gen.batch_contract import expected_contract
    from simple_grpo.gen.reward_registry import reward_specs

    config = ROOT / "configs" / "generation-boxes.json"
    trainer = load(config, tiny_model_dir, local_task)
    worker = load(config, tiny_model_dir, local_task, "--mode=generate", "--worker_index=0")
    assert worker.ref_url == trainer.ref_url and worker.ref_token == trainer.ref_token
    tokenizer = load_tokenizer(str(tiny_model_dir))  # each side renders the prompts with its own
    contracts = [expected_contract(c, reward_specs(c), "tiny", tokenizer) for c in (trainer, worker)]
    assert contracts[0] == contracts[1]


def test_lora_config_trains_a_step_on_cpu(tiny_model_dir, local_task, tmp_path):
    sys.path.insert(0, str(ROOT))
    import grpo_ref_split

    run = tmp_path / "run"
    config = ROOT / "configs" / "lora-qwen2.5-7b-48gb.json"
    out = grpo_ref_split.main([f"--config={config}", f"--model={tiny_model_dir}", f"--task={local_task}",
                               "--steps=1", "--max_new_tokens=8", "--eval_prompts=2", f"--run_dir={run}"])
    assert out["steps"] == 1
    (row,) = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]
    assert row["step"] == 1 and row["kl"] == 0.0, "the adapter-off reference equals the policy at step 1"
    assert (run / "final" / "adapter").is_dir(), "a LoRA run"
