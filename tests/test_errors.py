"""run_entry_point as users see it: one line for a UserError, exit codes, and a SIGTERM that is
never lost, even when it lands inside a weakref callback (where Python swallows exceptions)."""
from __future__ import annotations

import subprocess

import pytest
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# main() loops over "steps" like the trainer. At step 3 a weakref callback sends this process
# SIGTERM: the handler's SystemExit is raised inside the callback, where Python only prints
# "Exception ignored in ..." and goes on. The next step boundary must exit 143, silently.
SCRIPT = textwrap.dedent("""
    import os, signal, sys, time, weakref
    from simple_grpo.errors import UserError, exit_if_terminated, run_entry_point

    class Obj:
        pass

    def main(argv):
        if argv == ["bad"]:
            raise UserError("--x must be > 0")
        for step in range(50):
            exit_if_terminated()
            if step == 3:
                def in_callback(_):
                    os.kill(os.getpid(), signal.SIGTERM)
                    for _ in range(1000):  # the handler runs here, inside the callback
                        pass
                o = Obj()
                ref = weakref.ref(o, in_callback)
                del o
            time.sleep(0.01)
            print("step", step, flush=True)
        print("finished all steps", flush=True)

    run_entry_point(main, sys.argv[1:], "prog")
""")


def run(tmp_path, *args) -> subprocess.CompletedProcess:
    script = tmp_path / "prog.py"
    script.write_text(SCRIPT)
    return subprocess.run([sys.executable, str(script), *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=60, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})


def test_sigterm_inside_a_weakref_callback_still_exits_143_without_a_traceback(tmp_path):
    r = run(tmp_path)
    assert r.returncode == 143, (r.returncode, r.stdout[-500:], r.stderr[-2000:])
    assert "finished all steps" not in r.stdout
    assert "step 3" in r.stdout and "step 5" not in r.stdout  # exits at the next step boundary
    assert "Exception ignored" not in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_user_error_is_one_line_and_exit_code_2(tmp_path):
    r = run(tmp_path, "bad")
    assert r.returncode == 2
    assert r.stderr.strip() == "prog: error: --x must be > 0"


def test_a_line_every_rank_meets_is_printed_once_per_launch(monkeypatch, tmp_path):
    """Under a launcher (WORLD_SIZE > 1) the first rank to report a line prints it and the others of
    the launch stay quiet; another line, another launch (MASTER_PORT) or a stale marker prints."""
    import os
    import time

    from simple_grpo import errors

    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert errors.first_report("x: error: a") and errors.first_report("x: error: a")  # no launcher
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("MASTER_PORT", "29500")
    assert errors.first_report("x: error: a")  # rank 0
    assert not errors.first_report("x: error: a")  # rank 1: the same line
    assert errors.first_report("x: error: b")  # a line of its own
    monkeypatch.setenv("MASTER_PORT", "29501")
    assert errors.first_report("x: error: a")  # another launch
    for p in tmp_path.iterdir():
        os.utime(p, (time.time() - 600, time.time() - 600))  # every marker an old launch's
    monkeypatch.setenv("MASTER_PORT", "29500")
    assert errors.first_report("x: error: a")  # the old marker is claimed again
    assert not errors.first_report("x: error: a")
    assert len(list(tmp_path.iterdir())) == 1, "the claim removed the old launches' markers"


@pytest.mark.slow
def test_torchrun_prints_a_bad_option_once(tmp_path):
    """Two real ranks under torchrun, one bad option: its line once, the launcher's block after."""
    from simple_grpo.train.engine import free_port, standalone_env

    got = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                          f"--master_port={free_port()}", str(ROOT / "grpo_ref_split.py"), "--lr=-1",
                          f"--run_dir={tmp_path}"],
                         cwd=ROOT, env={**standalone_env(OMP_NUM_THREADS="1"), "TMPDIR": str(tmp_path)},
                         capture_output=True, text=True, timeout=300)
    lines = [x for x in got.stderr.splitlines() if "error: --lr must be > 0" in x]
    assert got.returncode != 0 and len(lines) == 1, got.stderr[-3000:]
    assert "exitcode  : 2" in got.stderr, got.stderr[-3000:]  # what the README says torchrun adds
