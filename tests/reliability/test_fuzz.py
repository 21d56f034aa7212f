"""Fuzzing a real `python ref_server.py` process (tiny model, loopback): >= 10,000 generated requests
over every endpoint and method - truncations and bit flips of valid encodings, valid encodings of
invalid tensors, random JSON and bytes, wrong headers and query parameters, broken HTTP framing
and huge declared sizes over a raw socket. No answer is ever a 5xx, the process stays alive, its
resident memory returns near the baseline, and a valid /logprobs afterwards is still exact.

The cases come from one seeded generator (deterministic, no hypothesis database), so a failure
names its case number and replays."""
from __future__ import annotations

import os
import random
import subprocess
import sys
import time

import pytest
from collections import Counter
from pathlib import Path

import torch

from simple_grpo.algo.logprobs import completion_logprobs
from simple_grpo.train.engine import free_port, standalone_env
from simple_grpo.wire.client import RefClient

from fuzz_bodies import tiny_ids
from fuzz_gen import Case, Generator, Sender, regressions

ROOT = Path(__file__).resolve().parents[2]
SEED = 20261122
RSS_MARGIN_MIB = 64  # python + torch allocator slack; a per-request leak of 10 KiB would exceed it


# ---------------------------------------------------------------------------- the server process
class ServerProcess:
    """`python ref_server.py ...` on a free loopback port, its output in `log`."""

    def __init__(self, model_dir, log: Path, *args: str):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        self.proc = subprocess.Popen(
            [sys.executable, "ref_server.py", f"--model={model_dir}", f"--port={self.port}",
             "--torch_threads=1", *args], cwd=ROOT, stdout=open(log, "w"),
            stderr=subprocess.STDOUT, env=standalone_env(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1"))
        try:
            self.health = RefClient(self.url, token=self._token(args)).wait_ready(120, poll_s=0.1)
        except BaseException:
            self.stop()
            raise

    @staticmethod
    def _token(args) -> str | None:
        return next((a.split("=", 1)[1] for a in args if a.startswith("--token=")), None)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def rss_mib(self) -> float:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        raise AssertionError("no VmRSS")

    def output(self) -> str:
        return self.log.read_text(errors="replace")[-4000:]

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def status_class(status: int | None) -> str:
    return "no answer" if status is None else f"{status // 100}xx"


@pytest.mark.slow
def test_fuzz_ref_server(tiny_model_dir, tiny_model, tmp_path):
    n_cases = int(os.environ.get("FUZZ_CASES", 10_000))
    srv = ServerProcess(tiny_model_dir, tmp_path / "server.log", "--queue_size=8",
                        "--when_full=drop_oldest", "--max_body_mb=1", "--max_weights_mb=4",
                        f"--weights_dir={tmp_path / 'weights'}", "--request_timeout_s=5")
    try:
        gen = Generator(SEED, srv.health["max_len"])
        sender = Sender(srv.port)
        for c, want in regressions():
            assert sender.send(c) == want, c
        # warm-up: every endpoint's good path and a few errors, the queue filled to its bound
        warm = [gen.valid() for _ in range(300)] + [gen.mutated() for _ in range(100)]
        warm += [Case("valid", "POST", "/upload", {}, b) for b in gen.batches]
        for c in warm:
            assert status_class(sender.send(c)) in ("2xx", "4xx"), c
        baseline = srv.rss_mib()

        by_class: Counter = Counter()
        by_cat: Counter = Counter()
        statuses: Counter = Counter()
        seconds: Counter = Counter()
        silent: Counter = Counter()  # raw-socket cases the server did not answer (unfinished)
        bad: list[tuple[int, Case, int | None]] = []
        t0 = time.monotonic()
        for i in range(n_cases):
            c = gen.next()
            t1 = time.monotonic()
            status = sender.send(c)
            cat = c.cat.split("/")[0]
            seconds[cat] += time.monotonic() - t1
            by_cat[cat] += 1
            if status is None:
                silent[c.cat] += 1
            by_class[status_class(status)] += 1
            statuses[status] += 1
            if status is not None and status >= 500:
                bad.append((i, c, status))
            if status is None and c.raw is None:
                bad.append((i, c, status))  # an ordinary request must always get an answer
            if i % 1000 == 999:
                assert srv.alive(), f"server died at case {i}: {srv.output()}"
        elapsed = time.monotonic() - t0
        sender.close()
        after = srv.rss_mib()
        print(f"\nfuzz: {n_cases} cases in {elapsed:.1f} s; by category {dict(by_cat)}; "
              f"answers {dict(by_class)}; statuses {dict(statuses)}; unanswered {dict(silent)}; "
              f"RSS baseline {baseline:.1f} MiB, after {after:.1f} MiB; seconds by category "
              f"{ {k: round(v, 1) for k, v in seconds.items()} }")
        assert not bad, f"{len(bad)} bad answers, first: {bad[:5]}\n{srv.output()}"
        assert srv.alive()
        assert by_class["2xx"] > 500 and by_class["4xx"] > 5000
        assert after - baseline < RSS_MARGIN_MIB, (baseline, after)

        # a valid request afterwards is answered exactly
        client = RefClient(srv.url)
        req = tiny_ids(random.Random(1), 3, 6, 5)
        ids = (req.prompt_ids, req.prompt_lens, req.completion_ids, req.completion_lens)
        with torch.inference_mode():
            want = completion_logprobs(tiny_model, *ids)
        torch.testing.assert_close(client.logprobs(*ids), want, atol=1e-5, rtol=0)
        s = client.stats()
        assert s["queue_depth"] <= 8 and s["in_flight"] == 0
        assert "Traceback" not in srv.output(), srv.output()
    finally:
        srv.stop()
