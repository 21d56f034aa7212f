"""Every loss preset on one task: identical steps, batch sizes and seeds; curves and a table.

    python benchmarks/presets.py                        # 6 presets x 2 seeds on arithmetic2, CPU
                                                        # (~60 min on 2 cores)
    python benchmarks/presets.py --presets=grpo,dapo --seeds=3 --steps=20
    python benchmarks/presets.py --smoke --out=/tmp/p   # a tiny model, 2 steps, 2 presets x 2 seeds
                                                        # (tests/test_presets_bench.py runs it)

Each run is `python grpo_ref_split.py --preset=P --seed=S ...` in its own process with its own
--run_dir (out/runs/P-sS): the preset sets beta (grpo starts its reference server; the others need
none), held-out accuracy is evaluated before training and after the last step (greedy,
correct_lenient), and nothing is checkpointed. `--jobs` runs go at once (one torch thread each).
From each run's metrics.jsonl it draws returns.png (mean correct_lenient reward of the training
samples per step: dapo's overlong penalty left out, so presets compare), kl.png and length.png
(mean completion length): one line per preset, the mean over seeds, their min-max spread shaded
(KL only for presets with beta > 0: the others run without a reference model, so none is measured).
Images go to --images (default images/; in --smoke mode always into --out). The markdown table
(preset, held-out accuracy before -> after, reward over the last 5 steps, final KL, wall time) is
printed and written to out/presets.md; the raw numbers to out/presets.json.
"""
from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from simple_grpo.algo.losses import PRESETS  # noqa: E402
from simple_grpo.cli import parse_config  # noqa: E402
from simple_grpo.errors import UserError  # noqa: E402

# returns.png plots `accuracy`: the mean correct_lenient reward of the step's samples, the reward every
# preset shares (equal to reward_mean except for dapo, whose reward_mean adds its overlong penalty)
CURVES = (("returns.png", "accuracy", "mean reward (correct_lenient) of the training samples"),
          ("kl.png", "kl", "KL to reference"),
          ("length.png", "completion_len_mean", "mean completion length (tokens)"))
LAST_STEPS = 5  # the table's training reward: mean over this many last steps


@dataclass
class PresetsConfig:
    """benchmarks/presets.py: train every loss preset on one task and compare them."""

    task: str = "arithmetic2"
    """Task (grpo_ref_split.py --task); arithmetic2 (two-digit sums): SmolLM2-135M's greedy held-out
    accuracy starts at 8% and grows within minutes."""
    presets: str = "all"
    """Comma-separated presets, or 'all' (every preset in simple_grpo.algo.losses.PRESETS)."""
    seeds: int = 2
    """Seeds per preset (0, 1, ...): the spread of every number over them is reported."""
    steps: int = 30
    """Optimizer steps per run (the same for every preset). Measured on 2 cores with --jobs=2: a
    12-step SmolLM2 run on arithmetic2 takes 4.4-5.2 min (load, two evaluations of 100 prompts,
    ~16 s per step; dapo's refills add a little), so 6 presets x 2 seeds of 30 steps take ~60 min
    (40 steps ~75 min)."""
    prompts_per_step: int = 2
    """Prompts per step (the default run's size)."""
    num_generations: int = 8
    """G: completions per prompt."""
    max_new_tokens: int = 48
    """Completion length limit in tokens."""
    temperature: float = 0.7
    """Sampling temperature of the training completions (evaluation is greedy). On arithmetic2 the
    base model's samples at 1.0 are right 2% of the time (12% of groups differ, so few carry a
    signal); at 0.7, 4% (31% of groups): grpo went 0.08 -> 0.47 held-out in 12 steps."""
    num_iterations: int = 1
    """Optimizer passes per batch (grpo_ref_split.py --num_iterations). With 1 every batch is
    trained on-policy in one update, the ratio is exactly 1 and no clipping rule ever acts: gspo,
    sapo and grpo-without-KL then take the same gradient (2026-12-01: gspo and sapo gave the same
    run, sample for sample), and cispo differs from them only by its token-mean aggregation. With
    2 or more, the later passes are off-policy and the clipping rules differ."""
    eval_prompts: int = 100
    """Held-out prompts evaluated before training and after the last step."""
    model: str = "smollm2-135m"
    """Model to train (ignored with --smoke, which saves a tiny random model)."""
    jobs: int = 2
    """Runs trained at the same time (each with one torch thread; grpo adds a reference server)."""
    out: str = "presets_out"
    """Folder for the runs (out/runs/<preset>-s<seed>), their logs, presets.md and presets.json."""
    images: str = "images"
    """Folder for returns.png, kl.png and length.png (--smoke: always --out)."""
    keep_final: bool = False
    """Keep each run's final/ model folder (about 0.5 GB each for SmolLM2-135M)."""
    run_timeout_s: float = 3600.0
    """Time limit of one run; a run past it is stopped and reported as failed."""
    smoke: bool = False
    """A tiny random model, 2 steps, the first 2 presets (unless --presets names others), tiny
    evaluations: checks the whole path in well under a minute."""


def preset_names(c: PresetsConfig) -> list[str]:
    names = list(PRESETS) if c.presets == "all" else [p.strip() for p in c.presets.split(",") if p.strip()]
    unknown = [p for p in names if p not in PRESETS]
    if unknown or not names:
        raise UserError(f"unknown preset(s) {', '.join(unknown) or '(none given)'}; choose from {', '.join(PRESETS)}")
    return names[:2] if c.smoke and c.presets == "all" else names


def smoke_overrides(c: PresetsConfig, out: Path) -> PresetsConfig:
    """--smoke: a tiny model saved once under out/, 2 short steps, tiny evaluations, images in out/."""
    from simple_grpo.models import save_tiny_model

    model = out / "tiny-model"
    if not (model / "config.json").exists():
        save_tiny_model(model)
    return dataclasses.replace(c, model=str(model), task="arithmetic", steps=2, seeds=2, max_new_tokens=8,
                               eval_prompts=4, images=str(out))


def trainer_cmd(c: PresetsConfig, preset: str, seed: int, run_dir: Path) -> list[str]:
    return [sys.executable, str(ROOT / "grpo_ref_split.py"), f"--model={c.model}", f"--task={c.task}",
            f"--preset={preset}", f"--seed={seed}", f"--steps={c.steps}", f"--prompts_per_step={c.prompts_per_step}",
            f"--num_generations={c.num_generations}", f"--max_new_tokens={c.max_new_tokens}",
            f"--temperature={c.temperature}", f"--num_iterations={c.num_iterations}",
            f"--eval_every={max(c.steps, 1)}", f"--eval_prompts={c.eval_prompts}", "--save_every=-1",
            "--plot_every=0", f"--run_dir={run_dir}"]


def child_env() -> dict:
    from simple_grpo.train.engine import standalone_env

    return standalone_env(PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1",
                          DS_ACCELERATOR="cpu", MPLBACKEND="Agg")


def run_all(c: PresetsConfig, runs: list[tuple[str, int]], out: Path) -> dict[tuple[str, int], dict]:
    """Train every (preset, seed), at most c.jobs at once -> {(preset, seed): {ok, wall_s, run_dir, error}}."""
    todo, running, done = list(runs), {}, {}
    try:
        _run_queue(c, todo, running, done, out)
    finally:  # Ctrl-C or an error here: no trainer is left running
        for proc, log, _, _ in running.values():
            _stop(proc)
            log.close()
    return done


def _stop(proc: subprocess.Popen) -> None:
    """SIGTERM first (the trainer then stops its reference server), SIGKILL after 30 s."""
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _run_queue(c: PresetsConfig, todo: list, running: dict, done: dict, out: Path) -> None:
    while todo or running:
        while todo and len(running) < c.jobs:
            preset, seed = todo.pop(0)
            run_dir = out / "runs" / f"{preset}-s{seed}"
            shutil.rmtree(run_dir, ignore_errors=True)  # a fresh run, never a previous one's metrics
            log = open(out / "runs" / f"{preset}-s{seed}.log", "w")
            proc = subprocess.Popen(trainer_cmd(c, preset, seed, run_dir), cwd=ROOT, env=child_env(),
                                    stdout=log, stderr=subprocess.STDOUT)
            running[(preset, seed)] = (proc, log, time.perf_counter(), run_dir)
            print(f"[presets] started {preset} seed {seed}", flush=True)
        time.sleep(0.2)
        for key, (proc, log, t0, run_dir) in list(running.items()):
            late = time.perf_counter() - t0 > c.run_timeout_s
            if proc.poll() is None and not late:
                continue
            if late and proc.poll() is None:
                _stop(proc)
            log.close()
            ok = proc.returncode == 0 and not late
            tail = "" if ok else " | ".join(Path(log.name).read_text(errors="replace").splitlines()[-4:])[-400:]
            done[key] = {"ok": ok, "wall_s": time.perf_counter() - t0, "run_dir": str(run_dir),
                         "error": ("timed out; " if late else "") + tail}
            del running[key]
            print(f"[presets] {key[0]} seed {key[1]}: {'done' if ok else 'FAILED'} in "
                  f"{done[key]['wall_s']:.0f} s", flush=True)
            if ok and not c.keep_final:
                shutil.rmtree(run_dir / "final", ignore_errors=True)


def read_run(run_dir: Path) -> dict:
    """The numbers one run's metrics.jsonl gives: evaluations and the per-step curves."""
    from simple_grpo.train.metrics import read_jsonl

    rows = read_jsonl(run_dir / "metrics.jsonl")
    evals = [(r["step"], r["eval_accuracy"]) for r in rows if isinstance(r.get("eval_accuracy"), (int, float))]
    curves = {key: {int(r["step"]): float(r[key]) for r in rows if isinstance(r.get(key), (int, float))}
              for _, key, _ in CURVES}
    return {"acc_before": evals[0][1] if evals and evals[0][0] == 0 else None,
            "acc_after": evals[-1][1] if evals and evals[-1][0] > 0 else None,
            "final_kl": curves["kl"][max(curves["kl"])] if curves["kl"] else None,
            "final_reward": _last_mean(curves["accuracy"], LAST_STEPS),
            "curves": curves}


def _last_mean(curve: dict[int, float], n: int) -> float | None:
    """Mean of the last `n` steps' values (one step's 16 samples are noisy)."""
    last = [curve[k] for k in sorted(curve)[-n:]]
    return sum(last) / len(last) if last else None


def draw(results: dict, images: Path) -> list[Path]:
    """returns.png, kl.png, length.png: per preset the mean over seeds, min-max shaded."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure  # no pyplot: no global state, no GUI backend

    images.mkdir(parents=True, exist_ok=True)
    paths = []
    for filename, key, title in CURVES:
        fig = Figure(figsize=(7, 4.5), dpi=90)
        FigureCanvasAgg(fig)
        ax = fig.subplots()
        for preset, seeds in results.items():
            if key == "kl" and PRESETS[preset]["beta"] == 0:
                continue  # no reference model: the trainer logs KL 0, not a measurement
            per_seed = [r["curves"][key] for r in seeds.values() if r.get("curves")]
            steps = sorted(set.intersection(*(set(s) for s in per_seed))) if per_seed else []
            if not steps:
                continue
            vals_SN = [[s[step] for s in per_seed] for step in steps]
            mean = [sum(v) / len(v) for v in vals_SN]
            line, = ax.plot(steps, mean, label=f"{preset} ({len(per_seed)} seeds)")
            ax.fill_between(steps, [min(v) for v in vals_SN], [max(v) for v in vals_SN],
                            color=line.get_color(), alpha=0.2, linewidth=0)
        ax.set_xlabel("step")
        ax.set_title(title + (" (presets with beta > 0; the others have no reference)" if key == "kl" else ""),
                     fontsize=10)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(images / filename, format="png")
        paths.append(images / filename)
    return paths


def _spread(values: list) -> str:
    vals = [v for v in values if v is not None]
    if not vals:
        return "n/a"
    mean = sum(vals) / len(vals)
    return f"{mean:.2f}" if len(vals) == 1 else f"{mean:.2f} ({min(vals):.2f}-{max(vals):.2f})"


def table(c: PresetsConfig, results: dict) -> str:
    lines = [f"task {c.task}, model {Path(c.model).name}, {c.steps} steps of {c.prompts_per_step} prompts x "
             f"G={c.num_generations} x {c.max_new_tokens} tokens, T {c.temperature:g}, "
             f"{c.num_iterations} update(s) per batch, {c.seeds} seeds, "
             f"held-out accuracy on {c.eval_prompts} prompts (greedy, correct_lenient): mean (min-max over seeds)",
             "", f"| preset | beta | held-out accuracy before -> after | reward, last {LAST_STEPS} steps | final KL "
                 "| wall time (min) | runs ok |", "|---|---|---|---|---|---|---|"]
    for preset, seeds in results.items():
        ok = [r for r in seeds.values() if r["ok"]]
        beta = PRESETS[preset]["beta"]
        kl = _spread([r["final_kl"] for r in ok]) if beta > 0 else "n/a (beta 0)"
        lines.append(
            f"| {preset} | {beta:g} | {_spread([r['acc_before'] for r in ok])} -> "
            f"{_spread([r['acc_after'] for r in ok])} | {_spread([r['final_reward'] for r in ok])} | {kl} | "
            f"{_spread([r['wall_s'] / 60 for r in seeds.values()])} | {len(ok)}/{len(seeds)} |")
    failed = [f"{p} seed {s}: {r['error']}" for p, seeds in results.items() for s, r in seeds.items() if not r["ok"]]
    return "\n".join(lines + ([""] + [f"- FAILED {f}" for f in failed] if failed else []))


def main(argv: list[str]) -> int:
    c = parse_config(PresetsConfig, argv, prog="benchmarks/presets.py")
    names = preset_names(c)
    if c.seeds < 1 or c.steps < 1 or c.jobs < 1:
        raise UserError(f"--seeds, --steps and --jobs must be >= 1, got {c.seeds}, {c.steps} and {c.jobs}")
    out = Path(c.out).resolve()
    (out / "runs").mkdir(parents=True, exist_ok=True)
    if c.smoke:
        c = smoke_overrides(c, out)
    t0 = time.perf_counter()
    done = run_all(c, [(p, s) for p in names for s in range(c.seeds)], out)
    results = {p: {s: {**done[(p, s)], **(read_run(Path(done[(p, s)]["run_dir"])) if done[(p, s)]["ok"] else {})}
                   for s in range(c.seeds)} for p in names}
    images = draw(results, Path(c.images).resolve())
    text = table(c, results)
    print(text)
    print(f"[presets] images: {', '.join(str(p) for p in images)}; total {(time.perf_counter() - t0) / 60:.1f} min")
    (out / "presets.md").write_text(text + "\n")
    report = {"config": dataclasses.asdict(c), "total_s": time.perf_counter() - t0,
              "runs": {f"{p}-s{s}": r for p, seeds in results.items() for s, r in seeds.items()}}
    (out / "presets.json").write_text(json.dumps(report, indent=1))
    return 0 if all(r["ok"] for seeds in results.values() for r in seeds.values()) else 1


if __name__ == "__main__":
    from simple_grpo.errors import run_entry_point

    result = run_entry_point(main, sys.argv[1:], "benchmarks/presets.py")
    sys.exit(result if isinstance(result, int) else 0)
