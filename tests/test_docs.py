"""The documents say only what is true of the code: every `--option` they name exists, every
documented metric is one the code can write (and `undocumented_metrics`, used by the tests that run
real trainings, finds logged keys the metrics table lacks), their links resolve, and no tracked text
cites a tracker entry by number."""
from __future__ import annotations

import ast
import dataclasses
import re
import subprocess
import typing
from pathlib import Path

import pytest

from simple_grpo.cli import _is_flag
from simple_grpo.server.config import ServerConfig
from simple_grpo.common.config import TrainConfig

ROOT = Path(__file__).resolve().parents[1]
DOCS = ["README.md"] + sorted(f"docs/{p.name}" for p in (ROOT / "docs").glob("*.md"))  # for users
ALL_DOCS = [*DOCS, "BENCHMARKS.md"]
DOCSTRINGS = ["grpo_ref_split.py", "ref_server.py", "rewards.py", "simple_grpo/gen/reward_registry.py"]
METRICS_DOC = ROOT / "docs" / "metrics.md"

# Options of other programs (launchers, installers) and placeholders of the option syntax, each
# allowed by name: they are not fields of TrainConfig / ServerConfig.
NOT_OURS = {
    "nnodes": "torchrun: number of nodes",
    "node_rank": "torchrun: this node's index",
    "nproc_per_node": "torchrun: processes per node",
    "master_addr": "torchrun: rendezvous host",
    "master_port": "torchrun: rendezvous port",
    "max-restarts": "torchrun: restarts of a failed worker group",
    "num_gpus": "deepspeed launcher: processes on this node",
    "no-deps": "pip: install without dependencies",
    "no-build-isolation": "pip: build flash-attn against the installed torch",
    "config": "simple_grpo/cli.py: a JSON file of options, for every script",
    "help": "simple_grpo/cli.py: the options by section",
    "key": "placeholder of the syntax --key=value",
    "flag": "placeholder of the syntax --flag",
    "no-flag": "placeholder of the syntax --no-flag",
}
OPTION = re.compile(r"(?<![\w-])--([A-Za-z][\w-]*)(\*?)")  # `--lora_*`: a prefix of options
SCRIPT = re.compile(r"\b(\w+)\.py\b")  # benchmarks/<x>.py or tools/<x>.py, or just <x>.py in the tree


def _fields(cls) -> dict[str, object]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


FIELDS = {**_fields(TrainConfig), **_fields(ServerConfig)}
NAMES = set(FIELDS) | set(TrainConfig.ALIASES)


def option_exists(name: str, prefix: bool, line: str) -> bool:
    """`--name` is a trainer or server option (or an alias, or `--no-<flag>`), an allowed option of
    another program, or, on a line naming benchmarks/<x>.py or tools/<x>.py (or just <x>.py), an
    option of that script (a "--name" string or a field `name:` of its config dataclass)."""
    if prefix:
        return any(n.startswith(name) for n in NAMES)
    if name in NAMES or name in NOT_OURS:
        return True
    negated = re.fullmatch(r"no[-_](\w+)", name)
    if negated and negated.group(1) in FIELDS and _is_flag(FIELDS[negated.group(1)]):
        return True
    scripts = [ROOT / folder / f"{stem}.py" for stem in SCRIPT.findall(line) for folder in ("benchmarks", "tools")]
    for script in scripts:
        if not script.is_file():
            continue
        src = script.read_text()
        if f'"--{name}"' in src or re.search(rf"^\s+{re.escape(name)}\s*:", src, re.M):
            return True
    return False


def texts() -> list[tuple[str, str]]:
    """(where, text) of every document and of the listed modules' docstrings."""
    out = [(doc, (ROOT / doc).read_text()) for doc in DOCS]
    out += [(f"{path} docstring", ast.get_docstring(ast.parse((ROOT / path).read_text())) or "")
            for path in DOCSTRINGS]
    return out


def unknown_options(text: str) -> list[str]:
    return [f"--{name}{star}: {line.strip()[:100]}" for line in text.splitlines()
            for name, star in OPTION.findall(line) if not option_exists(name, bool(star), line)]


@pytest.mark.parametrize("where, text", texts(), ids=[w for w, _ in texts()])
def test_every_option_named_exists(where, text):
    bad = unknown_options(text)
    assert not bad, f"{where} names options that do not exist:\n" + "\n".join(bad)


@pytest.mark.parametrize("line, ok", [
    ("`--rewards_file=my_rewards.py`", True),
    ("`--rewards-file=my_rewards.py`", False),          # the docs spell options as --help does
    ("`--token=$TOKEN`", True),                          # an alias of --ref_token
    ("`--no-disable_dropout`", True),                    # the negated form of a flag
    ("`--no-lr`", False),                                # --lr is not a flag
    ("the trainer's `--lora_*` options", True),
    ("torchrun --nnodes=2 --master_addr=10.0.0.1", True),
    ("`python benchmarks/presets.py --seeds=5`", True),  # a field of the script's config
    ("`python benchmarks/step_time.py --micro=16`", True),  # an argparse option of the script
    ("run more seeds (`--seeds=5`)", False),             # no script named on the line
])
def test_the_option_check_catches_what_it_should(line, ok):
    assert (not unknown_options(line)) == ok, unknown_options(line)


def documented_metrics() -> set[str]:
    """The keys in the first column of the tables under docs/metrics.md's "## metrics.jsonl"."""
    text = METRICS_DOC.read_text()
    section = re.search(r"^## metrics\.jsonl\n(.*?)(?=^## )", text, re.S | re.M)
    assert section, "docs/metrics.md has no '## metrics.jsonl' section"
    return set(re.findall(r"^\| `([^`]+)` \|", section.group(1), re.M))


def undocumented_metrics(rows: list[dict]) -> list[str]:
    """The keys of metrics.jsonl rows that docs/metrics.md does not document (`reward/<fn>` is
    documented as `reward/<name>`)."""
    documented = documented_metrics()
    keys = {re.sub(r"^reward/.+", "reward/<name>", k) for row in rows for k in row}
    return sorted(keys - documented)


def test_documented_metrics_are_written_by_the_code():
    source = "\n".join(p.read_text() for p in sorted((ROOT / "simple_grpo").rglob("*.py")))
    source += (ROOT / "grpo_ref_split.py").read_text()
    documented = documented_metrics()
    assert {"step", "reward_mean", "loss", "kl", "reward/<name>"} <= documented
    made_up = [k for k in sorted(documented - {"reward/<name>"})
               if not re.search(rf"[\"']{re.escape(k)}[\"']|\b{re.escape(k)}=", source)]
    assert not made_up, f"docs/metrics.md documents metrics no code writes: {made_up}"


def test_undocumented_metrics_finds_new_keys():
    assert undocumented_metrics([{"step": 1, "loss": 0.0, "reward/mine": 1.0}]) == []
    assert undocumented_metrics([{"step": 1, "lossy": 0.0}]) == ["lossy"]


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to dashes."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    text = re.sub(r"^```.*?^```", "", path.read_text(), flags=re.S | re.M)  # no headings in code
    headings = {_slug(h) for h in re.findall(r"^#+ (.+)$", text, re.M)}
    return headings | set(re.findall(r'<a id="([^"]+)">', text))


@pytest.mark.parametrize("doc", ALL_DOCS)
def test_links_resolve(doc):
    path = ROOT / doc
    bad = []
    for target, anchor in re.findall(r"\]\(([^)#\s]*)(?:#([^)\s]+))?\)", path.read_text()):
        if target.startswith(("http://", "https://")):
            continue
        dest = (path.parent / target).resolve() if target else path
        if not dest.exists():
            bad.append(f"{target}: no such file")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            bad.append(f"{target}#{anchor}: no such heading")
    assert not bad, f"{doc} has broken links: {bad}"


WORK_ITEM = re.compile(r"\bissues?\s*#?\d+", re.I)


def test_no_tracked_text_cites_a_tracker_entry():
    out = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "--", "*.md",
                          "*.py", "*.json", "*.txt", "*.toml"], cwd=ROOT, capture_output=True, text=True,
                         check=True).stdout.split()
    hits = [f"{f}:{n}: {line.strip()[:100]}" for f in out if (ROOT / f).is_file()
            for n, line in enumerate((ROOT / f).read_text(errors="replace").splitlines(), 1)
            if WORK_ITEM.search(line)]
    assert not hits, "tracked text cites tracker entries; say what the code does instead:\n" + "\n".join(hits)
