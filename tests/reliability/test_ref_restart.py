"""The reference server killed with SIGKILL mid-run and restarted 10 s later on the same port:
the trainer waits with a clear message, continues within seconds of the server's return, trains
no batch twice, re-sends its own batch that died in the server's queue, and finishes with its step
count and checkpoint intact."""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import pytest
from pathlib import Path

import torch

from simple_grpo.train.engine import free_port, standalone_env
from simple_grpo.train.rollout_source import RefConnection
from simple_grpo.wire.client import RefClient
from simple_grpo.wire.codec import RolloutBatch

ROOT = Path(__file__).resolve().parents[2]


def start_server(model_dir, port: int, log: Path) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "ref_server.py", f"--model={model_dir}", f"--port={port}",
                             "--torch_threads=1"], cwd=ROOT, env=standalone_env(OMP_NUM_THREADS="1"),
                            stdout=open(log, "a"), stderr=subprocess.STDOUT)
    RefClient(f"http://127.0.0.1:{port}").wait_ready(120, poll_s=0.1)
    return proc


def kill(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGKILL)
    proc.wait()


def batch(batch_id: str, rows: int = 4) -> RolloutBatch:
    return RolloutBatch(prompt_ids=torch.full((rows, 3), 40), prompt_lens=torch.full((rows,), 3),
                        completion_ids=torch.full((rows, 2), 41), completion_lens=torch.full((rows,), 2),
                        rewards=torch.arange(rows).float(), advantages=torch.zeros(rows),
                        batch_id=batch_id, meta={"group_size": 2})


def test_own_batch_lost_in_the_queue_is_resent(tiny_model_dir, tmp_path):
    port = free_port()
    server = start_server(tiny_model_dir, port, tmp_path / "server.log")
    try:
        conn = RefConnection(f"http://127.0.0.1:{port}", None, timeout=60, batch_rows=4)
        RefClient(conn.url).upload(batch("worker-1"))  # ahead of ours in the FIFO queue
        # a rank gets its own batch back first (/get?prefer); take the worker's before ours returns
        ours = batch("ours")
        conn._outstanding = ours
        conn.client.upload(ours)
        assert RefClient(conn.url).get(wait_s=5).batch_id == "worker-1"
        kill(server)  # "ours" dies in the server's queue
        server = start_server(tiny_model_dir, port, tmp_path / "server.log")
        got = conn.next_batch(weight_version=0)
        assert got.batch_id == "ours" and got.ref_logprobs is not None
        assert conn.counts["server_restarts"] == 1 and conn.counts["rollouts_resent"] == 1
        conn.close()
    finally:
        if server.poll() is None:
            kill(server)


@pytest.mark.slow
def test_trainer_survives_a_ref_server_restart(tiny_model_dir, tmp_path):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = start_server(tiny_model_dir, port, tmp_path / "server.log")
    run, steps = tmp_path / "run", 12
    log = tmp_path / "trainer.log"
    trainer = subprocess.Popen(
        [sys.executable, "grpo_ref_split.py", f"--model={tiny_model_dir}", f"--ref_url={url}",
         f"--run_dir={run}", f"--steps={steps}", "--prompts_per_step=2", "--num_generations=4",
         "--micro_batch_size=4", "--max_new_tokens=8", "--rewards=overlong", "--eval_every=0",
         "--save_every=4", "--plot_every=0", "--beta=0.04", "--publish_every=0", "--ref_timeout=120"],
        cwd=ROOT, env=standalone_env(OMP_NUM_THREADS="1"), stdout=open(log, "w"), stderr=subprocess.STDOUT)
    rows = lambda: [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()] \
        if (run / "metrics.jsonl").exists() else []  # noqa: E731
    try:
        deadline = time.monotonic() + 180
        while len(rows()) < 3:
            assert trainer.poll() is None and time.monotonic() < deadline, log.read_text()[-2000:]
            time.sleep(0.1)
        kill(server)
        killed = time.monotonic()
        done_before = len(rows())
        time.sleep(10)
        assert trainer.poll() is None, log.read_text()[-2000:]
        assert len(rows()) <= done_before + 1  # at most the step that had its batch back already
        server = start_server(tiny_model_dir, port, tmp_path / "server.log")
        back = time.monotonic()
        n = len(rows())
        while len(rows()) == n:
            assert trainer.poll() is None and time.monotonic() - back < 30, log.read_text()[-2000:]
            time.sleep(0.05)
        resumed_after = time.monotonic() - back
        restart_took = back - killed
        assert trainer.wait(timeout=300) == 0, log.read_text()[-3000:]
    finally:
        for p in (trainer, server):
            if p.poll() is None:
                kill(p)
    text = log.read_text()
    assert "unreachable" in text and "waiting up to 120 s" in text and "is back" in text, text[-2000:]
    assert "Traceback" not in text
    assert resumed_after < 5, (resumed_after, restart_took)
    metrics = rows()
    assert [r["step"] for r in metrics] == list(range(1, steps + 1))
    assert metrics[-1]["server_restarts"] == 1
    ids = [json.loads(x)["batch_id"] for x in (run / "batches.jsonl").read_text().splitlines()]
    assert len(ids) == steps and len(set(ids)) == steps
    ckpt = run / "checkpoints"
    assert (ckpt / "latest").read_text().strip().endswith(str(steps))
    from transformers import AutoModelForCausalLM
    AutoModelForCausalLM.from_pretrained(run / "final")
    print(f"resumed {resumed_after:.1f} s after the server came back; resent "
          f"{metrics[-1]['rollouts_resent']:.0f} rollout(s)")


@pytest.mark.slow
def test_trainer_restarts_its_own_ref_server(tiny_model_dir, tmp_path):
    """No --ref_url: the trainer's own ref server child is killed; the trainer starts it again."""
    run, log = tmp_path / "run", tmp_path / "trainer.log"
    trainer = subprocess.Popen(
        [sys.executable, "grpo_ref_split.py", f"--model={tiny_model_dir}", f"--run_dir={run}",
         "--steps=8", "--prompts_per_step=2", "--num_generations=4", "--micro_batch_size=4",
         "--max_new_tokens=8", "--rewards=overlong", "--eval_every=0", "--save_every=0",
         "--plot_every=0", "--beta=0.04"],
        cwd=ROOT, env=standalone_env(OMP_NUM_THREADS="1"), stdout=open(log, "w"), stderr=subprocess.STDOUT)
    metrics = run / "metrics.jsonl"
    try:
        deadline = time.monotonic() + 180
        while not metrics.exists() or len(metrics.read_text().splitlines()) < 2:
            assert trainer.poll() is None and time.monotonic() < deadline, log.read_text()[-2000:]
            time.sleep(0.1)
        child = subprocess.run(["pgrep", "-P", str(trainer.pid), "-f", "ref_server.py"],
                               capture_output=True, text=True).stdout.split()
        assert len(child) == 1, child
        subprocess.run(["kill", "-9", child[0]], check=True)
        assert trainer.wait(timeout=300) == 0, log.read_text()[-3000:]
    finally:
        if trainer.poll() is None:
            kill(trainer)
    text = log.read_text()
    assert "the reference server exited; restarted it" in text and "Traceback" not in text, text[-2000:]
    steps = [json.loads(x)["step"] for x in metrics.read_text().splitlines()]
    assert steps == list(range(1, 9))
