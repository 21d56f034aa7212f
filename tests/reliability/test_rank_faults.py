"""Two real ranks under torchrun (gloo on the CPU), and a rank or a disk that fails: every rank stops
with one line, or the run goes on with one warning line, within seconds, and no rank waits in a
collective for --dist_timeout.

* kill -9 of rank 1 mid-run: rank 0's collective fails; it prints one line naming the lost peer
  (no traceback) and the launcher stops the run.
* a checkpoint folder on a tmpfs too small for a checkpoint, with --overlap=true (the layout where
  a 2-rank run used to hang in a barrier DeepSpeed's save had skipped on the failed rank):
  --on_save_error=stop ends both ranks with one line; warn trains on and warns once per failed
  checkpoint."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_rank_restart import logged_steps, ranks_of  # tests/reliability is on sys.path

from simple_grpo.train.engine import free_port, standalone_env

ROOT = Path(__file__).resolve().parents[2]


def launch(model_dir, run_dir: Path, log: Path, **kw) -> subprocess.Popen:
    args = {"model": model_dir, "run_dir": run_dir, "prompts_per_step": 2, "num_generations": 4,
            "micro_batch_size": 4, "max_new_tokens": 8, "eval_every": 0, "plot_every": 0,
            "lr": 1e-3, **kw}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--monitor-interval=0.2",
           "--master_addr=127.0.0.1", f"--master_port={free_port()}", str(ROOT / "grpo_ref_split.py"),
           *[f"--{k}={v}" for k, v in args.items()]]
    return subprocess.Popen(cmd, cwd=ROOT, env=standalone_env(OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu"),
                            stdout=open(log, "w"), stderr=subprocess.STDOUT, start_new_session=True)


def finish(proc: subprocess.Popen, timeout: float) -> int:
    try:
        return proc.wait(timeout=timeout)
    finally:
        try:  # the agent and every rank it started
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()


def ours(output: str, text: str) -> list[str]:
    return [x for x in output.splitlines() if text in x]


@pytest.mark.slow
def test_a_killed_rank_is_one_line_on_its_peer(tiny_model_dir, tmp_path):
    log = tmp_path / "torchrun.log"
    proc = launch(tiny_model_dir, tmp_path / "run", log, steps=200, beta=0.0, save_every=-1)
    deadline = time.monotonic() + 240
    while len(logged_steps(tmp_path / "run" / "metrics.jsonl")) < 3:
        assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
        time.sleep(0.05)
    os.kill(ranks_of(proc.pid)[1], signal.SIGKILL)
    killed = time.monotonic()
    rc = finish(proc, timeout=120)
    took = time.monotonic() - killed
    output = log.read_text(errors="replace")
    print(f"\nkill -9 of rank 1: the run ended {took:.1f} s later")
    assert rc != 0 and took < 30, output[-3000:]
    line = ours(output, "grpo_ref_split.py: error: rank 0 stops: another rank of this run ended")
    assert len(line) == 1, output[-3000:]
    assert "[rank0]: Traceback" not in output, "the collective's error is one line, not a traceback"


@pytest.mark.slow
@pytest.mark.parametrize("on_error", ["stop", "warn"])
def test_a_full_disk_on_two_ranks_is_one_line(tiny_model_dir, tmp_path, small_tmpfs, on_error):
    subprocess.run(["mount", "-o", "remount,size=256k", str(small_tmpfs)], check=True)  # < a checkpoint
    log = tmp_path / "torchrun.log"
    proc = launch(tiny_model_dir, tmp_path, log, steps=4, beta=0.04, overlap="true", save_every=2,
                  on_save_error=on_error, min_free_gb=0)
    started = time.monotonic()
    rc = finish(proc, timeout=240)
    took = time.monotonic() - started
    output = log.read_text(errors="replace")
    print(f"\n--on_save_error={on_error}: the run ended after {took:.1f} s, exit code {rc}")
    failed = ours(output, "checkpoint of step 2 in")
    assert len(failed) == 1, output[-4000:]  # one line, not one per rank
    assert "disk full" in failed[0] or "No space left" in failed[0], failed[0]
    assert not list(small_tmpfs.glob(".tmp-*")), "partial files left on the full disk"
    if on_error == "stop":
        assert rc != 0 and "exitcode  : 2" in output, output[-4000:]
        assert "grpo_ref_split.py: error: checkpoint of step 2" in failed[0], failed[0]
        assert logged_steps(tmp_path / "metrics.jsonl") == [1, 2]
    else:
        assert rc == 0, output[-4000:]
        assert len(ours(output, "checkpoint of step 4 in")) == 1, output[-4000:]
        assert logged_steps(tmp_path / "metrics.jsonl") == [1, 2, 3, 4]
        assert (tmp_path / "final" / "model.safetensors").exists()


def sampler_pid(run_dir: Path) -> int:
    """The pid of the overlap sampler of the run in `run_dir` (started with its sampler-config.json)."""
    want = f"--config={run_dir / 'sampler-config.json'}".encode()
    for d in Path("/proc").iterdir():
        try:
            cmd = (d / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if want in cmd and b"--mode=generate" in cmd:
            return int(d.name)
    raise AssertionError(f"no sampler runs for {run_dir}")


@pytest.mark.slow
def test_a_dead_sampler_reaches_a_rank_on_another_node(tiny_model_dir, tmp_path):
    """Two one-rank nodes (two torchrun agents, --nnodes=2; one machine, so LOCAL_WORLD_SIZE=1 and
    rank 1 cannot see rank 0's processes: it learns through the reference server, where the
    sampler's heartbeat stops). --max_ahead=0, so both ranks wait for the sampler's batch after
    each publish; the sampler is frozen right after it loads step 3's weights (its batches never
    come), then killed: rank 0 sees its process go, rank 1 the silence, within WORKER_SILENCE_S
    and a poll, not --ref_timeout; one line says so, and the run finishes generating locally."""
    port = free_port()
    args = {"model": tiny_model_dir, "run_dir": tmp_path / "run", "prompts_per_step": 2,
            "num_generations": 4, "micro_batch_size": 4, "max_new_tokens": 8, "eval_every": 0,
            "plot_every": 0, "save_every": -1, "lr": 1e-3, "beta": 0.04, "overlap": "true",
            "max_ahead": 0, "steps": 6, "ref_timeout": 200}
    procs, logs = [], []
    for node in (0, 1):
        logs.append(tmp_path / f"node{node}.log")
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", f"--node_rank={node}",
               "--nproc_per_node=1", "--master_addr=127.0.0.1", f"--master_port={port}",
               str(ROOT / "grpo_ref_split.py"), *[f"--{k}={v}" for k, v in args.items()]]
        procs.append(subprocess.Popen(cmd, cwd=ROOT, env=standalone_env(OMP_NUM_THREADS="1",
                                                                        DS_ACCELERATOR="cpu"),
                                      stdout=open(logs[-1], "w"), stderr=subprocess.STDOUT,
                                      start_new_session=True))
    sampler_log, metrics = tmp_path / "run" / "sampler.log", tmp_path / "run" / "metrics.jsonl"
    try:
        deadline = time.monotonic() + 240
        while not (sampler_log.exists() and "(trainer step 3)" in sampler_log.read_text()):
            assert all(p.poll() is None for p in procs) and time.monotonic() < deadline, \
                logs[0].read_text()[-3000:]
            time.sleep(0.01)
        pid = sampler_pid(tmp_path / "run")
        os.kill(pid, signal.SIGSTOP)  # a box that froze: no batch, no heartbeat
        frozen = time.monotonic()
        assert logged_steps(metrics) == [1, 2, 3], "frozen while the ranks wait for step 4's batch"
        time.sleep(2.0)
        os.kill(pid, signal.SIGKILL)
        while len(logged_steps(metrics)) < 4:
            assert all(p.poll() is None for p in procs), logs[1].read_text()[-3000:]
            assert time.monotonic() - frozen < 90, "a rank waited for the dead sampler's batch"
            time.sleep(0.05)
        took = time.monotonic() - frozen
        rcs = [finish(p, timeout=240) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                finish(p, timeout=0)
    out = logs[0].read_text(errors="replace")
    print(f"\nsampler frozen and killed before step 4's batch: step 4 logged {took:.1f} s later")
    assert rcs == [0, 0], out[-3000:] + logs[1].read_text()[-3000:]
    assert took < 30, took  # 20 s of silence, a 2 s poll, one step generated locally
    assert len(ours(out, "the overlap sampler stopped")) == 1, out[-3000:]
    rows = [json.loads(x) for x in metrics.read_text().splitlines()]
    assert [r["overlap_batch"] for r in rows] == [1.0, 1.0, 1.0, 0.0, 0.0, 0.0], rows
