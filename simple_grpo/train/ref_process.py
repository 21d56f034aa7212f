"""Start `ref_server.py` as a child process on a free loopback port, and stop it at exit.

Used when beta > 0 and no --ref_url is given, so the default run needs one command. The child
gets its own process (and so its own CPU core / GPU), which is the point of the split: the
reference forward pass runs while the trainer works.
"""
from __future__ import annotations

import atexit
import subprocess
import sys
from pathlib import Path

from simple_grpo.train.engine import free_port, standalone_env

REF_SERVER = Path(__file__).resolve().parents[2] / "ref_server.py"  # the repo root


def _die_with_parent() -> None:
    """Linux: the child gets SIGTERM when the trainer dies, even by kill -9 (no orphan servers).
    (Strictly: when the thread that started it ends; a restart from the trainer's exchange
    thread is therefore stopped at the latest when that thread ends, at the trainer's exit.)"""
    if sys.platform.startswith("linux"):
        import ctypes
        import signal

        PR_SET_PDEATHSIG = 1
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


class RefProcess:
    """A ref server child process; `url` to reach it, `stop()` (also run at exit) to end it."""

    def __init__(self, model: str, *, dtype: str = "auto", device: str = "auto", extra: list[str] | None = None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.cmd = [sys.executable, str(REF_SERVER), f"--model={model}", "--host=127.0.0.1",
                    f"--port={self.port}", f"--dtype={dtype}", f"--device={device}", *(extra or [])]
        self.restarts = 0
        self.proc = self._spawn()
        atexit.register(self.stop)

    def _spawn(self) -> subprocess.Popen:
        return subprocess.Popen(self.cmd, env=standalone_env(), stdin=subprocess.DEVNULL,
                                preexec_fn=_die_with_parent)

    def restart(self) -> None:
        """Start the server again on the same port (after it died)."""
        self.stop()
        self.restarts += 1
        self.proc = self._spawn()

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self, timeout: float = 10.0) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
