"""Fixtures and checks the recipe tests share: a local gsm8k-style jsonl, processes that stop with
the test, network-namespace hosts. (Not a conftest.py: tests/conftest.py is imported by name.)"""
from __future__ import annotations

import json
import signal
import subprocess
from pathlib import Path

import pytest

from simple_grpo.train.engine import standalone_env

ENV = dict(OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false")


@pytest.fixture
def gsm8k_jsonl(tmp_path) -> Path:
    """What `--task=openai/gsm8k:main --answer_field=answer` reads from the hub, as a local file."""
    path = tmp_path / "gsm8k.jsonl"
    rows = [{"question": f"Tom has {a} apples and buys {b} more. How many apples does he have?",
             "answer": f"He has {a} + {b} = {a + b} apples.\n#### {a + b}"}
            for a in range(1, 9) for b in range(1, 6)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture
def procs():
    """start(argv, log, env=..., prefix=...) -> Popen in its own session; all are killed (with
    whatever they started) at the end of the test."""
    started: list[subprocess.Popen] = []

    def start(argv: list[str], log: Path, env: dict | None = None, prefix: list[str] = ()) -> subprocess.Popen:
        p = subprocess.Popen([*prefix, *argv], cwd=Path(__file__).resolve().parents[2],
                             env=standalone_env(**ENV, **(env or {})), stdout=open(log, "w"),
                             stderr=subprocess.STDOUT, start_new_session=True)
        started.append(p)
        return p

    yield start
    for p in started:
        if p.poll() is None:
            try:
                p.send_signal(signal.SIGTERM)
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


def rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def assert_every_rank_trained_every_step(run_dir: Path, steps: int, ranks: int) -> list[dict]:
    """metrics.jsonl has steps 1..steps once; batches.jsonl one batch per rank and step; final/."""
    metrics = rows(run_dir / "metrics.jsonl")
    assert [r["step"] for r in metrics if "reward_mean" in r] == list(range(1, steps + 1)), metrics
    trained = rows(run_dir / "batches.jsonl")
    assert [t["step"] for t in trained] == [s for s in range(1, steps + 1) for _ in range(ranks)], trained
    assert len({t["batch_id"] for t in trained}) == len(trained), "a batch trained twice"
    assert (run_dir / "final" / "model.safetensors").exists() or (run_dir / "final" / "adapter").exists()
    return metrics


class Hosts:
    """n network namespaces joined by a bridge: separate "hosts" with their own loopback and an
    address each (10.99.K.1, .2, ...); this process reaches them from the bridge's 10.99.K.254."""

    def __init__(self, n: int):
        import os

        self.tag = f"{os.getpid() % 100000}"
        k = os.getpid() % 200 + 10
        self.bridge = f"sgb{self.tag}"
        self.ns = [f"sg{self.tag}h{i}" for i in range(n)]
        self.ifname = [f"sg{self.tag}v{i}" for i in range(n)]
        self.addr = [f"10.99.{k}.{i + 1}" for i in range(n)]
        try:
            self._setup(k)
        except BaseException:
            self.close()
            raise

    def _setup(self, k: int) -> None:
        self._run("ip", "link", "add", self.bridge, "type", "bridge")
        self._run("ip", "addr", "add", f"10.99.{k}.254/24", "dev", self.bridge)
        self._run("ip", "link", "set", self.bridge, "up")
        for ns, ifname, addr in zip(self.ns, self.ifname, self.addr):
            peer = ifname.replace("v", "p")
            self._run("ip", "netns", "add", ns)
            self._run("ip", "link", "add", ifname, "type", "veth", "peer", "name", peer)
            self._run("ip", "link", "set", ifname, "netns", ns)
            self._run("ip", "link", "set", peer, "master", self.bridge)
            self._run("ip", "link", "set", peer, "up")
            self._run("ip", "-n", ns, "addr", "add", f"{addr}/24", "dev", ifname)
            self._run("ip", "-n", ns, "link", "set", ifname, "up")
            self._run("ip", "-n", ns, "link", "set", "lo", "up")

    @staticmethod
    def _run(*cmd: str) -> None:
        subprocess.run(cmd, check=True, capture_output=True, text=True)

    def prefix(self, i: int) -> list[str]:
        """Run a command on host i."""
        return ["ip", "netns", "exec", self.ns[i]]

    def close(self) -> None:
        for ns in self.ns:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        subprocess.run(["ip", "link", "del", self.bridge], capture_output=True)


@pytest.fixture
def hosts(request):
    """hosts(n) -> Hosts; skipped with the reason where network namespaces cannot be made (not
    root, or no CAP_NET_ADMIN in a container)."""
    import os
    import shutil

    made: list[Hosts] = []

    def make(n: int) -> Hosts:
        if os.geteuid() != 0 or shutil.which("ip") is None:
            pytest.skip("separate hosts need network namespaces: run as root with iproute2")
        try:
            made.append(Hosts(n))
        except subprocess.CalledProcessError as e:
            pytest.skip(f"network namespaces are not allowed here: {e.stderr.strip()[:200]}")
        return made[-1]

    yield make
    for h in made:
        h.close()
