"""A mutation check of the project's core: each mutant in tools/mutants.toml is a one-line bug
(`find` -> `replace` in `file`), and the tests it names must catch it.

    python tools/mutants.py [--only NAME,...] [--jobs N] [--out FILE] [--timeout S] [--baseline]
    python tools/mutants.py --list          # the table, and whether every `find` still applies

How it works: the working tree (tracked and untracked-but-not-ignored files, as `git ls-files -co
--exclude-standard` lists them) is copied into a temporary folder once per job; for each mutant the
line is changed there, `python -m pytest -x -q -p no:cacheprovider -m "" <tests>` runs in the copy
(`-m ""`: a test the table names runs even when it is marked slow), and the file is put back. The
real tree is never written.

    caught     pytest exit 1 (a test failed)
    survived   pytest exit 0 (no test noticed the bug); reported as equivalent when the table says
               `equivalent = "why it cannot be caught"`
    error      anything else (collection error, no test found, timeout, a `find` that does not
               occur exactly once in its file): never counted as caught

`--baseline` first runs each mutant's tests on the unchanged copy: a mutant whose tests already
fail there is an error, not caught. `--only` takes names or shell patterns (`--only 'losses-*'`).
The output is a markdown table and the line "N caught, M survived (K equivalent), E errors"; the
exit status is 1 when a mutant that is not marked equivalent survived or errored.
"""
from __future__ import annotations

import argparse
import fnmatch
import os
import queue
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import tomllib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TABLE = Path(__file__).with_name("mutants.toml")
REQUIRED = ("name", "file", "find", "replace", "tests", "why")
OPTIONAL = ("equivalent", "timeout")
LIVE: set[subprocess.Popen] = set()  # pytest runs in progress, killed on Ctrl-C
PYTEST_EXIT = {2: "interrupted or collection error", 3: "internal error", 4: "usage error",
               5: "no tests collected"}


class TableError(Exception):
    """The table is malformed, or a mutant's `find` does not occur exactly once in its file."""


@dataclass(frozen=True)
class Mutant:
    name: str
    file: str
    find: str
    replace: str
    tests: tuple[str, ...]
    why: str
    equivalent: str | None = None
    timeout: float | None = None


@dataclass
class Result:
    mutant: Mutant
    status: str  # caught | survived | error
    seconds: float
    detail: str = ""


def load_table(path: Path = TABLE) -> list[Mutant]:
    """The `[[mutant]]` entries of a TOML table, checked for their fields (not yet for `find`)."""
    with open(path, "rb") as f:
        entries = tomllib.load(f).get("mutant", [])
    mutants, seen = [], set()
    for i, e in enumerate(entries):
        where = f"{path}: mutant #{i + 1} ({e.get('name', '?')})"
        missing = [k for k in REQUIRED if k not in e]
        unknown = sorted(set(e) - set(REQUIRED) - set(OPTIONAL))
        if missing or unknown:
            raise TableError(f"{where}: missing {missing}, unknown {unknown}")
        if not all(isinstance(e[k], str) and (e[k] or k == "replace") for k in REQUIRED if k != "tests"):
            raise TableError(f"{where}: name, file, find, replace and why must be strings "
                             "(only replace may be empty)")
        if "\n" in e["find"] or "\n" in e["replace"] or e["find"] == e["replace"]:
            raise TableError(f"{where}: find and replace must be different one-line strings")
        tests = e["tests"]
        if not (isinstance(tests, list) and tests and all(isinstance(t, str) and t for t in tests)):
            raise TableError(f"{where}: tests must be a non-empty list of pytest paths or node ids")
        if e["name"] in seen:
            raise TableError(f"{where}: the name is used twice")
        seen.add(e["name"])
        mutants.append(Mutant(e["name"], e["file"], e["find"], e["replace"], tuple(tests), e["why"],
                              e.get("equivalent"), e.get("timeout")))
    return mutants


def mutate(m: Mutant, root: Path) -> tuple[bytes, bytes]:
    """(original bytes, mutated bytes) of `m.file` under `root`; TableError unless `m.find`
    occurs exactly once there."""
    path = root / m.file
    if not path.is_file():
        raise TableError(f"{m.name}: {m.file} does not exist")
    original = path.read_bytes()
    text = original.decode("utf-8")
    n = text.count(m.find)
    if n != 1:
        raise TableError(f"{m.name}: `find` occurs {n} times in {m.file} (it must occur exactly "
                         f"once; update the table): {m.find!r}")
    return original, text.replace(m.find, m.replace, 1).encode("utf-8")


def select(mutants: list[Mutant], only: str | None) -> list[Mutant]:
    """The mutants whose names match one of the comma-separated names or patterns in `only`."""
    if not only:
        return mutants
    patterns = [p.strip() for p in only.split(",") if p.strip()]
    unmatched = [p for p in patterns if not any(fnmatch.fnmatchcase(m.name, p) for m in mutants)]
    if unmatched:
        raise TableError(f"--only: no mutant named {', '.join(unmatched)}")
    return [m for m in mutants if any(fnmatch.fnmatchcase(m.name, p) for p in patterns)]


def copy_tree(root: Path, dest: Path) -> None:
    """Copy the files git would commit (tracked, and untracked but not ignored) into `dest`."""
    out = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=root,
                         capture_output=True, check=True).stdout
    for rel in sorted(set(out.decode("utf-8").split("\0")) - {""}):
        src = root / rel
        if not os.path.lexists(src):  # tracked but deleted in the working tree
            continue
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, dest / rel, follow_symlinks=False)


def run_pytest(tests: tuple[str, ...], copy: Path, timeout: float) -> tuple[int | None, str]:
    """(exit code or None on timeout, output tail) of pytest on `tests` in the copy."""
    env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1",  # no stale .pyc of a mutated file
               PYTHONPATH=os.pathsep.join([str(copy), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep))
    cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", "-m", "", *tests]
    proc = subprocess.Popen(cmd, cwd=copy, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    LIVE.add(proc)
    try:
        out, _ = proc.communicate(timeout=timeout)
        return proc.returncode, out[-3000:]
    except subprocess.TimeoutExpired:
        kill(proc)
        out, _ = proc.communicate()
        return None, out[-3000:]
    finally:
        LIVE.discard(proc)


def kill(proc: subprocess.Popen) -> None:
    """Kill pytest and whatever it started in its session (torchrun, servers)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def last_line(output: str) -> str:
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    return lines[-1] if lines else "(no output)"


def run_mutant(m: Mutant, copy: Path, timeout: float) -> Result:
    """Apply `m` in the copy, run its tests, restore the file."""
    t0 = time.monotonic()
    try:
        original, mutated = mutate(m, copy)
    except TableError as e:
        return Result(m, "error", 0.0, str(e))
    path = copy / m.file
    path.write_bytes(mutated)
    try:
        code, output = run_pytest(m.tests, copy, m.timeout or timeout)
    finally:
        path.write_bytes(original)
    seconds = time.monotonic() - t0
    if code == 1:
        return Result(m, "caught", seconds)
    if code == 0:
        return Result(m, "survived", seconds)
    if code is None:
        return Result(m, "error", seconds, f"timeout after {m.timeout or timeout:.0f} s")
    why = PYTEST_EXIT.get(code, "unexpected exit")
    return Result(m, "error", seconds, f"pytest exit {code} ({why}): {last_line(output)}")


def run_all(mutants: list[Mutant], root: Path, jobs: int, timeout: float, baseline: bool) -> list[Result]:
    """Every mutant in its own pytest run, `jobs` at a time, each job in its own copy of the tree."""
    tmp = Path(tempfile.mkdtemp(prefix="mutants-"))
    copies: queue.Queue[Path] = queue.Queue()

    def in_a_copy(fn, *args):
        copy = copies.get()
        try:
            return fn(*args, copy, timeout)
        finally:
            copies.put(copy)

    def broken_suites(pool) -> dict[tuple[str, ...], str]:
        """Test sets that fail on the unchanged tree -> why (--baseline)."""
        suites, broken = sorted({m.tests for m in mutants}), {}
        for tests, (code, output) in zip(suites, pool.map(lambda t: in_a_copy(run_pytest, t), suites)):
            if code != 0:
                broken[tests] = f"tests fail without the mutant (exit {code}): {last_line(output)}"
                print(f"baseline: {' '.join(tests)}: {broken[tests]}", file=sys.stderr)
        return broken

    try:
        for j in range(max(jobs, 1)):
            copy_tree(root, tmp / f"tree{j}")
            copies.put(tmp / f"tree{j}")
        with ThreadPoolExecutor(max(jobs, 1)) as pool:
            try:
                broken = broken_suites(pool) if baseline else {}

                def one(m: Mutant) -> Result:
                    if m.tests in broken:
                        return Result(m, "error", 0.0, broken[m.tests])
                    r = in_a_copy(run_mutant, m)
                    print(f"{m.name}: {r.status} ({r.seconds:.1f} s) {r.detail}".rstrip(), file=sys.stderr)
                    return r

                return list(pool.map(one, mutants))
            except KeyboardInterrupt:
                pool.shutdown(wait=False, cancel_futures=True)
                for proc in list(LIVE):
                    kill(proc)
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def result_text(r: Result) -> str:
    if r.status == "survived" and r.mutant.equivalent:
        return f"survived (equivalent: {r.mutant.equivalent})"
    return f"error: {r.detail}" if r.status == "error" else r.status


def markdown(results: list[Result]) -> str:
    rows = ["| mutant | file | bug | tests | result | seconds |", "|---|---|---|---|---|---|"]
    for r in results:
        m = r.mutant
        rows.append(f"| {cell(m.name)} | {cell(m.file)} | {cell(m.why)} | {cell(' '.join(m.tests))} "
                    f"| {cell(result_text(r))} | {r.seconds:.1f} |")
    return "\n".join(rows)


def summary(results: list[Result]) -> tuple[str, bool]:
    """(the summary line, whether the check passed)."""
    caught = sum(r.status == "caught" for r in results)
    survived = [r for r in results if r.status == "survived"]
    equivalent = sum(1 for r in survived if r.mutant.equivalent)
    errors = [r for r in results if r.status == "error"]
    ok = all(r.mutant.equivalent for r in survived + errors)
    return f"{caught} caught, {len(survived)} survived ({equivalent} equivalent), {len(errors)} errors", ok


def list_table(mutants: list[Mutant], root: Path) -> int:
    """Print the table with each `find` checked against the tree -> exit status."""
    bad = 0
    print("| mutant | file | bug | tests | find |\n|---|---|---|---|---|")
    for m in mutants:
        try:
            mutate(m, root)
            status = "ok"
        except TableError as e:
            status, bad = f"error: {e}", bad + 1
        print(f"| {cell(m.name)} | {cell(m.file)} | {cell(m.why)} | {cell(' '.join(m.tests))} "
              f"| {cell(status)} |")
    print(f"{len(mutants)} mutants, {bad} with a `find` that does not apply")
    return 1 if bad else 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", help="comma-separated mutant names or shell patterns")
    ap.add_argument("--jobs", type=int, default=1, help="mutants run at the same time (default 1)")
    ap.add_argument("--out", type=Path, help="also write the markdown table and summary here")
    ap.add_argument("--list", action="store_true", help="print the table and check every `find`")
    ap.add_argument("--timeout", type=float, default=1200.0,
                    help="seconds per mutant unless the table gives its own (default 1200)")
    ap.add_argument("--baseline", action="store_true",
                    help="first check that each mutant's tests pass on the unchanged tree")
    ap.add_argument("--table", type=Path, default=TABLE, help=argparse.SUPPRESS)
    ap.add_argument("--root", type=Path, default=ROOT, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    try:
        mutants = select(load_table(args.table), args.only)
    except TableError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.list:
        return list_table(mutants, args.root)
    results = run_all(mutants, args.root, args.jobs, args.timeout, args.baseline)
    line, ok = summary(results)
    report = f"{markdown(results)}\n\n{line}\n"
    print(report, end="")
    if args.out:
        args.out.write_text(report)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
