"""A rank of a multi-process run dies (`kill -9`) and the launcher brings the run back by itself:
`torchrun --max-restarts=N grpo_ref_split.py --resume=auto` restarts every rank, each resumes from
the newest complete checkpoint, and the run finishes with every step logged once and final/ written.
Two CPU ranks (gloo), the tiny model, beta > 0 with the reference server that rank 0 starts (it
dies with its rank and is started again)."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest
from pathlib import Path

from simple_grpo.cli import parse_config
from simple_grpo.common.config import TrainConfig, resolve
from simple_grpo.gen.data import PromptStream, load_examples
from simple_grpo.train.engine import free_port, standalone_env

ROOT = Path(__file__).resolve().parents[2]


def ranks_of(agent_pid: int) -> dict[int, int]:
    """{RANK: pid} of the trainer processes torchrun's agent `agent_pid` runs now."""
    out = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            if ppid != agent_pid:
                continue
            env = dict(kv.split("=", 1) for kv in (d / "environ").read_bytes().decode(errors="replace")
                       .split("\0") if "=" in kv)
        except (OSError, IndexError, ValueError):
            continue  # the process ended while we looked
        if "RANK" in env:
            out[int(env["RANK"])] = int(d.name)
    return out


def logged_steps(path: Path) -> list[int]:
    if not path.exists():
        return []
    steps = []
    for line in path.read_text().splitlines():
        try:
            steps.append(json.loads(line)["step"])
        except (ValueError, KeyError):
            pass  # a line being written
    return steps


@pytest.mark.slow
def test_kill_9_of_one_rank_is_restarted_and_finishes(tiny_model_dir, tmp_path):
    steps, kill_after = 8, 3
    args = [f"--model={tiny_model_dir}", f"--run_dir={tmp_path}", f"--steps={steps}", "--prompts_per_step=2",
            "--num_generations=4", "--micro_batch_size=4", "--max_new_tokens=8", "--eval_every=4",
            "--eval_prompts=4", "--save_every=1", "--preset=grpo", "--beta=0.04", "--lr=1e-3",
            "--plot_every=0", "--samples_every=1", "--resume=auto"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--max-restarts=2",
           "--monitor-interval=0.2", "--master_addr=127.0.0.1", f"--master_port={free_port()}",
           str(ROOT / "grpo_ref_split.py"), *args]
    log = open(tmp_path / "torchrun.log", "w+")
    proc = subprocess.Popen(cmd, cwd=ROOT, env=standalone_env(OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu"),
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        while max(logged_steps(tmp_path / "metrics.jsonl"), default=-1) < kill_after:
            assert proc.poll() is None, "the run ended before the kill"
            assert time.monotonic() < deadline, "no progress"
            time.sleep(0.05)
        victim = ranks_of(proc.pid)[1]
        os.kill(victim, signal.SIGKILL)
        before = (tmp_path / "metrics.jsonl").read_text().splitlines()  # what the first attempt logged
        killed = time.monotonic()
        rc = proc.wait(timeout=300)
        print(f"killed rank 1 after step {kill_after}; the restarted run finished "
              f"{time.monotonic() - killed:.1f} s later")
    finally:
        try:  # the agent and every rank it started (a failed run must not leave ranks behind)
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()
        log.seek(0)
        output = log.read()
        log.close()
    assert rc == 0, output[-4000:]
    assert output.count("[trainer] run dir") == 2, "one restart of the whole run"
    # the restarted ranks resumed from the newest checkpoint written before the kill ...
    resumed = re.findall(r"\[trainer\] resumed from (\S+) at step (\d+)", output)
    assert len(resumed) == 1, f"the restart must resume from a checkpoint: {resumed}\n{output[-3000:]}"
    folder, at = Path(resumed[0][0]), int(resumed[0][1])
    assert folder == tmp_path / "checkpoints" / f"step-{at:06d}" and kill_after - 1 <= at < steps, resumed
    # ... so the steps up to it were not trained again: their log lines are the first attempt's
    # (their timings would differ), and the restarted attempt logged from the step after it
    first_attempt = [line for line in before if json.loads(line)["step"] <= at]
    assert (tmp_path / "metrics.jsonl").read_text().splitlines()[:len(first_attempt)] == first_attempt
    assert [json.loads(line)["step"] for line in first_attempt] == list(range(at + 1))
    assert logged_steps(tmp_path / "metrics.jsonl") == list(range(steps + 1)), \
        "every step logged exactly once, the held-out evaluation at step 0 too"
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert rows[1]["kl"] < 1e-6, "step 1: the policy is the reference"
    batches = [json.loads(line)["step"] for line in (tmp_path / "batches.jsonl").read_text().splitlines()]
    assert batches == [s for s in range(1, steps + 1) for _ in range(2)], "one batch per rank and step"
    assert (tmp_path / "final" / "model.safetensors").exists()
    # the data position came back too: rank 0's prompts, step by step, are its stream's, in order
    cfg = resolve(parse_config(TrainConfig, args))
    stream = PromptStream(load_examples(cfg.task, "train", seed=cfg.seed), seed=cfg.seed, rank=0,
                          world_size=2)
    want = [stream.next_batch(1)[0]["question"] for _ in range(steps)]
    samples = [json.loads(line) for line in (tmp_path / "samples.jsonl").read_text().splitlines()]
    got = [next(r["question"] for r in samples if r["step"] == s) for s in range(1, steps + 1)]
    assert got == want, "after the restart the prompts continue where the checkpoint left them"
    assert all(sum(r["step"] == s for r in samples) == 4 for s in range(1, steps + 1)), "G rows a step, once"
    latest = (tmp_path / "checkpoints" / "latest").read_text().strip()
    assert latest == f"step-{steps:06d}"
