"""Seconds per GRPO step: simple_grpo's trainer next to TRL's GRPOTrainer, same settings, same run.

Default settings (the README's default run): the bundled SmolLM2-135M-Instruct, 2 prompts x G=8 x 48 new
tokens (fixed length: min_new_tokens = max_new_tokens), beta 0.04, one torch thread per process.
simple_grpo runs as `python grpo_ref_split.py` (the reference model in its own server process);
TRL runs in-process (`pip install -r requirements-bench.txt`). The first `--warmup` steps of each
are excluded.

    python benchmarks/step_time.py [--steps=6] [--warmup=1] [--skip_trl] [--model=smollm2-135m]
                                   [--ranks=2]  (the trainer as 2 data-parallel processes, torchrun)
                                   [--modes=sync,overlap]  (--overlap=false / true, side by side)
                                   [--variable] [--modes=sync,budget --budget=N]  (lengths as they
                                   fall; fixed --micro_batch_size vs --max_tokens_per_micro_batch=N)

Each row is the median over the timed steps; "peak RSS" is the largest resident memory of the
whole process tree (trainer, reference server, sampler), sampled every 0.2 s from /proc.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Both trainers get 2 MB pages for large tensors (simple_grpo sets this for itself on import; TRL
# runs in this process, so it is set before torch is imported here).
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
sys.path.insert(0, str(ROOT))
from simple_grpo.train.engine import free_port  # noqa: E402  (after the environment is set)
PHASES = ("gen_seconds", "ref_seconds", "train_seconds", "step_seconds", "pad_frac", "micro_batches",
          "completion_len_mean")


def tree_rss(pid: int) -> int:
    """Resident bytes of `pid` and all its descendants (Linux /proc)."""
    children: dict[int, list[int]] = {}
    rss: dict[int, int] = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            fields = (d / "stat").read_text().rsplit(")", 1)[1].split()
            children.setdefault(int(fields[1]), []).append(int(d.name))
            rss[int(d.name)] = int(fields[21]) * os.sysconf("SC_PAGE_SIZE")
        except (OSError, IndexError, ValueError):
            continue
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        total += rss.get(p, 0)
        todo += children.get(p, [])
    return total


def run_ours(a, run_dir: Path, mode: str) -> tuple[list[dict], int]:
    launch = [sys.executable] if a.ranks == 1 else \
        [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={a.ranks}",
         f"--master_port={free_port()}"]
    cmd = [*launch, str(ROOT / "grpo_ref_split.py"), f"--model={a.model}", f"--steps={a.steps}",
           f"--prompts_per_step={a.prompts}", f"--num_generations={a.G}", f"--micro_batch_size={a.micro}",
           f"--max_new_tokens={a.tokens}", f"--min_new_tokens={0 if a.variable else a.tokens}",
           f"--beta={a.beta}", f"--max_tokens_per_micro_batch={a.budget if mode == 'budget' else 0}",
           "--eval_every=0", "--save_every=0", "--plot_every=0", "--samples_every=0",
           "--rewards=correct_lenient", f"--run_dir={run_dir}",
           f"--overlap={'true' if mode == 'overlap' else 'false'}"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.DEVNULL)
    peak = 0
    while proc.poll() is None:
        peak = max(peak, tree_rss(proc.pid))
        time.sleep(0.2)
    assert proc.returncode == 0, f"{mode} run failed (exit {proc.returncode})"
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()], peak


def run_trl(a, out_dir: Path) -> list[float]:
    import torch
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from simple_grpo.models import resolve_model_path
    from simple_grpo.gen import data
    from simple_grpo.gen.reward_registry import get_reward

    torch.set_num_threads(1)
    examples = data.load_examples("arithmetic", "train")
    ds = Dataset.from_list([{"prompt": [{"role": "system", "content": data.DEFAULT_SYSTEM_PROMPT},
                                        {"role": "user", "content": e["question"]}],
                             "answer": e["answer"]} for e in examples])
    lenient = get_reward("correct_lenient")

    def reward(completions, answer, **_):
        return [lenient(c[0]["content"], {"answer": ans}) for c, ans in zip(completions, answer)]

    times: list[float] = []

    class Clock(TrainerCallback):
        def on_step_begin(self, *args, **kw):
            self.t0 = time.perf_counter()

        def on_step_end(self, *args, **kw):
            times.append(time.perf_counter() - self.t0)

    cfg = GRPOConfig(output_dir=str(out_dir), use_cpu=True, bf16=False, max_steps=a.steps,
                     per_device_train_batch_size=a.prompts * a.G, num_generations=a.G,
                     max_completion_length=a.tokens, generation_kwargs={"min_new_tokens": a.tokens},
                     beta=a.beta, gradient_checkpointing=False, learning_rate=1e-6, logging_steps=1,
                     report_to=[], save_strategy="no", disable_tqdm=True, dataloader_num_workers=0)
    trainer = GRPOTrainer(model=resolve_model_path(a.model), reward_funcs=reward, args=cfg,
                          train_dataset=ds, callbacks=[Clock()])
    trainer.train()
    return times


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--prompts", type=int, default=2)
    p.add_argument("--G", type=int, default=8)
    p.add_argument("--micro", type=int, default=0,
                   help="micro-batch; 0 = every sequence of a rank at once (TRL: per-device batch = prompts x G)")
    p.add_argument("--tokens", type=int, default=48)
    p.add_argument("--beta", type=float, default=0.04)
    p.add_argument("--skip_trl", action="store_true")
    p.add_argument("--ranks", type=int, default=1,
                   help="trainer processes (torchrun, data parallel); 1 = plain python")
    p.add_argument("--modes", default="sync,overlap",
                   help="simple_grpo runs: sync (--overlap=false), overlap, budget (sync with --budget)")
    p.add_argument("--variable", action="store_true", help="completion lengths as they fall (no min_new_tokens)")
    p.add_argument("--budget", type=int, default=0, help="--max_tokens_per_micro_batch of the budget mode")
    a = p.parse_args()
    a.micro = a.micro or a.prompts * a.G // a.ranks
    ours, trl = {}, None
    with tempfile.TemporaryDirectory() as tmp:
        for mode in a.modes.split(","):
            rows, peak = run_ours(a, Path(tmp) / mode, mode)
            rows = [r for r in rows[a.warmup:] if "step_seconds" in r]
            ours[mode] = ({k: statistics.median(r.get(k, 0.0) for r in rows) for k in PHASES}, peak, len(rows))
        if not a.skip_trl:
            t = run_trl(a, Path(tmp) / "trl")[a.warmup:]  # in this process: its peak RSS (Linux: KiB)
            trl = (statistics.median(t), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, len(t))
    print(f"\n{a.prompts} prompts x G={a.G} x {a.tokens} new tokens ({'as they fall' if a.variable else 'fixed'}), "
          f"beta {a.beta}, model {a.model}, micro-batch {a.micro}; medians of the timed steps")
    print("| trainer | steps | s/step | generate | ref | train | completion len | pad_frac | micro-batches "
          "| steps/hour | peak RSS GiB |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for mode, (m, peak, n) in ours.items():
        name = f"simple_grpo {mode}" + (f" {a.budget}" if mode == "budget" else "") + \
            ("" if a.ranks == 1 else f", {a.ranks} ranks")
        print(f"| {name} | {n} | {m['step_seconds']:.1f} | {m['gen_seconds']:.1f} | {m['ref_seconds']:.1f} | "
              f"{m['train_seconds']:.2f} | {m['completion_len_mean']:.1f} | {m['pad_frac']:.2f} | "
              f"{m['micro_batches']:.1f} | {3600 / m['step_seconds']:.0f} | {peak / 2**30:.2f} |")
    if "sync" in ours and "budget" in ours:
        s, b = ours["sync"][0], ours["budget"][0]
        print(f"train seconds budget / fixed: {b['train_seconds'] / s['train_seconds']:.2f}; positions run "
              f"budget / fixed (from pad_frac, equal real tokens): {(1 - s['pad_frac']) / (1 - b['pad_frac']):.2f}")
    if trl is not None:
        print(f"| TRL GRPOTrainer | {trl[2]} | {trl[0]:.1f} | | | | {3600 / trl[0]:.0f} | {trl[1] / 2**30:.2f} |")
        for mode, (m, _, _) in ours.items():
            print(f"ratio (steps/hour, simple_grpo {mode} / TRL): {trl[0] / m['step_seconds']:.2f}x")


if __name__ == "__main__":
    main()
