"""The trainer process under checkpoint faults, end to end on the tiny model (CPU, beta 0, so no
reference server): `kill -9` in the middle of a checkpoint, a full disk (or file-size limit) at
checkpoint time with --on_save_error=warn and =stop, and a final export that cannot be written.

The full disk needs no root: the test lowers the running trainer's RLIMIT_FSIZE soft limit with
prlimit(2), so its checkpoint writes fail with EFBIG exactly like ENOSPC (the trainer ignores
SIGXFSZ). Where a tmpfs can be mounted (root) a variant also fills a real, tiny filesystem.
"""
from __future__ import annotations

import json
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from simple_grpo.train.engine import standalone_env

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = str(ROOT / "grpo_ref_split.py")
TMP_STEP = re.compile(r"^\.tmp-step-(\d+)$")


def trainer_args(model_dir, run_dir, **kw) -> list[str]:
    args = dict(model=model_dir, run_dir=run_dir, steps=4, prompts_per_step=2, num_generations=4,
                micro_batch_size=4, max_new_tokens=8, eval_every=0, lr=1e-3, warmup_steps=1,
                beta=0.0, rewards="overlong", save_every=1, plot_every=0, samples_every=1)
    args.update(kw)
    return [f"--{k}={v}" for k, v in args.items()]


class Trainer:
    """`python grpo_ref_split.py ...` with its stdout/stderr lines collected by reader threads."""

    def __init__(self, model_dir, run_dir, *, wrapper: str | None = None, **kw):
        cmd = [sys.executable, SCRIPT] if wrapper is None else [sys.executable, "-c", wrapper, SCRIPT]
        self.proc = subprocess.Popen(
            [*cmd, *trainer_args(model_dir, run_dir, **kw)], cwd=ROOT, text=True,
            env=standalone_env(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1"),
            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self.out: list[str] = []
        self.err: list[str] = []
        self._threads = [threading.Thread(target=self._read, args=(s, dst), daemon=True)
                         for s, dst in ((self.proc.stdout, self.out), (self.proc.stderr, self.err))]
        for t in self._threads:
            t.start()

    @staticmethod
    def _read(stream, dst: list[str]) -> None:
        for line in stream:  # text mode: tqdm's "\r" also ends a line
            dst.append(line.rstrip("\n"))

    @property
    def pid(self) -> int:
        return self.proc.pid

    def wait(self, timeout: float = 240) -> int:
        try:
            rc = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            pytest.fail(f"trainer still running after {timeout} s:\n{self.tail()}")
        for t in self._threads:
            t.join(timeout=10)
        return rc

    def tail(self, n: int = 3000) -> str:
        return ("\n".join(self.out) + "\n--- stderr ---\n" + "\n".join(self.err))[-n:]

    def wait_for(self, what: str, cond, timeout: float = 180, interval: float = 0.005):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            got = cond()
            if got:
                return got
            if self.proc.poll() is not None:
                self.wait()
                pytest.fail(f"trainer exited ({self.proc.returncode}) before {what}:\n{self.tail()}")
            time.sleep(interval)
        self.proc.kill()
        pytest.fail(f"timed out waiting for {what}:\n{self.tail()}")

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.wait()


@pytest.fixture
def trainers():
    """Factory for Trainer processes; any still running at the end of the test are killed."""
    started: list[Trainer] = []

    def make(*a, **kw) -> Trainer:
        started.append(Trainer(*a, **kw))
        return started[-1]

    yield make
    for t in started:
        t.kill()


def latest(ckpts: Path) -> str | None:
    try:
        return (ckpts / "latest").read_text().strip()
    except FileNotFoundError:
        return None


def snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    return {p.name: (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.iterdir()}


def checkpoint_step(folder: Path) -> int:
    """Load a checkpoint's weights file (tensors and plain data only) -> the step it records."""
    sd = torch.load(folder / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=True)
    assert sd["module"], f"{folder}: no weights in the model states file"
    return sd["simple_grpo_client_state"]["step"]


def metric_steps(run_dir: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def assert_final_loads(run_dir: Path) -> None:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(run_dir / "final")
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=torch.tensor([[3, 4, 5]])).logits).all()


def result_steps(t: Trainer) -> int:
    return json.loads(t.out[-1])["steps"]


def lower_fsize(pid: int, limit: int) -> None:
    """Lower only the soft limit: raising a hard limit back needs CAP_SYS_RESOURCE."""
    _, hard = resource.prlimit(pid, resource.RLIMIT_FSIZE)
    resource.prlimit(pid, resource.RLIMIT_FSIZE, (limit, hard))


def restore_fsize(pid: int) -> None:
    try:
        _, hard = resource.prlimit(pid, resource.RLIMIT_FSIZE)
        resource.prlimit(pid, resource.RLIMIT_FSIZE, (hard, hard))
    except ProcessLookupError:
        pass


# ----------------------------------------------------------------------------- kill -9

def kill_mid_checkpoint(t: Trainer, ckpts: Path, stats: dict) -> int | None:
    """Poll for `.tmp-step-N` (N >= 2, so a complete checkpoint exists before it); SIGSTOP the
    trainer, and if the temp folder still exists (the save is provably unfinished) SIGKILL it.
    Otherwise SIGCONT and try the next save. -> N, or None when the run ended first."""
    while t.proc.poll() is None:
        names = os.listdir(ckpts) if ckpts.is_dir() else []
        for name in names:
            m = TMP_STEP.match(name)
            if not m or int(m.group(1)) < 2:
                continue
            os.kill(t.pid, signal.SIGSTOP)
            stats["stops"] += 1
            if (ckpts / name).is_dir():
                os.kill(t.pid, signal.SIGKILL)
                t.wait()
                return int(m.group(1))
            stats["missed"] += 1
            os.kill(t.pid, signal.SIGCONT)
        time.sleep(0.001)
    t.wait()
    return None


@pytest.mark.slow
def test_kill_9_mid_checkpoint_then_resume(tiny_model_dir, tmp_path, trainers):
    from simple_grpo.train.checkpoint import step_tag

    steps, stats = 5, {"stops": 0, "missed": 0}
    for attempt in range(3):
        run_dir = tmp_path / f"run{attempt}"
        ckpts = run_dir / "checkpoints"
        t = trainers(tiny_model_dir, run_dir, steps=steps, save_every=1)
        killed_at = kill_mid_checkpoint(t, ckpts, stats)
        if killed_at is not None:
            break
        assert t.proc.returncode == 0, t.tail()
    else:
        pytest.fail(f"never caught the trainer inside a checkpoint save in 3 runs ({stats})")
    print(f"\nkill -9 landed mid-checkpoint of step {killed_at} on attempt {attempt + 1}; {stats}")
    assert t.proc.returncode == -signal.SIGKILL

    # the killed save left its temp folder; `latest` still names the previous complete checkpoint
    assert (ckpts / f".tmp-{step_tag(killed_at)}").is_dir()
    assert latest(ckpts) == step_tag(killed_at - 1), (latest(ckpts), killed_at)
    assert not (ckpts / step_tag(killed_at)).exists()
    assert checkpoint_step(ckpts / step_tag(killed_at - 1)) == killed_at - 1

    r = trainers(tiny_model_dir, run_dir, steps=steps, save_every=1, resume="true")
    assert r.wait() == 0, r.tail()
    assert result_steps(r) == steps
    assert metric_steps(run_dir) == list(range(1, steps + 1)), "each step logged exactly once"
    batch_steps = [json.loads(x)["step"] for x in (run_dir / "batches.jsonl").read_text().splitlines()]
    assert batch_steps == list(range(1, steps + 1)), batch_steps
    assert not list(ckpts.glob(".tmp-*")), f"stale temp folders left: {list(ckpts.glob('.tmp-*'))}"
    assert latest(ckpts) == step_tag(steps)
    assert not [p for p in run_dir.iterdir() if p.name.startswith(".tmp")]
    assert_final_loads(run_dir)


# ----------------------------------------------------------------------------- full disk (prlimit)

def fail_next_save(t: Trainer, run_dir: Path, first: str) -> tuple[dict, int]:
    """Once checkpoint `first` is the latest, lower the trainer's file-size limit below the
    checkpoint's largest file (but far above the log files), so its next save fails with EFBIG.
    -> (snapshot of the `first` folder, the limit)."""
    ckpts = run_dir / "checkpoints"
    t.wait_for(f"checkpoint {first}", lambda: latest(ckpts) == first)
    os.kill(t.pid, signal.SIGSTOP)  # no race with the next save while we look and set the limit
    try:
        assert latest(ckpts) == first and not list(ckpts.glob(".tmp-*")), "next save already began"
        sizes = [p.stat().st_size for p in (ckpts / first).iterdir()]
        logs = [p.stat().st_size for p in run_dir.glob("*.jsonl")]
        limit = max(sizes) // 4
        assert max(logs) * 8 < limit, f"log files ({logs}) too close to the file-size limit {limit}"
        lower_fsize(t.pid, limit)
    finally:
        os.kill(t.pid, signal.SIGCONT)
    return snapshot(ckpts / first), limit


def line_with(lines: list[str], text: str) -> list[str]:
    return [ln for ln in lines if text in ln]


@pytest.mark.slow
def test_full_disk_at_checkpoint_warn_keeps_training(tiny_model_dir, tmp_path, trainers):
    ckpts = tmp_path / "checkpoints"
    # --min_free_gb above any real disk: the pre-save check warns before each of the 3 saves
    t = trainers(tiny_model_dir, tmp_path, steps=6, save_every=2, on_save_error="warn", min_free_gb=1e6)
    before, limit = fail_next_save(t, tmp_path, "step-000002")
    try:
        t.wait_for("the failed-save warning", lambda: line_with(t.err, "checkpoint of step 4"))
    finally:
        restore_fsize(t.pid)
    assert t.wait() == 0, t.tail()
    warning = line_with(t.err, "checkpoint of step 4")
    print(f"\nfile-size limit {limit} bytes; warning seen:\n{warning[0]}")
    assert len(warning) == 1, warning
    assert len(line_with(t.err, "low disk space")) == 3, t.tail()
    for part in ("failed", f"at most {limit} bytes", "ulimit -f", "step-000002", str(ckpts)):
        assert part in warning[0], (part, warning[0])
    assert "Traceback" not in "\n".join(t.err), t.tail()
    assert result_steps(t) == 6 and metric_steps(tmp_path) == [1, 2, 3, 4, 5, 6]
    assert snapshot(ckpts / "step-000002") == before, "the older checkpoint was modified"
    assert checkpoint_step(ckpts / "step-000002") == 2
    assert latest(ckpts) == "step-000006" and not (ckpts / "step-000004").exists()
    assert not list(ckpts.glob(".tmp-*"))
    assert_final_loads(tmp_path)


@pytest.mark.slow
def test_full_disk_at_checkpoint_stop_exits_2_and_resumes(tiny_model_dir, tmp_path, trainers):
    ckpts = tmp_path / "checkpoints"
    t = trainers(tiny_model_dir, tmp_path, steps=4, save_every=2, on_save_error="stop")
    before, _ = fail_next_save(t, tmp_path, "step-000002")
    assert t.wait() == 2, t.tail()
    errors = line_with(t.err, "error:")
    print(f"\nerror seen:\n{errors}")
    assert len(errors) == 1 and errors[0].startswith("grpo_ref_split.py: error: checkpoint of step 4")
    assert "ulimit -f" in errors[0] and "step-000002" in errors[0], errors[0]
    assert "Traceback" not in "\n".join(t.err), t.tail()
    assert len(line_with(t.err, "checkpoint of step 4")) == 1, "said once, as the error"
    assert latest(ckpts) == "step-000002" and snapshot(ckpts / "step-000002") == before
    assert not list(ckpts.glob(".tmp-*")) and not (ckpts / "step-000004").exists()

    r = trainers(tiny_model_dir, tmp_path, steps=4, save_every=2, on_save_error="stop", resume="true")
    assert r.wait() == 0, r.tail()
    assert result_steps(r) == 4 and metric_steps(tmp_path) == [1, 2, 3, 4]
    assert latest(ckpts) == "step-000004"
    assert_final_loads(tmp_path)


# ----------------------------------------------------------------------------- full disk (tmpfs)

def test_real_full_tmpfs_at_checkpoint_warns(tiny_model_dir, tmp_path, small_tmpfs, trainers):
    ckpts = small_tmpfs
    t = trainers(tiny_model_dir, tmp_path, steps=4, save_every=2, on_save_error="warn")
    t.wait_for("checkpoint step-000002", lambda: latest(ckpts) == "step-000002")
    os.kill(t.pid, signal.SIGSTOP)
    try:
        used = shutil.disk_usage(ckpts).used
        one = sum(p.stat().st_size for p in (ckpts / "step-000002").iterdir())
        size = (used + one // 2) // 4096 * 4096  # room for half of the next checkpoint
        subprocess.run(["mount", "-o", f"remount,size={size}", str(ckpts)], check=True)
    finally:
        os.kill(t.pid, signal.SIGCONT)
    before = snapshot(ckpts / "step-000002")
    assert t.wait() == 0, t.tail()
    warning = line_with(t.err, "checkpoint of step 4")
    print(f"\ntmpfs of {size} bytes; warning seen:\n{warning}")
    assert len(warning) == 1 and "step-000002" in warning[0], t.tail()
    assert "disk full" in warning[0] or "No space left" in warning[0], warning[0]
    assert latest(ckpts) == "step-000002" and snapshot(ckpts / "step-000002") == before
    assert checkpoint_step(ckpts / "step-000002") == 2
    assert not list(ckpts.glob(".tmp-*")), "partial files left on the full disk"
    assert metric_steps(tmp_path) == [1, 2, 3, 4]
    assert_final_loads(tmp_path)  # run_dir itself is not on the full tmpfs


# ----------------------------------------------------------------------------- final export

# Runs the trainer as __main__ with the final export under a 20 kB file-size limit (a real EFBIG
# from safetensors / the tokenizer writer); checkpoints are written before it, unlimited.
EXPORT_LIMITED = """
import resource, runpy, signal, sys
sys.path.insert(0, {root!r})
from simple_grpo.train import checkpoint
real = checkpoint.export_pretrained
def limited(*a, **k):
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, hard))
    try:
        return real(*a, **k)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
checkpoint.export_pretrained = limited
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


@pytest.mark.slow
def test_final_export_failure_is_one_line_and_resume_exports(tiny_model_dir, tmp_path, trainers):
    t = trainers(tiny_model_dir, tmp_path, steps=2, save_every=0,
                 wrapper=EXPORT_LIMITED.format(root=str(ROOT)))
    assert t.wait() == 2, t.tail()
    errors = line_with(t.err, "error:")
    print(f"\nerror seen:\n{errors}")
    assert len(errors) == 1 and errors[0].startswith("grpo_ref_split.py: error:"), t.tail()
    assert str(tmp_path / "final") in errors[0], errors[0]
    assert str(tmp_path / "checkpoints" / "step-000002") in errors[0], errors[0]
    assert "--resume" in errors[0], errors[0]
    assert "Traceback" not in "\n".join(t.err), t.tail()
    assert not (tmp_path / "final").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp")], "partial export left"
    assert latest(tmp_path / "checkpoints") == "step-000002"

    r = trainers(tiny_model_dir, tmp_path, steps=2, save_every=0, resume="true")  # export only
    assert r.wait() == 0, r.tail()
    assert result_steps(r) == 2 and metric_steps(tmp_path) == [1, 2]
    assert_final_loads(tmp_path)


def test_export_removes_leftovers_of_a_killed_export(tmp_path):
    """A trainer killed during the final export leaves `.tmp-final-*` (and `.tmp-old-final-*`)
    folders next to `final/`; the next export removes them."""
    from simple_grpo.models import build_tiny_model, build_tiny_tokenizer
    from simple_grpo.train.checkpoint import export_pretrained

    for name in (".tmp-final-x1y2", ".tmp-old-final-z3"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "model.safetensors").write_bytes(b"partial")
    (tmp_path / ".tmp-keep-me").mkdir()  # not an export's: left alone
    export_pretrained(build_tiny_model(), build_tiny_tokenizer(), tmp_path / "final")
    assert sorted(p.name for p in tmp_path.iterdir()) == [".tmp-keep-me", "final"]
    assert_final_loads(tmp_path)
