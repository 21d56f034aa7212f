"""The package layout is the architecture: which process a module runs in and what it may import.

Every `import` and `from ... import` counts, also those inside functions (a deferred import that
closes a cycle is still a cycle). The file tree in docs/architecture.md must list exactly the files
there are, and the documents may name only files that exist.
"""
from __future__ import annotations

import ast
import re
import subprocess
from pathlib import Path

import pytest
from test_docs import ALL_DOCS  # tests/ is on sys.path

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "simple_grpo"
LEAVES = {"errors", "io", "hf_compat"}  # import nothing of the package
# package (or top-level module) -> what it may import, besides itself; "*" = anything but `not`
ALLOWED = {
    "errors": set(), "io": set(), "hf_compat": set(),
    "cli": {"errors"}, "models": {"errors"},
    "algo": {"errors", "hf_compat"},           # pure tensor math: no I/O, no other role
    "wire": {"errors"},                        # both ends of the wire read one definition
    "common": {"errors", "io", "hf_compat", "cli", "models", "algo"},  # the run's config, LoRA: both sides
    # generation (the trainer's own, the overlap sampler, workers): uses common, never the trainer
    "gen": {"errors", "io", "hf_compat", "cli", "models", "algo", "wire", "common"},
    "server": {"errors", "io", "hf_compat", "cli", "models", "algo", "wire"},  # never train
    "train": {"errors", "io", "hf_compat", "cli", "models", "algo", "wire", "common", "gen"},  # never server
}
MAX_LINES = 400


def module_name(path: Path, root: Path = ROOT) -> str:
    parts = path.relative_to(root).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path, modules: set[str], root: Path = ROOT) -> set[str]:
    """The package modules `path` imports anywhere in its body (module level or in functions)."""
    name, out = module_name(path, root), set()
    is_pkg = path.name == "__init__.py"
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolve against this module's package
                pkg = name.split(".")[: len(name.split(".")) - node.level + is_pkg]
                base = ".".join(pkg + ([node.module] if node.module else []))
            out.add(base)
            out |= {f"{base}.{a.name}" for a in node.names}  # `from pkg import module`
    return {m for m in out if m in modules and m != name}


def package_graph() -> dict[str, set[str]]:
    files = sorted(PKG.rglob("*.py"))
    modules = {module_name(p) for p in files}
    return {module_name(p): imports_of(p, modules) for p in files}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a path [a, b, ..., a], or None (depth-first search)."""
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done

    def visit(node: str, path: list[str]) -> list[str] | None:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [node, nxt] if nxt in path else [node, nxt]
            if nxt not in state and (found := visit(nxt, path + [node])):
                return found
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (found := visit(start, [])):
            return found
    return None


@pytest.mark.parametrize("graph, has_cycle", [
    ({"a": {"b"}, "b": set()}, False),                   # a line
    ({"a": {"b"}, "b": {"a"}}, True),                    # two modules importing each other
    ({"a": {"b"}, "b": {"c"}, "c": {"a"}}, True),        # a longer loop
    ({"a": {"b", "c"}, "b": {"c"}, "c": set()}, False),  # a diamond is not a cycle
])
def test_find_cycle_finds_cycles(graph, has_cycle):
    assert (find_cycle(graph) is not None) == has_cycle


def test_imports_inside_functions_count(tmp_path):
    # the server <-> weight_routes cycle this layout removed was closed by an import in a function
    src = tmp_path / "simple_grpo" / "server"
    src.mkdir(parents=True)
    (src / "app.py").write_text("from simple_grpo.server.routes import add\n")
    (src / "routes.py").write_text("def add():\n    from simple_grpo.server import app\n")
    mods = {"simple_grpo.server.app", "simple_grpo.server.routes", "simple_grpo.server"}
    graph = {module_name(p, tmp_path): imports_of(p, mods, tmp_path) for p in sorted(src.glob("*.py"))}
    assert "simple_grpo.server.app" in graph["simple_grpo.server.routes"]
    assert find_cycle(graph) is not None


def test_no_import_cycle():
    cycle = find_cycle(package_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def role(module: str) -> str:
    """simple_grpo.train.loop -> train; simple_grpo.errors -> errors; simple_grpo -> '' (the
    package's __init__, which every import of a submodule runs: anyone may import it)."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def test_every_module_belongs_to_a_role():
    roles = {role(m) for m in package_graph()} - {""}
    assert roles == set(ALLOWED), f"modules outside the documented roles: {roles ^ set(ALLOWED)}"


def test_each_role_imports_only_what_it_may():
    bad = [f"{m} imports {d}" for m, deps in package_graph().items() for d in deps
           if role(d) not in ("", role(m)) and role(d) not in ALLOWED.get(role(m), set())]
    assert not bad, "layering broken (see ALLOWED in this file):\n" + "\n".join(bad)


def test_modules_stay_small():
    files = sorted(PKG.rglob("*.py")) + [ROOT / "grpo_ref_split.py", ROOT / "ref_server.py"]
    big = {str(p.relative_to(ROOT)): n for p in files if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not big, f"over {MAX_LINES} lines: {big}"


ARCHITECTURE = ROOT / "docs" / "architecture.md"  # holds the "## Files" tree


def architecture_tree() -> set[str]:
    """The paths of docs/architecture.md's "## Files" tree: two spaces of indent per folder level."""
    text = ARCHITECTURE.read_text()
    block = re.search(r"## Files\n[^#]*?```\n(.*?)```", text, re.S)
    assert block, "docs/architecture.md has no '## Files' code block"
    paths, folders = set(), []
    for line in block.group(1).splitlines():
        if not line.strip():
            continue
        depth = (len(line) - len(line.lstrip(" "))) // 2
        name = line.strip().split()[0].rstrip(",")
        folders = folders[:depth]
        if name.endswith("/") and not name.startswith("images"):
            folders.append(name)
            if (ROOT / "".join(folders) / "__init__.py").exists() and depth:  # a subpackage's line
                paths.add("".join(folders) + "__init__.py")                   # describes its __init__
            continue
        paths.add("".join(folders) + name)
    return paths


def tracked_files() -> set[str]:
    out = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                         capture_output=True, text=True, check=True).stdout.split()
    files = {f for f in out if (ROOT / f).exists()}
    return {"images/" if f.startswith("images/") else f for f in files}


def test_architecture_tree_lists_exactly_the_files():
    listed, present = architecture_tree(), tracked_files()
    where = "the tree in docs/architecture.md"
    assert not present - listed, f"files missing from {where}: {sorted(present - listed)}"
    assert not listed - present, f"{where} names files that do not exist: {sorted(listed - present)}"


# a path from the repository root: simple_grpo/train/loop.py, benchmarks/memory.py, images/kl.png,
# tests/deploy/ (not one relative to a document, like ../images/kl.png: test_docs.py checks links)
NAMED_PATH = re.compile(r"(?<![\w./-])((?:simple_grpo|benchmarks|tests|tools|configs|images|docs)/[\w./-]*\w/?)")


@pytest.mark.parametrize("doc", ALL_DOCS)
def test_docs_name_only_files_that_exist(doc):
    named = set(NAMED_PATH.findall((ROOT / doc).read_text()))
    missing = sorted(p for p in named if not (ROOT / p).exists())
    assert named and not missing, f"{doc} names files that do not exist: {missing}"
