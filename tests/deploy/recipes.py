"""The README's launch recipes as runnable commands, scaled down for a CPU test.

`recipe(name)` reads the ```bash block after `<!-- recipe: NAME -->` in README.md and returns its
commands (continuation lines joined, `&` = started in the background). `scale(cmd, ...)` turns one
into the argv a test runs, changing only what a CPU machine without the hub needs:
  * the launcher: `deepspeed` gets `--num_gpus=<ranks>`, `torchrun` `--nproc_per_node=<ranks>`, each a
    free `--master_port` (two-node runs keep theirs), `python` is this interpreter;
  * GPU pinning (`CUDA_VISIBLE_DEVICES=...`) is dropped; `$TOKEN`, `$NODE_RANK`, `HOST`, the
    rendezvous address and the ref server's port are replaced by the test's values;
  * `--model` (given or the default) is the tiny test model, `--task=openai/gsm8k:main` a local jsonl, `--prompts_per_step`
    fits the ranks, `--run_dir` a temporary folder; then the tiny sizes (TINY) are appended.
Everything else (options, their order, which script) is the README's.
"""
from __future__ import annotations

import re
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
TINY = {"steps": "3", "num_generations": "4", "micro_batch_size": "4", "max_new_tokens": "8",
        "eval_every": "0", "save_every": "0", "plot_every": "0", "samples_every": "0", "lr": "1e-3",
        "warmup_steps": "1"}


@dataclass
class Command:
    argv: list[str]
    background: bool = False
    env: dict[str, str] = field(default_factory=dict)  # VAR=value prefixes, as written

    @property
    def script(self) -> str:
        return next((Path(a).name for a in self.argv if a.endswith(".py")), "")


def recipe(name: str, readme: Path = README) -> list[Command]:
    text = readme.read_text()
    m = re.search(rf"<!-- recipe: {re.escape(name)} -->\s*```bash\n(.*?)```", text, re.S)
    assert m, f"README.md has no recipe {name!r}"
    body = re.sub(r"\\\n\s*", " ", m.group(1))
    out = []
    for line in body.splitlines():
        tokens = shlex.split(line, comments=True)
        if not tokens:
            continue
        background = tokens[-1] == "&"
        tokens = tokens[:-1] if background else tokens
        env = {}
        while re.fullmatch(r"[A-Z_]+=\S*", tokens[0]):
            k, v = tokens.pop(0).split("=", 1)
            env[k] = v
        out.append(Command(tokens, background, env))
    return out


def option(cmd: Command, key: str) -> str | None:
    for a in cmd.argv:
        if a.startswith(f"--{key}="):
            return a.split("=", 1)[1]
    return None


def scale(cmd: Command, *, model: Path, run_dir: Path | None = None, ranks: int = 2, port: int = 0,
          master_port: int = 0, data: Path | None = None, subs: dict[str, str] | None = None,
          prompts_per_step: int = 2, extra: dict[str, str] | None = None) -> list[str]:
    """The argv a CPU test runs for the README command `cmd` (see the module docstring)."""
    subs = dict(subs or {})
    argv = []
    for a in cmd.argv:
        for old, new in subs.items():
            a = a.replace(old, new)
        argv.append(a)
    launcher, rest = argv[0], argv[1:]
    if launcher == "python":
        head = [sys.executable]
    elif launcher == "deepspeed":
        head = ["deepspeed", f"--num_gpus={ranks}", f"--master_port={master_port}"]
    elif launcher == "torchrun":
        head = [sys.executable, "-m", "torch.distributed.run"]
        rest = [a for a in rest if not a.startswith("--nproc_per_node=")]
        if not any(a.startswith("--master_port=") for a in rest):
            rest.insert(0, f"--master_port={master_port}")
        rest.insert(0, f"--nproc_per_node={ranks}")
    else:
        raise AssertionError(f"unknown launcher {launcher!r} in {cmd.argv}")
    script = next(i for i, a in enumerate(rest) if a.endswith(".py"))
    rest[script] = str(ROOT / rest[script])
    opts = []
    for a in rest[script + 1:]:
        key = a[2:].split("=", 1)[0] if a.startswith("--") else None
        if key == "model":
            a = f"--model={model}"
        elif key == "task" and data is not None:
            a = f"--task={data}"
        elif key == "prompts_per_step":
            a = f"--prompts_per_step={prompts_per_step}"
        elif key == "port":
            a = f"--port={port}"
        elif key == "run_dir" and run_dir is not None:
            a = f"--run_dir={run_dir}"
        opts.append(a)
    if not any(a.startswith("--model=") for a in opts):  # the default model, replaced like any other
        opts.append(f"--model={model}")
    if rest[script].endswith("grpo_ref_split.py"):
        opts += [f"--{k}={v}" for k, v in {**TINY, **(extra or {})}.items()]
        if run_dir is not None and not any(a.startswith("--run_dir=") for a in opts):
            opts.append(f"--run_dir={run_dir}")
        if "--prompts_per_step" not in " ".join(opts):
            opts.append(f"--prompts_per_step={prompts_per_step}")
    else:
        opts += [f"--{k}={v}" for k, v in (extra or {}).items()]
    return head + rest[:script + 1] + opts
