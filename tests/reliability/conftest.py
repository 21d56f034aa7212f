"""Fixtures of the reliability tests."""
from __future__ import annotations

import shutil
import subprocess
import sys

import pytest


@pytest.fixture
def small_tmpfs(tmp_path):
    """A tmpfs mounted at tmp_path/checkpoints (64 MB; shrink it with remount); skips where
    mounting is not permitted (not root, no CAP_SYS_ADMIN, no mount binary)."""
    if sys.platform != "linux" or shutil.which("mount") is None:
        pytest.skip("needs Linux and mount(8)")
    mnt = tmp_path / "checkpoints"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(mnt)],
                       capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)
