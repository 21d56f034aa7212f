"""tools/mutants.py on a tiny git repository of its own (a module, a test, a table): a mutant a
test catches is caught, one no test catches survived, a `find` that occurs 0 or 2 times is a clear
error, the real tree is never written; and the project's own table still applies to its code."""
from __future__ import annotations

import hashlib
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
pytest.importorskip("tomllib", reason="tools/mutants.py reads its table with tomllib (Python 3.11+)")
import mutants  # noqa: E402

MODULE = '''\
def add(a, b):
    return a + b


def sub(a, b):
    return a - b  # untested


def double(x):
    return x * 2


def twice(x):
    return x * 2
'''
TEST = '''\
from calc import add


def test_add():
    assert add(2, 3) == 5
'''
TABLE = '''\
[[mutant]]
name = "add-minus"
file = "calc.py"
find = "return a + b"
replace = "return a - b"
tests = ["tests/test_calc.py"]
why = "add subtracts"

[[mutant]]
name = "sub-plus"
file = "calc.py"
find = "return a - b"
replace = "return a + b"
tests = ["tests/test_calc.py"]
why = "sub adds"

[[mutant]]
name = "sub-equivalent"
file = "calc.py"
find = "return a - b  # untested"
replace = "return a - b  # changed comment"
tests = ["tests/test_calc.py"]
why = "a comment"
equivalent = "comments do not run"

[[mutant]]
name = "missing"
file = "calc.py"
find = "return a * b"
replace = "return a / b"
tests = ["tests/test_calc.py"]
why = "not in the file"

[[mutant]]
name = "twice"
file = "calc.py"
find = "return x * 2"
replace = "return x * 3"
tests = ["tests/test_calc.py"]
why = "two lines match"

[[mutant]]
name = "no-such-test"
file = "calc.py"
find = "return a + b"
replace = "return a - b"
tests = ["tests/test_nothing.py"]
why = "the test file does not exist"
'''


@pytest.fixture
def repo(tmp_path) -> Path:
    """A git repository (nothing committed: untracked files count) with a module, its test, an
    ignored file and a mutant table."""
    root = tmp_path / "repo"
    (root / "tests").mkdir(parents=True)
    (root / "calc.py").write_text(MODULE)
    (root / "tests" / "test_calc.py").write_text(TEST)
    (root / ".gitignore").write_text("ignored.txt\n")
    (root / "ignored.txt").write_text("not copied\n")
    (root / "mutants.toml").write_text(TABLE)
    subprocess.run(["git", "init", "-q"], cwd=root, check=True)
    return root


def digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and ".git" not in p.parts}


def run(repo: Path, *args: str, capsys) -> tuple[int, str]:
    code = mutants.main(["--root", str(repo), "--table", str(repo / "mutants.toml"), *args])
    return code, capsys.readouterr().out


def row(out: str, name: str) -> str:
    return next(line for line in out.splitlines() if line.startswith(f"| {name} |"))


def test_caught_survived_equivalent_and_errors(repo, capsys, tmp_path):
    before = digest(repo)
    code, out = run(repo, "--out", str(tmp_path / "report.md"), "--jobs", "2", capsys=capsys)
    assert code == 1, "a mutant survived and others errored"
    assert "| caught |" in row(out, "add-minus")
    assert "| survived |" in row(out, "sub-plus")
    assert "survived (equivalent: comments do not run)" in row(out, "sub-equivalent")
    assert "error: missing: `find` occurs 0 times in calc.py" in row(out, "missing")
    assert "error: twice: `find` occurs 2 times in calc.py" in row(out, "twice")
    assert "error: pytest exit 4 (usage error)" in row(out, "no-such-test")
    assert "1 caught, 2 survived (1 equivalent), 3 errors" in out
    assert (tmp_path / "report.md").read_text() == out
    assert digest(repo) == before, "the real tree must never be written"


def test_passes_when_every_mutant_is_caught_or_equivalent(repo, capsys):
    code, out = run(repo, "--only", "add-*,sub-equivalent", capsys=capsys)
    assert code == 0, out
    assert out.strip().endswith("1 caught, 1 survived (1 equivalent), 0 errors")


def test_baseline_failure_is_an_error_not_caught(repo, capsys):
    (repo / "tests" / "test_calc.py").write_text(TEST.replace("== 5", "== 6"))  # fails unmutated
    code, out = run(repo, "--only", "add-minus", "--baseline", capsys=capsys)
    assert code == 1
    assert "error: tests fail without the mutant (exit 1)" in row(out, "add-minus")


def test_list_checks_every_find(repo, capsys):
    code, out = run(repo, "--list", capsys=capsys)
    assert code == 1 and "6 mutants, 2 with a `find` that does not apply" in out
    assert run(repo, "--list", "--only", "add-minus", capsys=capsys)[0] == 0
    assert run(repo, "--only", "nonesuch", capsys=capsys)[0] == 2


def test_copy_is_what_git_would_commit(repo, tmp_path):
    mutants.copy_tree(repo, tmp_path / "copy")
    copied = sorted(str(p.relative_to(tmp_path / "copy")) for p in (tmp_path / "copy").rglob("*")
                    if p.is_file())
    assert copied == [".gitignore", "calc.py", "mutants.toml", "tests/test_calc.py"]


@pytest.mark.parametrize("bad, message", [
    ({"tests": "tests/test_calc.py"}, "tests must be a non-empty list"),
    ({"replace": "return a + b"}, "find and replace must be different"),
    ({"colour": "red"}, "unknown ['colour']"),
])
def test_malformed_entries_are_rejected(tmp_path, bad, message):
    entry = dict(name="m", file="calc.py", find="return a + b", replace="return a - b",
                 tests=["tests/test_calc.py"], why="w") | bad
    lines = ["[[mutant]]"] + [f"{k} = {v!r}" for k, v in entry.items()]  # repr: TOML literal strings
    (tmp_path / "t.toml").write_text("\n".join(lines) + "\n")
    with pytest.raises(mutants.TableError, match=re.escape(message)):
        mutants.load_table(tmp_path / "t.toml")


def test_the_projects_table_applies_to_the_code():
    """Every `find` in tools/mutants.toml occurs exactly once in its file: when the code a mutant
    stands for changes, update the mutant here (its tests keep it honest)."""
    table = mutants.load_table()
    assert len(table) >= 20
    errors = []
    for m in table:
        try:
            mutants.mutate(m, ROOT)
        except mutants.TableError as e:
            errors.append(str(e))
    assert not errors, "\n".join(errors)


@pytest.mark.slow
def test_every_mutant_of_the_core_is_caught(tmp_path):
    """The mutation check itself (two mutants at a time, one per core): every one-line bug in the
    table is caught by the tests it names; none survives unexplained."""
    r = subprocess.run([sys.executable, str(ROOT / "tools" / "mutants.py"), "--jobs=2", f"--out={tmp_path / 'm.md'}"],
                       cwd=ROOT, capture_output=True, text=True, timeout=3600)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    assert re.search(r"\d+ caught, 0 survived \(0 equivalent\), 0 errors", r.stdout), r.stdout[-2000:]
