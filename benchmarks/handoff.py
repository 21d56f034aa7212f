"""Weights to the overlap sampler: the two-member group handoff (simple_grpo/wire/handoff.py)
against the file handoff it replaced (a CPU snapshot, a safetensors file in /dev/shm, the
sampler's load of it), both measured in the same run on a model of a real shape with random
weights (no download), trainer and sampler in two processes on this machine.

    python benchmarks/handoff.py [--shape=qwen2.5-1.5b|tiny] [--versions=3] [--bucket_mb=128]
                                 [--dtype=bfloat16] [--device=cpu|cuda|cuda:N] [--sampler_device=...]

On one GPU (both ends on it) the group is gloo, one bucket at a time through host memory; on two
(--device=cuda:0 --sampler_device=cuda:1) it is NCCL, GPU to GPU.

Per version (a small change to every tensor between versions, as an optimizer step makes):
  handoff   the trainer's blocked seconds (the sampler is already waiting: the wait part is ~0),
            the bytes, GB/s, the sampler's seconds to copy them into its model;
  file      the trainer's blocked CPU snapshot, the write to /dev/shm (behind the step in the old
            design), the sampler's load of that file (`load_into`), and the /dev/shm it took.
Peak RSS of both processes, and a 7B column projected by bytes (Qwen2.5-7B: 15.2 GB in bf16)
with NCCL's arithmetic beside it (NVLink ~150 GB/s, PCIe 4 x16 ~20 GB/s achieved).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SHAPES = {  # Qwen2.5-1.5B's config (tied embeddings), and a tiny one for a smoke run
    "qwen2.5-1.5b": dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                         num_attention_heads=12, num_key_value_heads=2, vocab_size=151936),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=320),
}
BYTES_7B = 15.2e9


def build(shape: str, dtype: torch.dtype, seed: int | None, device: str = "cpu") -> torch.nn.Module:
    """The shape's model on the CPU, uninitialised memory filled with random values (seed None:
    left as allocated, for a receiver that is overwritten anyway)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = Qwen2Config(**SHAPES[shape], tie_word_embeddings=True, max_position_embeddings=4096)
    with torch.device("meta"):
        model = Qwen2ForCausalLM._from_config(cfg, dtype=dtype)
    model = model.to_empty(device=device)
    model.tie_weights()
    if seed is not None:
        g = torch.Generator(device=device).manual_seed(seed)
        with torch.no_grad():
            for p in model.parameters():
                p.normal_(0, 0.02, generator=g)
    return model


def sync(device: str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def receiver(args) -> None:
    """The sampler's side: joins, takes --versions publishes, then loads each file path named on
    stdin; one JSON line per event."""
    from simple_grpo.gen.worker import load_into, published_params
    from simple_grpo.wire.handoff import Receiver

    model = build(args.shape, getattr(torch, args.dtype), None, args.sampler_device)
    r = Receiver.join(args.as_receiver, args.sampler_device, timeout_s=600)
    print(json.dumps({"ready": True, "rss_gb": peak_rss_gb()}), flush=True)
    for _ in range(args.versions):
        t = time.perf_counter()
        version, _, _ = r.recv(lambda *a: published_params(model, *a))
        sync(args.sampler_device)
        print(json.dumps({"version": version, "recv_seconds": time.perf_counter() - t - r.waited,
                          "rss_gb": peak_rss_gb()}), flush=True)
    for line in sys.stdin:
        t = time.perf_counter()
        load_into(model, Path(line.strip()))
        print(json.dumps({"load_seconds": time.perf_counter() - t, "rss_gb": peak_rss_gb()}), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", default="qwen2.5-1.5b", choices=sorted(SHAPES))
    ap.add_argument("--versions", type=int, default=3)
    ap.add_argument("--bucket_mb", type=int, default=128)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--device", default="cpu", help="the trainer's device")
    ap.add_argument("--sampler_device", default=None, help="the sampler's (default: --device)")
    ap.add_argument("--as_receiver", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    args.sampler_device = args.sampler_device or args.device
    torch.set_num_threads(1)
    if args.as_receiver:
        return receiver(args)

    from simple_grpo.train.publish import cpu_snapshot, unique_tensors
    from simple_grpo.wire.handoff import Sender, backend_for
    from simple_grpo.wire.weights import iter_state_dict_safetensors

    model = build(args.shape, getattr(torch, args.dtype), 0, args.device)
    base_rss = peak_rss_gb()
    args.backend = backend_for(args.device, args.sampler_device)
    sender = Sender.listen(args.backend, args.device, timeout_s=600, bucket_bytes=args.bucket_mb << 20)
    child = subprocess.Popen([sys.executable, __file__, f"--shape={args.shape}", f"--versions={args.versions}",
                              f"--dtype={args.dtype}", f"--sampler_device={args.sampler_device}",
                              f"--as_receiver={sender.address}"], cwd=ROOT,
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                             env={**os.environ, "OMP_NUM_THREADS": "1"})
    alive = lambda: child.poll() is None  # noqa: E731
    sender.connect(alive)
    json.loads(child.stdout.readline())  # the receiver's model is built and it waits
    rows = []
    for v in range(1, args.versions + 1):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(1e-3)
        tensors, aliases = unique_tensors(model)
        sync(args.device)
        t = time.perf_counter()
        got = sender.send(v, v, alive, tensors, aliases)
        sync(args.device)
        blocked = time.perf_counter() - t
        recv = json.loads(child.stdout.readline())
        rows.append(dict(version=v, handoff_blocked=blocked, handoff_wait=got["wait_seconds"],
                         handoff_bytes=got["bytes"], sampler_recv=recv["recv_seconds"]))
    handoff_rss = peak_rss_gb()
    shm = Path(tempfile.mkdtemp(prefix="simple_grpo-bench-", dir="/dev/shm" if os.path.isdir("/dev/shm") else None))
    try:
        for row in rows:  # the file handoff, as the sampler took it before
            t = time.perf_counter()
            state, aliases = cpu_snapshot(model, None)
            row["file_snapshot"] = time.perf_counter() - t
            t = time.perf_counter()
            path = shm / f"weights-{row['version']}.safetensors"
            with open(path, "wb") as f:
                for chunk in iter_state_dict_safetensors(state, None, {"aliases": json.dumps(aliases)}):
                    f.write(chunk)
            row["file_write"], row["file_bytes"] = time.perf_counter() - t, path.stat().st_size
            del state
            child.stdin.write(f"{path}\n")
            child.stdin.flush()
            row["file_load"] = json.loads(child.stdout.readline())["load_seconds"]
            path.unlink()
        child.stdin.close()
        child.wait(timeout=600)
    finally:
        child.kill()
        sender.close()
        for p in shm.glob("*"):
            p.unlink()
        shm.rmdir()
    report(args, rows, base_rss, handoff_rss, peak_rss_gb())


def report(args, rows, base_rss, handoff_rss, file_rss) -> None:
    n = len(rows)
    mean = lambda k: sum(r[k] for r in rows) / n  # noqa: E731
    gb = mean("handoff_bytes") / 1e9
    scale = BYTES_7B / mean("handoff_bytes")
    print(f"\nweights to the overlap sampler: {args.shape} ({gb:.2f} GB in {args.dtype}), {n} versions, "
          f"{args.bucket_mb} MiB buckets, {args.backend} ({args.device} -> {args.sampler_device}), 1 thread "
          f"a process\n")
    print("| stage | this shape, s (mean) | GB/s | 7B projected by bytes, s |")
    print("|---|---|---|---|")
    for name, key in [("handoff: trainer blocked", "handoff_blocked"),
                      ("handoff: of which waiting for the sampler", "handoff_wait"),
                      ("handoff: sampler receive + copy in place (from the header)", "sampler_recv"),
                      ("file: trainer blocked (CPU snapshot)", "file_snapshot"),
                      ("file: write to /dev/shm (behind the step)", "file_write"),
                      ("file: sampler load", "file_load")]:
        s = mean(key)
        print(f"| {name} | {s:.2f} | {gb / s if s > 0.01 and 'wait' not in key else float('nan'):.2f} | "
              f"{s * scale:.1f} |")
    file_total = mean("file_snapshot") + mean("file_write") + mean("file_load")
    print(f"\nversion to sampler: handoff {mean('handoff_blocked'):.2f} s vs file {file_total:.2f} s "
          f"(x{file_total / mean('handoff_blocked'):.1f}); /dev/shm used by the handoff: 0 GB, by "
          f"the file: {mean('file_bytes') / 1e9:.2f} GB a version (2-3 kept)")
    print(f"trainer peak RSS: model {base_rss:.2f} GB, after the handoffs {handoff_rss:.2f} GB "
          f"(+{handoff_rss - base_rss:.2f}), after the file path {file_rss:.2f} GB")
    print(f"7B on GPUs by arithmetic (NCCL, no host copy): NVLink ~{BYTES_7B / 150e9:.2f} s, "
          f"PCIe 4 x16 ~{BYTES_7B / 20e9:.2f} s")


if __name__ == "__main__":
    main()
