"""Weight sync for many generation boxes: the full-weight design (every version a full file,
the trainer's --weights_full_every=1) against deltas (the default), through the real processes.

Per run: one `ref_server.py` on a free port, N `grpo_ref_split.py --mode=generate` workers, then
the trainer (`grpo_ref_split.py --ref_url=... --generate_locally=false --publish_dtype=bfloat16`),
all on this machine with one torch thread each (OMP_NUM_THREADS=1), the bundled model at tiny
generation settings (2 prompts x G=4 x --tokens new tokens, fixed length). Workers run in bf16
(--worker_dtype; 0.75 GB a process, fp32 1.0 GB) and start one at a time while memory lasts: the
fp32 trainer takes 4.7 GB. A worker process runs grpo_ref_split.py's own main() through this
script (`--as_worker`) only so that each weight sync appends the worker's counters
(sync_seconds, delta_syncs, full_syncs, ...) to a file; nothing else changes. The server's queue
is small and drops its oldest batch when full (--queue_size=1 --when_full=drop_oldest), so a
worker never waits for room: it syncs after every batch, the way a box with its own accelerator
would.

Measured over a window that starts at the first trainer step after every worker has synced to
version --from_version or newer, and ends when the trainer exits. That leaves out each worker's
first sync (always the full file: a fresh worker has none) and AdamW's first steps (larger
deltas). The window's numbers come from the server's /stats (weights_ingress, weights_egress,
batches in/out, drops), the trainer's metrics.jsonl (publish_bytes, batch_staleness,
stale_dropped) and the workers' sync counters. The peer is the full design at the same worker
count, in the same invocation.

    python benchmarks/weights.py --shape=qwen2.5-1.5b   # one version stage by stage (weight_stages.py)
    python benchmarks/weights.py [--workers=1,4,16] [--modes=full,delta] [--steps=24]
                                 [--from_version=11] [--tokens=16] [--worker_dtype=bfloat16]
                                 [--lr=1e-6] [--hosts=1|2] [--keep=DIR]

With --hosts=2 (root: network namespaces) the server and the trainer run on one host and the
workers on another, and the bytes the workers' host received are reported as well.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
GB = 1e9
TOKEN = "weights-bench"  # the server binds 0.0.0.0 with --hosts=2, which requires a token
STEP_S = 12.6  # the training step the projection is compared with
MODELS = {"Qwen2.5-3B": 6.2 * GB, "Qwen2.5-7B": 15.2 * GB}  # bf16 weights files
BOXES, LINKS_GBE = (8, 24, 64), (10, 25, 100)


def as_worker(log: str, argv: list[str]) -> None:
    """A worker process: grpo_ref_split.py's main(), each weight sync's counters appended to `log`."""
    import grpo_ref_split
    from simple_grpo.errors import run_entry_point
    from simple_grpo.gen import worker

    sync = worker.Worker.sync_weights

    def counted(self) -> bool:
        before = self.version
        updated = sync(self)
        if updated:
            with open(log, "a") as f:
                f.write(json.dumps({"t": time.time(), "from": before, "version": self.version,
                                    **self.counts}) + "\n")
        return updated

    worker.Worker.sync_weights = counted
    print(json.dumps(run_entry_point(grpo_ref_split.main, argv, "grpo_ref_split.py")))


def spawn(args: list[str], log: Path, tmp: Path, prefix: list[str] = ()) -> subprocess.Popen:
    from simple_grpo.train.engine import standalone_env

    env = standalone_env(OMP_NUM_THREADS="1", TMPDIR=str(tmp), REF_SERVER_TOKEN=TOKEN)  # weight files in tmp
    return subprocess.Popen([*prefix, sys.executable, *args], cwd=ROOT, env=env, stdout=open(log, "w"),
                            stderr=subprocess.STDOUT)


def two_hosts():
    """Two network namespaces joined by a bridge (tests/deploy/deploy_fixtures.py): host 0 runs
    the server and the trainer, host 1 the workers."""
    sys.path.insert(0, str(ROOT / "tests" / "deploy"))
    from deploy_fixtures import Hosts

    return Hosts(2)


def received_bytes(h, i: int) -> int:
    """Bytes host i's interface has received: with workers on host 1, what the server's host sent them."""
    out = subprocess.run(["ip", "-n", h.ns[i], "-s", "-j", "link", "show", "dev", h.ifname[i]],
                         check=True, capture_output=True, text=True).stdout
    return int(json.loads(out)[0]["stats64"]["rx"]["bytes"])


def mem_available_gb() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) / 2**20
    return float("inf")


def rows_of(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()] if path.exists() else []


def stop(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        if p.poll() is None:
            p.terminate()
    for p in procs:
        try:
            p.wait(60)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def one_run(a, n: int, mode: str, tmp: Path) -> dict:
    """Server + n workers + trainer; -> the window's numbers (see the module docstring)."""
    from simple_grpo.train.engine import free_port
    from simple_grpo.wire.client import RefClient

    tag, port, asked = f"{mode}{n}", free_port(), n
    run = tmp / f"run-{mode}{n}"
    run.mkdir()
    h = two_hosts() if a.hosts == 2 else None
    url = f"http://{h.addr[0]}:{port}" if h else f"http://127.0.0.1:{port}"
    on = (lambda i: h.prefix(i)) if h else (lambda i: [])  # noqa: E731
    shape = [f"--model={a.model}", "--prompts_per_step=2", "--num_generations=4", "--micro_batch_size=8",
             f"--max_new_tokens={a.tokens}", f"--min_new_tokens={a.tokens}", "--rewards=correct_lenient",
             f"--ref_url={url}", "--ref_timeout=3600", f"--ref_token={TOKEN}"]
    procs = [spawn([str(ROOT / "ref_server.py"), f"--model={a.model}", f"--port={port}", "--torch_threads=1",
                    f"--queue_size={a.queue_size}", f"--when_full={a.when_full}",
                    f"--host={'0.0.0.0' if h else '127.0.0.1'}",
                    f"--weights_dir={run / 'server-weights'}"], run / "server.log", run, on(0))]
    client = RefClient(url, timeout=600, token=TOKEN)
    rx = (lambda: received_bytes(h, 1)) if h else (lambda: 0)  # noqa: E731
    rx0 = rx()
    try:
        client.wait_ready(900)
        dtype = [] if a.worker_dtype == "auto" else [f"--dtype={a.worker_dtype}"]
        for i in range(n):  # one at a time (a load peaks above the worker's size), while memory lasts
            if mem_available_gb() < a.trainer_gb + a.worker_gb:
                print(f"[{tag}] {n} workers do not fit: {mem_available_gb():.1f} GB available with {i} "
                      f"running, the trainer needs {a.trainer_gb} GB; measuring {i}", flush=True)
                n = i
                break
            procs.append(spawn([str(Path(__file__).resolve()), "--as_worker", str(run / f"sync{i}.jsonl"),
                                *shape, *dtype, "--mode=generate", f"--worker_index={i}"],
                               run / f"worker{i}.log", run, on(1)))
            t0 = time.monotonic()
            while len(client.stats().get("workers") or {}) <= i:  # loaded and polling
                if any(p.poll() is not None for p in procs):
                    raise SystemExit(f"[{tag}] a process exited while loading; logs in {run}")
                if time.monotonic() - t0 > 600:
                    raise SystemExit(f"[{tag}] worker {i} not up after 10 min; logs in {run}")
                time.sleep(0.5)
        full = ["--weights_full_every=1"] if mode == "full" else []
        trainer = spawn([str(ROOT / "grpo_ref_split.py"), *shape, "--generate_locally=false",
                         "--publish_dtype=bfloat16", f"--lr={a.lr}", "--warmup_steps=0", f"--steps={a.steps}",
                         "--eval_every=0", "--save_every=0", "--plot_every=0", "--samples_every=0",
                         f"--run_dir={run / 'trainer'}", *full], run / "trainer.log", run, on(0))
        procs.append(trainer)
        snaps: dict[int, tuple[float, dict]] = {}  # trainer step -> (time, server /stats) when it appeared
        metrics = run / "trainer" / "metrics.jsonl"
        while trainer.poll() is None:
            done = len(rows_of(metrics))
            if done and done not in snaps:
                snaps[done] = (time.time(), {**client.stats(), "rx": rx()})
            time.sleep(0.5)
        if trainer.returncode != 0:
            raise SystemExit(f"[{tag}] trainer exited {trainer.returncode}:\n"
                             + (run / "trainer.log").read_text()[-3000:])
        end = (time.time(), {**client.stats(), "rx": rx()})
    finally:
        stop(procs[1:])
        stop(procs[:1])
        if h:
            h.close()
    syncs = [rows_of(run / f"sync{i}.jsonl") for i in range(n)]
    steps = [r for r in rows_of(metrics) if "step_seconds" in r]
    if any(not s for s in syncs):
        raise SystemExit(f"[{tag}] a worker never synced; logs in {run}")
    if any(s[-1]["version"] < a.from_version for s in syncs):
        raise SystemExit(f"[{tag}] a worker never reached version {a.from_version}: raise --steps ({run})")
    first = max(next(x["t"] for x in s if x["version"] >= a.from_version) for s in syncs)
    start = min((k for k, (t, _) in snaps.items() if t >= first), default=None)
    if start is None:
        raise SystemExit(f"[{tag}] the window is empty: raise --steps (logs in {run})")
    (t_a, s_a), (t_b, s_b) = snaps[start], end
    (run / "window.json").write_text(json.dumps({"start_step": start, "start": s_a, "end": s_b}))
    d = lambda s, *k: (s_b[s][k[0]] if k else s_b[s]) - (s_a[s][k[0]] if k else s_a[s])  # noqa: E731
    versions = s_b["weights"]["version"] - s_a["weights"]["version"]
    window = [x for ws in syncs for x in ws if t_a < x["t"] <= t_b]
    for ws in syncs:  # each sync's kind, from the change of the worker's counters
        for x, y in zip([None, *ws], ws):
            y["kind"] = "delta" if x is not None and y["delta_syncs"] > x["delta_syncs"] else "full"
    trained = [r for r in steps if r["step"] > start]
    drops_end = steps[-1].get("stale_dropped", 0.0)
    drops_start = next(r for r in steps if r["step"] == start).get("stale_dropped", 0.0)
    med = lambda xs: statistics.median(xs) if xs else float("nan")  # noqa: E731
    return {
        "workers": n, "asked": asked, "mode": mode, "versions": versions,
        "file_mb": s_b["weights"]["bytes"] / 1e6,
        "ingress": (d("weights_ingress", "full_bytes") + d("weights_ingress", "delta_bytes")) / versions,
        "full_up": d("weights_ingress", "full_uploads"), "delta_up": d("weights_ingress", "delta_uploads"),
        "publish_bytes": statistics.mean(r.get("publish_bytes", 0.0) for r in trained),
        "egress": (d("weights_egress", "full_bytes") + d("weights_egress", "delta_bytes")) / versions,
        "full_dl": d("weights_egress", "full_downloads"), "delta_dl": d("weights_egress", "delta_downloads"),
        "refused": d("weights_egress", "delta_refused"),
        "syncs": len(window), "delta_syncs": sum(x["kind"] == "delta" for x in window),
        "versions_per_sync": statistics.mean([x["version"] - x["from"] for x in window] or [0]),
        "sync_s": med([x["sync_seconds"] for x in window]),
        "sync_delta_s": med([x["sync_seconds"] for x in window if x["kind"] == "delta"]),
        "sync_full_s": med([x["sync_seconds"] for x in window if x["kind"] == "full"]),
        "staleness": [int(r["batch_staleness"]) for r in trained],
        "stale_dropped": drops_end - drops_start, "server_stale": d("dropped_stale"),
        "dropped_full": d("dropped_full"), "batches_in": d("batches_in"), "batches_out": d("batches_out"),
        "s_per_step": (t_b - t_a) / max(1, len(trained)), "window_steps": len(trained), "start": start,
        "host_rx": d("rx") / versions,  # bytes the workers' host received per version, in the window
        "host_rx_all": (s_b["rx"] - rx0) / s_b["weights"]["version"],  # the same over the whole run
    }


def hist(values: list[int]) -> str:
    counts = {v: values.count(v) for v in sorted(set(values))}
    return " ".join(f"{v}:{c}" for v, c in counts.items())


def report(a, rows: list[dict]) -> None:
    mb = 1e6
    print(f"\n{a.model}, bf16 publishes, lr {a.lr}, 2 prompts x G=4 x {a.tokens} tokens, "
          f"{os.cpu_count()} CPUs, one torch thread per process, workers {a.worker_dtype}, "
          f"--steps={a.steps}; server --queue_size={a.queue_size} --when_full={a.when_full}; "
          "per version = over the window's versions")
    print("| workers | weights | versions | trainer uploads (full) | trainer upload / version "
          "(its publish_bytes) | "
          "server egress / version | "
          "per worker / version | syncs (delta) | versions per sync (mean) | sync median (delta / full) | "
          "staleness of trained batches (versions: steps) | stale dropped (trainer + server) | "
          "dropped, queue full | s/step |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        shown = r["workers"] if r["asked"] == r["workers"] else f"{r['workers']} (of {r['asked']})"
        print(f"| {shown} | {r['mode']} | {r['versions']} | {r['full_up'] + r['delta_up']} "
              f"({r['full_up']}) | {r['ingress'] / mb:.1f} MB ({r['publish_bytes'] / mb:.1f}) | "
              f"{r['egress'] / mb:.1f} MB | {r['egress'] / r['workers'] / mb:.1f} MB | {r['syncs']} "
              f"({r['delta_syncs']}) | {r['versions_per_sync']:.1f} | {r['sync_s']:.2f} s "
              f"({r['sync_delta_s']:.2f} / {r['sync_full_s']:.2f}) | {hist(r['staleness'])} | "
              f"{r['stale_dropped']:.0f} + {r['server_stale']} | {r['dropped_full']} | "
              f"{r['s_per_step']:.1f} |")
    if a.hosts == 2:
        print("\nThe workers on a second network host: bytes its interface received (HTTP and TCP "
              "included), per published version and worker, as a fraction of the bf16 file")
        print("| workers | weights | window: received / version | per worker, of the file | whole run "
              "(each worker's first full file included): received / version | per worker, of the file |")
        print("|---|---|---|---|---|---|")
        for r in rows:
            per, per_all = (r[k] / r["workers"] / (r["file_mb"] * mb) for k in ("host_rx", "host_rx_all"))
            print(f"| {r['workers']} | {r['mode']} | {r['host_rx'] / mb:.1f} MB | {per:.3f} | "
                  f"{r['host_rx_all'] / mb:.1f} MB | {per_all:.3f} |")
    by = {(r["workers"], r["mode"]): r for r in rows}
    pairs = [(n, by[n, "full"], by[n, "delta"]) for n in sorted({r["workers"] for r in rows})
             if (n, "full") in by and (n, "delta") in by]
    if not pairs:
        return
    print("\n| workers | full: egress / version | delta: egress / version | delta / full | "
          "stale dropped (full -> delta) |")
    print("|---|---|---|---|---|")
    for n, f, dl in pairs:
        print(f"| {n} | {f['egress'] / mb:.1f} MB | {dl['egress'] / mb:.1f} MB | "
              f"{dl['egress'] / f['egress']:.1%} | {f['stale_dropped'] + f['server_stale']:.0f} -> "
              f"{dl['stale_dropped'] + dl['server_stale']:.0f} |")
    n, f, dl = pairs[-1]
    ratio = dl["egress"] / f["egress"]
    per_box = dl["egress"] / n / (dl["file_mb"] * mb)
    print(f"\nPROJECTION (not measured): server egress per version from the measured delta / full ratio "
          f"at {n} workers, {ratio:.1%} (delta bytes per worker per version: {per_box:.1%} of the file). "
          f"Full: every box downloads every version's file; delta: that times {ratio:.1%}. "
          f"One server link, no other traffic; next to a {STEP_S} s step.")
    print("| model | bf16 file | boxes | link | full: s / version | delta: s / version | "
          f"full / {STEP_S} s step | delta / step |")
    print("|---|---|---|---|---|---|---|---|")
    for name, size in MODELS.items():
        for boxes in BOXES:
            for gbe in LINKS_GBE:
                full_s = boxes * size * 8 / (gbe * 1e9)
                print(f"| {name} | {size / GB:.1f} GB | {boxes} | {gbe} GbE | {full_s:.1f} | "
                      f"{ratio * full_s:.2f} | {full_s / STEP_S:.1f}x | {ratio * full_s / STEP_S:.2f}x |")


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "--as_worker":
        return as_worker(sys.argv[2], sys.argv[3:])
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--workers", default="1,4,16")
    p.add_argument("--modes", default="full,delta")
    p.add_argument("--steps", type=int, default=24)
    p.add_argument("--from_version", type=int, default=11,
                   help="the window starts once every worker has synced to this version or newer")
    p.add_argument("--tokens", type=int, default=16)
    p.add_argument("--lr", type=float, default=1e-6)
    p.add_argument("--worker_dtype", default="bfloat16",
                   help="workers' --dtype: bfloat16 (0.75 GB a process) or auto (fp32 on a CPU, 1.0 GB)")
    p.add_argument("--worker_gb", type=float, default=1.0, help="memory a worker needs before it starts")
    p.add_argument("--trainer_gb", type=float, default=6.0, help="memory the trainer needs (4.7 GB) + margin")
    p.add_argument("--queue_size", type=int, default=1)
    p.add_argument("--when_full", default="drop_oldest")
    p.add_argument("--hosts", type=int, default=1, choices=(1, 2),
                   help="2: the workers on a second network host (namespaces, root only); their host's "
                        "received bytes are reported")
    p.add_argument("--keep", default="", help="keep every run's logs in this folder (else a temporary one)")
    p.add_argument("--shape", default="", help="instead: one version's stages at a real model's shape "
                                               "(qwen2.5-1.5b, qwen2.5-0.5b, tiny; benchmarks/weight_stages.py)")
    p.add_argument("--versions", type=int, default=3, help="with --shape: delta versions per lr")
    p.add_argument("--lrs", default="1e-6,1e-5", help="with --shape: the learning rates")
    p.add_argument("--device", default="cpu", help="with --shape: where the weights live (cuda:0 on a GPU)")
    a = p.parse_args()
    if a.shape:
        import weight_stages
        return weight_stages.main(a.shape, a.versions, [float(x) for x in a.lrs.split(",")], a.device)
    rows = []
    with tempfile.TemporaryDirectory(prefix="weights-bench-") as tmp:
        if a.keep:
            Path(a.keep).mkdir(parents=True, exist_ok=True)
            tmp = a.keep
        for n in (int(x) for x in a.workers.split(",")):
            for mode in a.modes.split(","):
                t0 = time.time()
                rows.append(one_run(a, n, mode, Path(tmp)))
                r = rows[-1]
                n = r["workers"]  # fewer when they did not fit: the same number in the other mode
                print(f"[{mode} x{n}] {time.time() - t0:.0f} s: {r['versions']} versions, egress "
                      f"{r['egress'] / 1e6:.1f} MB/version, staleness {hist(r['staleness'])}", flush=True)
    report(a, rows)


if __name__ == "__main__":
    main()
