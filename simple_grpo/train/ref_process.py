"""Start `ref_server.py` as a child process on a free port, and stop it at exit.

Used when beta > 0 and no --ref_url is given, so the default run needs one command. The child
gets its own process (and so its own CPU core / GPU), which is the point of the split: the
reference forward pass runs while the trainer works.

Placement (`place`): on CPUs the child takes one core; on GPUs a visible GPU that no training
rank of its node uses (never silently a training GPU: without a spare one, one line shows the split
launch), or the device --ref_device names. A run over several nodes reaches it over the network:
the child binds the address this node uses towards the rendezvous host (MASTER_ADDR), with a
random token, and every rank is sent the URL and the token.
"""
from __future__ import annotations

import atexit
import os
import socket
import subprocess
import sys
from pathlib import Path

from simple_grpo.errors import UserError
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

    def __init__(self, model: str, *, dtype: str = "auto", device: str = "auto", host: str = "127.0.0.1",
                 token: str | None = None, extra: list[str] | None = None):
        self.port = free_port(host)
        self.url = f"http://{host}:{self.port}"
        self.token = token
        self.cmd = [sys.executable, str(REF_SERVER), f"--model={model}", f"--host={host}",
                    f"--port={self.port}", f"--dtype={dtype}", f"--device={device}", *(extra or [])]
        self.restarts = 0
        self.proc = self._spawn()
        atexit.register(self.stop)

    def _spawn(self) -> subprocess.Popen:
        env = standalone_env(**({"REF_SERVER_TOKEN": self.token} if self.token else {}))  # not in argv (ps)
        return subprocess.Popen(self.cmd, env=env, stdin=subprocess.DEVNULL, preexec_fn=_die_with_parent)

    def restart(self) -> None:
        """Start the server again on the same port (after it died)."""
        self.stop()
        self.restarts += 1
        self.proc = self._spawn()

    def alive(self) -> bool:
        return self.proc.poll() is None

    def why_dead(self) -> str | None:
        """None while the child runs, else how it ended (for RefClient.wait_ready's `dead`)."""
        code = self.proc.poll()
        return None if code is None else f"exited with code {code}"

    def stop(self, timeout: float = 10.0) -> None:
        stop_process(self.proc, timeout)


def stop_process(proc: subprocess.Popen | None, timeout: float = 10.0) -> None:
    """SIGTERM, then SIGKILL after `timeout` seconds; nothing when it has already exited."""
    if proc is not None and proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def model_args(cfg) -> list[str]:
    """The server options that load the trainer's --model the way the trainer does."""
    return (["--trust_remote_code"] if cfg.trust_remote_code else []) + \
        ([f"--revision={cfg.revision}"] if cfg.revision else [])


SPLIT_LAUNCH = ("CUDA_VISIBLE_DEVICES=7 python ref_server.py --model=MODEL --port=59875 &  then  "
                "CUDA_VISIBLE_DEVICES=0,1,2,3,4,5,6 deepspeed grpo_ref_split.py --model=MODEL "
                "--ref_url=http://127.0.0.1:59875")


def place(ref_device: str, local_ranks: int, gpus: int) -> str:
    """The auto-started server's --device: `ref_device` when named; auto -> cpu without GPUs, else
    the first visible GPU no training rank of this node uses (ranks use local_rank % gpus)."""
    if ref_device != "auto":
        return ref_device
    if gpus == 0:
        return "cpu"
    if gpus > local_ranks:
        return f"cuda:{local_ranks}"
    raise UserError(f"beta > 0 needs a reference model, and all {gpus} visible GPU(s) train: leave one "
                    f"to the reference server (e.g. {SPLIT_LAUNCH}), or --ref_device=cuda:0 to share a "
                    f"training GPU, or --ref_device=cpu")


def reachable_host(several_nodes: bool) -> str:
    """127.0.0.1 for a one-node run; else this node's address towards the rendezvous host."""
    if not several_nodes:
        return "127.0.0.1"
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:  # no packet is sent
        s.connect((os.environ.get("MASTER_ADDR", "127.0.0.1"), int(os.environ.get("MASTER_PORT", "29500"))))
        return s.getsockname()[0]
