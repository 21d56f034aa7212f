"""One script that proves the GPU path in a single call (no network, about 5 minutes on one GPU).

    python benchmarks/gpu_check.py                       # a Qwen2.5-1.5B-shaped model on cuda
    python benchmarks/gpu_check.py --parts=gen           # the decode-speed table alone (3-5 minutes)
    python benchmarks/gpu_check.py --device=cpu --tiny   # the same path on a CPU, in seconds
                                                         # (tests/test_gpu_check.py runs it in CI)

It does, each failure a row of a table rather than the end:
  1. numerics on the device (benchmarks/gpu_check_numerics.py): decode loop vs HF generate (greedy,
     fp32 and bf16), shared-prompt log-probs vs the plain forward, sampling vs training log-probs,
     every preset's loss vs float64;
  2. training: `ref_server.py` and `grpo_ref_split.py` (one rank) on the same device, a random-weight
     model of the chosen shape, bf16 and sdpa on a GPU, fixed-length completions, beta > 0;
  3. the trainer as 2 ranks sharing that device (`--dist_backend=gloo`: NCCL refuses two ranks on
     one GPU), under tests/strict_collectives.py, so every collective must see the rank's device;
  4. decode speed (benchmarks/gen_speed.py, in this process, the shape's model with random weights):
     tokens/s and ms per step of each sampler engine (our loop, its static-cache twin compiled into
     a CUDA graph, HF generate) at --gen_batches x
     --gen_new_tokens forced-length rows and one variable-length row set, against the bandwidth floor
     of a step (weights + KV cache read once / a measured copy's bandwidth);
and prints the tables: seconds per step split into generate / reference (exposed wait) / train,
generation and training tokens/s, peak GPU memory of trainer and server, the reference server's
compute per step; decode speed vs its floor. The tables and the raw numbers go to --out
(gpu_check.md, gpu_check.json), rewritten as each part (each decode row) ends. --parts picks parts:
the whole decode table needs about 3-5 minutes of its own, `--parts=gen` runs it alone.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(Path(__file__).resolve().parent)]

from simple_grpo.cli import parse_config  # noqa: E402

# (hidden, intermediate, layers, heads, kv heads, vocab) of the real models, random weights here
SHAPES = {"qwen2.5-0.5b": (896, 4864, 24, 14, 2, 151936), "qwen2.5-1.5b": (1536, 8960, 28, 12, 2, 151936),
          "qwen2.5-7b": (3584, 18944, 28, 28, 4, 152064), "tiny": (64, 128, 2, 4, 2, 320)}


@dataclass
class CheckConfig:
    """benchmarks/gpu_check.py: prove the GPU path in one call."""

    device: str = "cuda"
    """cuda, or cpu (runs the same path; children see no GPU)."""
    tiny: bool = False
    """A tiny model and short completions (the CPU test mode)."""
    shape: str = "qwen2.5-1.5b"
    """Model shape of the training part: qwen2.5-0.5b | qwen2.5-1.5b | qwen2.5-7b (random weights)."""
    steps: int = 4
    """Training steps of the one-rank run; the first is a warm-up, excluded from the means."""
    prompts_per_step: int = 4
    """Prompts per step (G completions each)."""
    num_generations: int = 8
    """G."""
    completion_tokens: int = 256
    """Fixed completion length (min_new_tokens = max_new_tokens)."""
    two_rank_steps: int = 2
    """Steps of the 2-rank run (the smaller qwen2.5-0.5b shape on a GPU)."""
    out: str = "gpu_check_out"
    """Folder for the model, run dirs, logs, gpu_check.md and gpu_check.json."""
    part_timeout_s: float = 240.0
    """Each part's time limit."""
    deadline_s: float = 480.0
    """The whole check's time limit (inside a 10-minute call): a part gets what is left, parts
    that would start after it are reported as skipped."""
    report_dir: str = ""
    """Where gpu_check.md, gpu_check.json and the parts' logs are written after each part ("":
    --out). Models stay in --out."""
    parts: str = "numerics,train,gen"
    """Which parts run, in this order: numerics (1), train (2 and 3), gen (4)."""
    gen_batches: str = "16,64,128"
    """Batch sizes of the decode-speed rows (the tiny mode: 4,8)."""
    gen_new_tokens: str = "256,1024"
    """New tokens of the decode-speed rows (the tiny mode: 8,16)."""
    gen_variable: str = "64x1024"
    """BxN of the variable-length decode row set (the tiny mode: 8x16; "": none)."""


def child_env(c: CheckConfig) -> dict:
    from simple_grpo.train.engine import standalone_env

    env = standalone_env(PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false",
                         PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    if c.device == "cpu":
        env.update(CUDA_VISIBLE_DEVICES="", DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    return env


def random_model(c: CheckConfig, shape: str, tok):
    """A random-weight Qwen2 model of `shape` on the device: bf16 on a GPU, fp32 on a CPU, sdpa."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    hidden, inter, layers, heads, kv, vocab = SHAPES[shape]
    cfg = Qwen2Config(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=kv, max_position_embeddings=4096,
                      tie_word_embeddings=shape in ("tiny", "qwen2.5-0.5b", "qwen2.5-1.5b"),
                      rope_theta=1e6, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    with torch.device(c.device):
        return Qwen2ForCausalLM._from_config(cfg, dtype=torch.bfloat16 if c.device == "cuda" else torch.float32,
                                             attn_implementation="sdpa")


def build_model(c: CheckConfig, shape: str, folder: Path) -> Path:
    """A random-weight model of `shape` with the tiny byte-level tokenizer, saved as an HF folder."""
    import torch

    from simple_grpo.models import build_tiny_tokenizer

    if (folder / "config.json").exists():
        return folder
    tok = build_tiny_tokenizer()
    random_model(c, shape, tok).save_pretrained(folder)
    tok.save_pretrained(folder)
    if c.device == "cuda":
        torch.cuda.empty_cache()
    return folder


def numerics_model(c: CheckConfig):
    """The numerics part's model: 2 layers of the shape, random weights, fp32, sdpa, on the device."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    hidden, inter, _, heads, kv, vocab = SHAPES["tiny" if c.tiny else c.shape]
    cfg = Qwen2Config(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=2,
                      num_attention_heads=heads, num_key_value_heads=kv, max_position_embeddings=4096)
    torch.manual_seed(0)
    with torch.device(c.device):
        return Qwen2ForCausalLM._from_config(cfg, dtype=torch.float32, attn_implementation="sdpa")


def numerics(c: CheckConfig) -> list[dict]:
    """Part 1 in this process (the parts after it run in children, so its memory is freed first)."""
    import torch

    from gpu_check_numerics import run_all  # beside this file

    model = numerics_model(c)
    rows = run_all(model, torch.device(c.device), new=16 if c.tiny else 64)
    del model
    if c.device == "cuda":
        torch.cuda.empty_cache()
    return rows


DEADLINE = [float("inf")]  # time.monotonic() by which the whole check must end (main sets it)


def time_left(c: CheckConfig) -> float:
    """Seconds a part may take: its own limit or what is left of the overall deadline."""
    return max(0.0, min(c.part_timeout_s, DEADLINE[0] - time.monotonic()))


def run(cmd: list[str], log: Path, c: CheckConfig) -> tuple[bool, str]:
    """A child process with its output in `log` -> (exit 0, the last lines when it failed)."""
    with open(log, "w") as f:
        if time_left(c) < 5:
            f.write("skipped: the overall --deadline_s had passed\n")
            return False, "skipped: the overall --deadline_s had passed"
        try:
            r = subprocess.run(cmd, cwd=ROOT, env=child_env(c), stdout=f, stderr=subprocess.STDOUT,
                               timeout=time_left(c))
            ok = r.returncode == 0
        except subprocess.TimeoutExpired:
            ok = False
    tail = "" if ok else " | ".join(log.read_text(errors="replace").splitlines()[-6:])[-600:]
    return ok, tail


def completion_len(c: CheckConfig) -> int:
    """The fixed completion length of the training parts (8 tokens in the tiny mode)."""
    return 8 if c.tiny else c.completion_tokens


def trainer_args(c: CheckConfig, model: Path, run_dir: Path, url: str, steps: int) -> list[str]:
    n = completion_len(c)
    return [f"--model={model}", f"--run_dir={run_dir}", f"--ref_url={url}", "--publish_every=0",
            f"--steps={steps}", f"--prompts_per_step={c.prompts_per_step}",
            f"--num_generations={c.num_generations}", f"--max_new_tokens={n}", f"--min_new_tokens={n}",
            "--micro_batch_size=8", "--beta=0.04", "--temperature=0.7", "--eval_every=0", "--save_every=-1",
            "--plot_every=0", "--samples_every=0", "--warmup_steps=1", "--lr=1e-6"]


def summarize(run_dir: Path, skip: int) -> dict:
    """Means over the steps after the `skip` warm-up ones; the KL of step 1 itself."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "step_seconds" in r]
    kl_step1 = next((r.get("kl") for r in steps if r.get("step") == 1), None)
    rows = steps[skip:] or rows[-1:]

    def mean(k):
        return sum(r.get(k, 0.0) for r in rows) / len(rows)

    return {"s_per_step": mean("step_seconds"), "generate_s": mean("gen_seconds"), "ref_wait_s": mean("ref_seconds"),
            "train_s": mean("train_seconds"), "gen_tok_s": mean("tokens_per_s"), "kl_step1": kl_step1,
            "gpu_mem_gb": max(r.get("gpu_mem_gb_max", 0.0) for r in rows)}


def training(c: CheckConfig, model: Path, out: Path, two_ranks: bool, url: str, steps: int) -> dict:
    name = "train_2ranks" if two_ranks else "train_1rank"
    run_dir = out / name
    args = trainer_args(c, model, run_dir, url, steps)
    if two_ranks:
        from simple_grpo.train.engine import free_port

        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
               f"--master_port={free_port()}", str(ROOT / "tests" / "strict_collectives.py"),
               str(out / "collectives.jsonl"), str(ROOT / "grpo_ref_split.py"), "--dist_backend=gloo", *args]
    else:
        cmd = [sys.executable, str(ROOT / "grpo_ref_split.py"), *args]
    t0 = time.perf_counter()
    ok, tail = run(cmd, out / f"{name}.log", c)
    res = {"part": name, "ok": ok, "wall_s": time.perf_counter() - t0, "error": tail}
    if ok:
        res.update(summarize(run_dir, skip=1 if steps > 1 else 0))
        rows = c.prompts_per_step * c.num_generations
        res["train_tok_s"] = rows * completion_len(c) / max(res["train_s"], 1e-9)
        res["ok"] = res["kl_step1"] is not None and res["kl_step1"] < 1e-3  # bf16 policy vs bf16 reference
    if ok and two_ranks:
        seen = [json.loads(line) for line in (out / "collectives.jsonl").read_text().splitlines()]
        res["collectives"] = {k: v for r in seen[:1] for k, v in r["calls"].items()}
        res["ok"] &= len(seen) == 2 and res["collectives"].get("collectives.all_reduce", 0) > 0
    return res


def generation(c: CheckConfig, report: dict, save_now) -> None:
    """Part 4 in this process (benchmarks/gen_speed.py): the shape's model, decode rows saved as each ends."""
    import gen_speed  # beside this file
    from simple_grpo.models import build_tiny_tokenizer

    def ints(text: str, sep: str = ",") -> list[int]:
        return [int(x) for x in text.split(sep) if x]

    tok = build_tiny_tokenizer()
    sizes = ([4, 8], [8, 16], (8, 16)) if c.tiny else \
        (ints(c.gen_batches), ints(c.gen_new_tokens), tuple(ints(c.gen_variable, "x")) or None)
    report["gen"] = {"rows": []}
    gen_speed.check_part(report["gen"], lambda: random_model(c, "tiny" if c.tiny else c.shape, tok), tok,
                         report["device_name"], sizes, tiny=c.tiny, save=save_now,
                         time_left=lambda: DEADLINE[0] - time.monotonic())


def main(argv: list[str]) -> int:
    c = parse_config(CheckConfig, argv, prog="benchmarks/gpu_check.py")
    DEADLINE[0] = time.monotonic() + c.deadline_s
    parts = set(c.parts.split(","))
    assert parts <= {"numerics", "train", "gen"}, f"--parts: numerics, train, gen; got {c.parts}"
    out = Path(c.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    report_dir = Path(c.report_dir).resolve() if c.report_dir else out
    report_dir.mkdir(parents=True, exist_ok=True)
    report: dict = {"config": dataclasses.asdict(c), "started": time.strftime("%Y-%m-%d %H:%M:%S"),
                    "completion_tokens": completion_len(c)}
    report["device_name"] = _device_name(c)
    if "numerics" in parts:
        report["numerics"] = numerics(c)
        save(report, out, report_dir)
    if "train" in parts:
        train_parts(c, report, out, report_dir)
        save(report, out, report_dir)
    if "gen" in parts:
        generation(c, report, lambda: save(report, out, report_dir))
    report["seconds"] = round(time.monotonic() - DEADLINE[0] + c.deadline_s, 1)
    print(save(report, out, report_dir))
    rows = report.get("numerics", []) + report.get("train", []) + report.get("gen", {}).get("rows", [])
    ok = all(r["ok"] for r in rows)
    print("gpu_check:", "PASS" if ok else "FAIL")
    return 0 if ok else 1


def train_parts(c: CheckConfig, report: dict, out: Path, report_dir: Path) -> None:
    """Parts 2 and 3: the reference server and the trainer on one rank, then on 2 ranks."""
    import requests

    from simple_grpo.train.engine import free_port

    shape = "tiny" if c.tiny else c.shape
    model = build_model(c, shape, out / f"model-{shape}")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = None
    try:
        if time_left(c) < 5:
            raise TimeoutError("skipped: the overall --deadline_s had passed")
        server = start_server(c, model, port, out / "ref_server.log")
        report["train"] = [training(c, model, out, False, url, c.steps)]
        save(report, out, report_dir)
        stats = requests.get(f"{url}/stats", timeout=10).json()
        report["server"] = {"compute_s_per_call": stats.get("compute_ms_mean", 0.0) / 1000,
                            "gpu_mem_gb": stats.get("gpu_mem_gb_max", 0.0)}
        small = model if c.tiny else build_model(c, "qwen2.5-0.5b", out / "model-qwen2.5-0.5b")
        if small != model:
            server.terminate()
            server.wait(timeout=60)
            server = start_server(c, small, port, out / "ref_server_small.log")
        report["train"].append(training(c, small, out, True, url, c.two_rank_steps))
    except TimeoutError as e:
        report.setdefault("train", []).append({"part": "training", "ok": False, "error": str(e)})
    except Exception as e:  # noqa: BLE001 - report what failed, with the table of what ran
        report.setdefault("train", []).append({"part": "setup", "ok": False, "error": f"{type(e).__name__}: {e}"})
    finally:
        if server is not None:
            server.terminate()
            server.wait(timeout=60)


def save(report: dict, out: Path, report_dir: Path) -> str:
    """Write the table, the JSON and the parts' logs so far to `report_dir` -> the table."""
    table = render(report)
    (report_dir / "gpu_check.md").write_text(table + "\n")
    (report_dir / "gpu_check.json").write_text(json.dumps(report, indent=1))
    if report_dir != out:
        for log in out.glob("*.log"):
            shutil.copyfile(log, report_dir / log.name)
    return table


def _device_name(c: CheckConfig) -> str:
    import torch

    return torch.cuda.get_device_name(0) if c.device == "cuda" else "cpu"


def start_server(c: CheckConfig, model: Path, port: int, log: Path) -> subprocess.Popen:
    """`ref_server.py` for `model` on 127.0.0.1:`port`, on the checked device; waits until ready."""
    cmd = [sys.executable, str(ROOT / "ref_server.py"), f"--model={model}", f"--port={port}", f"--device={c.device}"]
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd + (["--torch_threads=1"] if c.device == "cpu" else []), cwd=ROOT,
                                env=child_env(c), stdout=f, stderr=subprocess.STDOUT)
    try:
        _wait_health(f"http://127.0.0.1:{port}", proc, max(time_left(c), 5.0))
    except RuntimeError:
        proc.kill()
        raise
    return proc


def _wait_health(url: str, proc: subprocess.Popen, timeout: float) -> None:
    import requests

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"ref_server.py exited with {proc.returncode}")
        try:
            if requests.get(f"{url}/health", timeout=2).ok:
                return
        except requests.RequestException:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"ref_server.py not ready after {timeout:.0f} s")


def render(report: dict) -> str:
    c = report["config"]
    lines = [f"device: {report['device_name']}; shape {'tiny' if c['tiny'] else c['shape']}, "
             f"{c['prompts_per_step']} prompts x G={c['num_generations']} x "
             f"{report['completion_tokens']} tokens, beta 0.04, T 0.7"]
    if "numerics" in report:
        lines += ["", "| check | ok | detail |", "|---|---|---|"]
        lines += [f"| {r['check']} | {'yes' if r['ok'] else 'NO'} | {r['detail']} |" for r in report["numerics"]]
    if "train" in report:
        lines += ["", "| run | ok | s/step | generate | reference (exposed) | train | gen tok/s | train tok/s | "
                  "peak GPU GB (trainer) | KL step 1 |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in report.get("train", []):
        if "s_per_step" not in r:
            lines.append(f"| {r['part']} | NO | {r.get('error', '')[:300]} | | | | | | | |")
            continue
        lines.append(f"| {r['part']} | {'yes' if r['ok'] else 'NO'} | {r['s_per_step']:.2f} | {r['generate_s']:.2f} | "
                     f"{r['ref_wait_s']:.2f} | {r['train_s']:.2f} | {r['gen_tok_s']:.0f} | {r['train_tok_s']:.0f} | "
                     f"{r['gpu_mem_gb']:.1f} | {r['kl_step1']:.1e} |")
    s = report.get("server")
    if s:
        t1 = report["train"][0]
        share = s["compute_s_per_call"] / max(t1.get("s_per_step", 0.0), 1e-9)
        lines += ["", f"reference server: {s['compute_s_per_call']:.3f} s of compute per batch "
                      f"({100 * share:.1f}% of a one-rank step; exposed wait {t1.get('ref_wait_s', 0.0):.3f} s), "
                      f"peak GPU memory {s['gpu_mem_gb']:.1f} GB"]
    if report.get("gen"):
        import gen_speed  # beside this file

        lines += ["", gen_speed.render_part(report["gen"])]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
