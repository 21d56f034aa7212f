"""Generation workers: trainer steps per hour with 0, 1 and 2 extra worker processes, and the time
to publish and fetch weights (the default model and a 0.5B-sized config).

Throughput: one `ref_server.py` process, the trainer (`grpo_ref_split.py --ref_url=...`, which also
generates), and N `--mode=generate` worker processes, all on this machine with one torch thread
each; the default model at 2 prompts x G=8 x 48 new tokens (fixed length), beta 0.04. The peer is
the 0-worker run in the same invocation. The first `--warmup` steps are excluded.

Weight sync: the trainer's `WeightPublisher` (CPU snapshot + streamed POST /weights) against an
in-process server, then a worker's download (`RefClient.download_weights`) and `load_into`.

    python benchmarks/workers.py [--part=all|sync|throughput] [--workers=0,1,2] [--steps=5]
                                 [--warmup=1] [--queue_size=4]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _spawn(args: list[str], log: Path) -> subprocess.Popen:
    from simple_grpo.train.engine import standalone_env

    return subprocess.Popen([sys.executable, *args], cwd=ROOT, env=standalone_env(OMP_NUM_THREADS="1"),
                            stdout=open(log, "w"), stderr=subprocess.STDOUT)


def throughput(a, n_workers: int, tmp: Path) -> dict:
    from simple_grpo.train.engine import free_port
    from simple_grpo.wire.client import RefClient

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    shape = [f"--model={a.model}", "--prompts_per_step=2", "--num_generations=8", "--micro_batch_size=8",
             f"--max_new_tokens={a.tokens}", f"--min_new_tokens={a.tokens}", "--beta=0.04",
             "--rewards=correct_lenient", f"--ref_url={url}"]
    procs = [_spawn([str(ROOT / "ref_server.py"), f"--model={a.model}", f"--port={port}",
                     "--torch_threads=1", f"--queue_size={a.queue_size}"], tmp / f"server{n_workers}.log")]
    try:
        RefClient(url).wait_ready(600)
        run = tmp / f"run{n_workers}"
        trainer = _spawn([str(ROOT / "grpo_ref_split.py"), *shape, f"--steps={a.steps}", "--eval_every=0",
                          "--save_every=0", "--plot_every=0", "--samples_every=0", f"--run_dir={run}"],
                         tmp / f"trainer{n_workers}.log")
        procs.append(trainer)
        for i in range(n_workers):
            procs.append(_spawn([str(ROOT / "grpo_ref_split.py"), *shape, "--mode=generate",
                                 f"--worker_index={i}"], tmp / f"worker{n_workers}-{i}.log"))
        if trainer.wait(timeout=3600) != 0:
            raise SystemExit((tmp / f"trainer{n_workers}.log").read_text()[-3000:])
        rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    finally:
        for p in procs:
            if p.poll() is None:
                p.terminate()
                p.wait(30)
    rows = [r for r in rows if "step_seconds" in r][a.warmup:]
    mean = lambda k: sum(r.get(k, 0.0) for r in rows) / len(rows)  # noqa: E731
    return {"workers": n_workers, "s_per_step": mean("step_seconds"), "remote": mean("remote_batch"),
            "staleness": mean("batch_staleness"), "publish_s": mean("publish_seconds"),
            "snapshot_s": mean("snapshot_seconds"), "gen_s": mean("gen_seconds"),
            "train_s": mean("train_seconds"), "ref_s": mean("ref_seconds"),
            "stale_dropped": rows[-1].get("stale_dropped", 0.0)}


def sync_times(name: str, model, dtype, tmp: Path) -> dict:
    import torch

    from simple_grpo.models import build_tiny_model
    from simple_grpo.server.app import ServerConfig, ServerState, start
    from simple_grpo.train.publish import WeightPublisher
    from simple_grpo.gen.worker import load_into
    from simple_grpo.wire.client import RefClient

    state = ServerState(ServerConfig(model="tiny", port=0, weights_dir=str(tmp / f"w-{name}"),
                                     max_weights_mb=8192), build_tiny_model())
    server = start(state)
    try:
        pub = WeightPublisher(RefClient(server.url, timeout=3600), dtype=dtype)
        t0 = time.perf_counter()
        pub.publish(model, version=1, wait=True)
        total = time.perf_counter() - t0
        m = pub.metrics()
        client = RefClient(server.url, timeout=3600)
        t0 = time.perf_counter()
        path = client.download_weights(tmp / f"{name}.safetensors")
        fetch = time.perf_counter() - t0
        target = model if dtype is None else type(model)(model.config).to(dtype)
        t0 = time.perf_counter()
        with torch.device("cpu"):
            load_into(target, path)
        load = time.perf_counter() - t0
        path.unlink()
        pub.close()
    finally:
        server.close()
    return {"name": name, "mb": m["publish_mb"], "snapshot_s": m["snapshot_seconds"],
            "publish_s": total, "fetch_s": fetch, "load_s": load}


def sync_part(a, tmp: Path) -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from simple_grpo.models import load_model

    torch.set_num_threads(1)
    rows = []
    small = load_model(a.model, "float32", "cpu")
    for dtype in (None, torch.bfloat16):
        rows.append(sync_times(f"{a.model} {'fp32' if dtype is None else 'bf16'}", small, dtype, tmp))
    del small
    # Qwen2.5-0.5B's shape (random weights, no download): 24 layers, hidden 896, vocab 151936
    cfg = AutoConfig.for_model("qwen2", hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                               num_attention_heads=14, num_key_value_heads=2, vocab_size=151936,
                               tie_word_embeddings=True)
    big = AutoModelForCausalLM.from_config(cfg)
    for dtype in (None, torch.bfloat16):
        rows.append(sync_times(f"0.5B config {'fp32' if dtype is None else 'bf16'}", big, dtype, tmp))
    print("\n| weights | MB | snapshot (trainer blocked) | publish (background) | fetch | load |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['name']} | {r['mb']:.0f} | {r['snapshot_s']:.2f} s | {r['publish_s']:.2f} s | "
              f"{r['fetch_s']:.2f} s | {r['load_s']:.2f} s |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--part", default="all", choices=["all", "sync", "throughput"])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--workers", default="0,1,2")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--tokens", type=int, default=48)
    p.add_argument("--queue_size", type=int, default=4, help="the server's queue bound")
    a = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        if a.part in ("all", "sync"):
            sync_part(a, Path(tmp))
        if a.part in ("all", "throughput"):
            rows = [throughput(a, int(n), Path(tmp)) for n in a.workers.split(",")]
            base = rows[0]["s_per_step"]
            print(f"\n{a.model}, 2 prompts x G=8 x {a.tokens} tokens, beta 0.04, {os.cpu_count()} CPUs, "
                  f"{a.steps - a.warmup} timed steps, server queue {a.queue_size}")
            print("| extra workers | s/step | steps/hour | vs 0 workers | worker batches trained | "
                  "mean staleness | stale dropped | generate | train | ref wait |")
            print("|---|---|---|---|---|---|---|---|---|---|")
            for r in rows:
                print(f"| {r['workers']} | {r['s_per_step']:.1f} | {3600 / r['s_per_step']:.0f} | "
                      f"{base / r['s_per_step']:.2f}x | {100 * r['remote']:.0f}% | {r['staleness']:.2f} | "
                      f"{r['stale_dropped']:.0f} | "
                      f"{r['gen_s']:.1f} | {r['train_s']:.1f} | {r['ref_s']:.1f} |")


if __name__ == "__main__":
    main()
