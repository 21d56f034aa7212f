"""Every bad input is one line and exit code 2 before anything slow starts: no model, tokenizer or
reference server loads (each is made to fail the test here), in a few seconds a row. The run goes
through grpo_ref_split.py's own main() and the entry point users get (run_entry_point), in this
process; tests/test_trainer.py runs a few of the same as real command lines."""
from __future__ import annotations

import importlib.util
import sys
import time
from pathlib import Path

import pytest

from simple_grpo import models
from simple_grpo.errors import run_entry_point
from simple_grpo.train import rollout_source

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import grpo_ref_split  # noqa: E402

ROWS = [
    (["--stepz=3"], "unknown option --stepz"),                                    # a typo
    (["--save_steps=10"], "--save_every"),                                        # TRL's name: ours named
    (["--learning_rate=1e-5"], "--lr"),                                           # ... and another
    (["--preset=ppo"], "--preset must be one of"),                                # a choice
    (["--sampler=beam"], "--sampler must be one of"),
    (["--lr=-1"], "--lr must be > 0"),                                            # numbers in range
    (["--keep_last=-1"], "--keep_last must be >= 0"),
    (["--num_generations=1"], "--num_generations must be >= 2"),
    (["--top_p=0"], "--top_p must be in (0, 1]"),
    (["--temperature=0"], "--temperature must be a finite number > 0"),
    (["--max_new_tokens=0"], "--max_new_tokens must be >= 1"),
    (["--min_new_tokens=9", "--max_new_tokens=8"], "--min_new_tokens must be in"),
    (["--eps_low=-0.1"], "--eps_low/--eps_high must be >= 0"),
    (["--lora_r=-1"], "--lora_r must be >= 0"),
    (["--adam_betas=0.9,1.5"], "--adam_betas must be two numbers"),
    (["--tis_cap=0.5"], "--tis_cap must be >= 1"),
    (["--max_tokens_per_micro_batch=-2"], "--max_tokens_per_micro_batch must be >= -1"),
    (["--dist_timeout=0"], "--dist_timeout must be > 0"),
    (["--dtype=float16"], "float16 training needs loss scaling"),
    (["--pg_loss=cispo", "--ratio_level=sequence"], "needs --ratio_level=token"),
    (["--ref_url=127.0.0.1:59875"], "expected http://HOST:PORT"),                # no scheme
    (["--prompts_per_step=3", "--num_generations=3", "--micro_batch_size=2"], "micro_batch_size"),
    (["--overlap=true", "--ref_url=http://127.0.0.1:9"], "--overlap=true starts a sampler"),
    (["--rewards=nosuch:1"], "unknown reward 'nosuch'"),                          # rewards
    (["--rewards=correct,correct"], "listed twice"),
    (["--eval_reward=corect"], "--eval_reward=corect: unknown reward"),
    (["--rewards_file=/no/such/rewards.py"], "/no/such/rewards.py"),
    (["--task=arithmetc"], "did you mean arithmetic?"),                           # a task typo: no hub
    (["--task=/no/such/file.jsonl"], "no such file"),                             # a missing data file
    (["--eval_task=/no/such/test.jsonl"], "--eval_task=/no/such/test.jsonl: no such file"),
    (["--resume=true"], "--resume=true: no checkpoint"),                          # nothing to resume
    (["--wandb"], "--wandb needs the wandb package"),                             # a missing package
    ("another run", "holds another run"),                                         # a used run folder
]


@pytest.fixture
def nothing_slow(monkeypatch):
    def fail(*a, **kw):
        raise AssertionError("a slow start-up step ran before the input check")

    for where, name in ((models, "load_model"), (models, "load_tokenizer"), (rollout_source, "start_ref")):
        monkeypatch.setattr(where, name, fail)


@pytest.mark.parametrize("args, message", ROWS, ids=[str(a) for a, _ in ROWS])
def test_bad_input_is_one_line_exit_2_before_anything_loads(args, message, tiny_model_dir, tmp_path,
                                                           nothing_slow, capsys):
    if args == ["--wandb"] and importlib.util.find_spec("wandb") is not None:
        pytest.skip("wandb is installed here")
    if args == "another run":
        (tmp_path / "metrics.jsonl").write_text('{"step": 1}\n')
        args = []
    argv = [f"--model={tiny_model_dir}", f"--run_dir={tmp_path}", "--beta=0", *args]
    t = time.monotonic()
    with pytest.raises(SystemExit) as e:
        run_entry_point(grpo_ref_split.main, argv, "grpo_ref_split.py")
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2, err
    assert len(err) == 1 and message in err[0], err
    assert time.monotonic() - t < 5


def test_the_table_has_25_rows_or_more():
    assert len(ROWS) >= 25
