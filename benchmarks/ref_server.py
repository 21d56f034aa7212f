"""Reference server overhead: end-to-end HTTP round trips vs the same forward pass in-process.

    python benchmarks/ref_server.py --model=smollm2-135m --shapes=16x128,64x512 --reps=3

It starts `python ref_server.py` as a subprocess on a free loopback port, loads the same model in
this process, and for each shape B x T (prompt width T/4, completion width 3T/4, ragged lengths)
times, as medians over --reps:
    in-process   completion_logprobs(model, ...) under inference_mode, in this process
    /logprobs    client.logprobs(...) round trip (encode, HTTP, validate, forward, encode, decode)
    upload+get   client.upload(batch) + client.get() round trip (the trainer's path)
    server fwd   the forward time measured inside the server (under its model lock)
and prints the HTTP + codec overhead, (round trip - server fwd), as a fraction of the in-process
forward, and the raw round trip / in-process ratio (noisy on a shared machine: the two forward
passes run at different moments, so the overhead column is the one to read). Both processes use --torch_threads threads and never compute at the same time. Not a
test: the numbers depend on the machine and on what else runs on it.

Batching (--clients=1,2,4, --concurrent_shape=B x T; --shapes= skips the part above): N clients each
send one /logprobs request of that shape at the same moment; the wall time until all are answered
is timed (median of --reps) on the server as it runs (concurrent requests share forward passes) and
on a second server with --batch_tokens=1 (one request per pass: one at a time), with the ratio.
"""
from __future__ import annotations

import os
import platform
import re
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from simple_grpo.algo.logprobs import completion_logprobs  # noqa: E402
from simple_grpo.cli import parse_config  # noqa: E402
from simple_grpo.errors import UserError  # noqa: E402
from simple_grpo.models import load_model  # noqa: E402
from simple_grpo.wire.client import RefClient  # noqa: E402
from simple_grpo.wire.codec import RolloutBatch  # noqa: E402


@dataclass
class BenchConfig:
    """Reference-server round trip vs in-process forward."""
    model: str = "smollm2-135m"
    """Model for both the server and the in-process pass (default: the bundled SmolLM2-135M)."""
    shapes: str = "16x128,64x512"
    """Comma-separated B x T shapes (T = prompt width + completion width)."""
    reps: int = 3
    """Timed repetitions per shape and path (medians are reported), after one warm-up."""
    torch_threads: int = 0
    """torch threads in both processes (0 = the number of cores)."""
    device: str = "cpu"
    """Device for both processes."""
    clients: str = "1,2,4"
    """Comma-separated numbers of concurrent clients for the batching table ("" skips it)."""
    concurrent_shape: str = "8x128"
    """B x T of each concurrent client's request."""


def make_batch(B: int, T: int, vocab: int, seed: int) -> RolloutBatch:
    g = torch.Generator().manual_seed(seed)
    P = T // 4
    C = T - P
    return RolloutBatch(
        prompt_ids=torch.randint(0, vocab, (B, P), generator=g),
        prompt_lens=torch.randint(P // 2, P + 1, (B,), generator=g),
        completion_ids=torch.randint(0, vocab, (B, C), generator=g),
        completion_lens=torch.randint(C // 2, C + 1, (B,), generator=g),
        rewards=torch.randn(B, generator=g), advantages=torch.randn(B, generator=g),
        gen_logprobs=-torch.rand(B, C, generator=g), weight_version=1, meta={"seed": seed})


def start_server(cfg: BenchConfig, threads: int, *extra: str) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen([sys.executable, "ref_server.py", f"--model={cfg.model}", "--port=0",
                             f"--device={cfg.device}", f"--torch_threads={threads}",
                             "--max_body_mb=512", *extra], cwd=ROOT, text=True, stdout=subprocess.PIPE,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    for line in proc.stdout:
        print("   ", line.rstrip(), flush=True)
        m = re.search(r"serving on (http://\S+)", line)
        if m:
            return proc, m.group(1)
    raise UserError(f"ref_server.py exited with code {proc.wait()} before serving")


def concurrent_wall(url: str, reqs: list[RolloutBatch], reps: int) -> tuple[float, list]:
    """Median wall time (after one warm-up) of len(reqs) clients each sending one /logprobs at
    the same moment, until all are answered; and the last answers."""
    clients = [RefClient(url, timeout=3600) for _ in reqs]
    times, out = [], [None] * len(reqs)
    for rep in range(reps + 1):
        go = threading.Barrier(len(reqs) + 1)

        def one(i: int) -> None:
            go.wait()
            b = reqs[i]
            out[i] = clients[i].logprobs(b.prompt_ids, b.prompt_lens, b.completion_ids, b.completion_lens)

        threads = [threading.Thread(target=one, args=(i,)) for i in range(len(reqs))]
        for t in threads:
            t.start()
        go.wait()
        t0 = time.perf_counter()
        for t in threads:
            t.join()
        if rep:
            times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def batching_table(cfg: BenchConfig, threads: int, url: str, vocab: int) -> None:
    B, T = (int(x) for x in cfg.concurrent_shape.lower().split("x"))
    counts = [int(n) for n in cfg.clients.split(",")]
    alone_proc, alone_url = start_server(cfg, threads, "--batch_tokens=1")
    try:
        RefClient(alone_url).wait_ready(600)
        rows = []
        for n in counts:
            reqs = [make_batch(B, T, vocab, seed=1000 + i) for i in range(n)]
            before = RefClient(url).stats()
            t_batched, got = concurrent_wall(url, reqs, cfg.reps)
            after = RefClient(url).stats()
            t_alone, want = concurrent_wall(alone_url, reqs, cfg.reps)
            assert all(torch.allclose(g, w, atol=1e-4) for g, w in zip(got, want)), "batched != alone"
            per_pass = (after["compute_calls"] - before["compute_calls"]) / max(
                1, after["forwards"] - before["forwards"])
            rows.append((n, t_batched, t_alone, per_pass))
            print(f"  {n} clients: batched {t_batched * 1e3:.0f} ms, one at a time "
                  f"{t_alone * 1e3:.0f} ms, {per_pass:.2f} requests per pass", flush=True)
    finally:
        alone_proc.terminate()
        alone_proc.wait(timeout=30)
    print()
    print(f"concurrent /logprobs, each {B} x {T}, device {cfg.device} ({threads} torch threads), "
          f"model {cfg.model}, median of {cfg.reps}")
    print("| clients | batched wall | one at a time (--batch_tokens=1) | batched / one at a time "
          "| requests per pass |")
    print("|---|---|---|---|---|")
    for n, tb, ta, per_pass in rows:
        print(f"| {n} | {tb * 1e3:.0f} ms | {ta * 1e3:.0f} ms | {tb / ta:.2f} | {per_pass:.2f} |")


def main(argv: list[str]) -> None:
    cfg = parse_config(BenchConfig, argv, prog="benchmarks/ref_server.py")
    threads = cfg.torch_threads or os.cpu_count() or 1
    torch.set_num_threads(threads)
    shapes = [tuple(int(x) for x in s.lower().split("x")) for s in cfg.shapes.split(",") if s]
    proc, url = start_server(cfg, threads)
    try:
        client = RefClient(url, timeout=3600)
        info = client.wait_ready(600)
        if cfg.clients:
            batching_table(cfg, threads, url, info["vocab_size"])
        if not shapes:
            return
        model = load_model(cfg.model, "auto", cfg.device).eval()
        sync = torch.cuda.synchronize if cfg.device.startswith("cuda") else (lambda: None)
        rows = []
        for B, T in shapes:
            b = make_batch(B, T, info["vocab_size"], seed=B * T)
            ids = (b.prompt_ids, b.prompt_lens, b.completion_ids, b.completion_lens)
            dev_ids = [t.to(cfg.device) for t in ids]
            keys = ("inproc", "srv_lp", "lp", "srv_ug", "ug")
            times: dict[str, list[float]] = {k: [] for k in keys}
            for rep in range(cfg.reps + 1):  # rep 0 warms up every path
                sync()
                t0 = time.perf_counter()
                with torch.inference_mode():
                    want = completion_logprobs(model, *dev_ids).cpu()
                sync()
                t_in = time.perf_counter() - t0
                t0 = time.perf_counter()
                got = client.logprobs(*ids)
                t_lp = time.perf_counter() - t0
                srv_lp = client.last_compute_ms / 1000
                t0 = time.perf_counter()
                client.upload(b.__class__(**{**b.__dict__, "batch_id": None}))
                out = client.get()
                t_ug = time.perf_counter() - t0
                srv_ug = client.last_upload["compute_ms"] / 1000
                assert torch.allclose(got, want, atol=1e-4), "server and in-process disagree"
                assert out is not None and torch.equal(out.ref_logprobs, got)
                print(f"  {B}x{T} rep {rep}: in-process {t_in * 1e3:.1f} ms | /logprobs "
                      f"{t_lp * 1e3:.1f} ms (server fwd {srv_lp * 1e3:.1f}) | upload+get "
                      f"{t_ug * 1e3:.1f} ms (server fwd {srv_ug * 1e3:.1f})", flush=True)
                if rep:
                    for k, v in zip(keys, (t_in, srv_lp, t_lp, srv_ug, t_ug)):
                        times[k].append(v)
            med = {k: statistics.median(v) for k, v in times.items()}
            med["ov_lp"] = statistics.median(a - f for a, f in zip(times["lp"], times["srv_lp"]))
            med["ov_ug"] = statistics.median(a - f for a, f in zip(times["ug"], times["srv_ug"]))
            rows.append((B, T, med))
        print()
        print(f"device: {cfg.device} ({platform.processor() or platform.machine()}, "
              f"{threads} torch threads), model {cfg.model}, median of {cfg.reps}")
        print("| B x T | in-process fwd | upload+get RTT (server fwd) | /logprobs RTT (server fwd) "
              "| HTTP+codec overhead: upload+get, /logprobs | overhead / fwd | RTT / in-process |")
        print("|---|---|---|---|---|---|---|")
        for B, T, m in rows:
            ms = {k: v * 1e3 for k, v in m.items()}
            print(f"| {B} x {T} | {ms['inproc']:.0f} ms | {ms['ug']:.0f} ms ({ms['srv_ug']:.0f}) "
                  f"| {ms['lp']:.0f} ms ({ms['srv_lp']:.0f}) | {ms['ov_ug']:.1f} ms, "
                  f"{ms['ov_lp']:.1f} ms | {100 * m['ov_ug'] / m['inproc']:.3f}%, "
                  f"{100 * m['ov_lp'] / m['inproc']:.3f}% | {m['ug'] / m['inproc']:.3f} |")
    finally:
        proc.terminate()
        proc.wait(timeout=30)


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except UserError as e:
        print(f"benchmarks/ref_server.py: error: {e}", file=sys.stderr)
        sys.exit(2)
