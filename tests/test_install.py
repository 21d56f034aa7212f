"""The GPU install line keeps the user's torch: with a CUDA torch installed (a stand-in
distribution `torch 2.11.0+cu130` found first on the path), pip's own resolver installs nothing
for requirements-core.txt, while the CPU line (requirements.txt, torch pinned to the CPU wheel)
would replace it. Offline: `pip install --dry-run --no-index`."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def dry_run(requirements: str, site: Path, report: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(site), "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    return subprocess.run([sys.executable, "-m", "pip", "install", "--dry-run", "--no-index", "--report",
                           str(report), "-r", requirements], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)


@pytest.fixture
def cuda_torch_installed(tmp_path) -> Path:
    dist = tmp_path / "site" / "torch-2.11.0+cu130.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: torch\nVersion: 2.11.0+cu130\n")
    return dist.parent


def test_gpu_line_keeps_an_installed_cuda_torch(cuda_torch_installed, tmp_path):
    r = dry_run("requirements-core.txt", cuda_torch_installed, tmp_path / "core.json")
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    assert "(2.11.0+cu130)" in r.stdout, "pip saw the installed CUDA torch as satisfying"
    install = [item["metadata"]["name"] for item in json.loads((tmp_path / "core.json").read_text())["install"]]
    assert "torch" not in install, install


def test_cpu_line_pins_the_cpu_wheel(cuda_torch_installed, tmp_path):
    """The control: requirements.txt asks for torch==2.13.0, so it would replace that torch."""
    r = dry_run("requirements.txt", cuda_torch_installed, tmp_path / "cpu.json")
    if r.returncode == 0:
        install = json.loads((tmp_path / "cpu.json").read_text())["install"]
        assert [i["metadata"]["version"].split("+")[0] for i in install
                if i["metadata"]["name"] == "torch"] == ["2.13.0"], install
    else:  # no torch 2.13.0 wheel reachable offline: pip still shows it wanted one
        assert "torch==2.13.0" in r.stderr, r.stderr[-2000:]


def test_cpu_line_names_the_torch_pin_before_the_core_file():
    """pip starts a package from the first line that names it: with requirements-core.txt's
    `torch>=2.11` first it fetched the newest torch (a 554 MB wheel) and then backtracked to the
    pin (measured with `pip install --dry-run -r requirements.txt`: torch-2.14.1 processed, then
    2.13.0+cpu; with the pin first, 2.13.0+cpu alone)."""
    lines = [x.split("#")[0].strip() for x in (ROOT / "requirements.txt").read_text().splitlines()]
    lines = [x for x in lines if x]
    assert lines.index("torch==2.13.0") < lines.index("-r requirements-core.txt"), lines
