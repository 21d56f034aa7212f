"""Shared fixtures: a tiny HF model folder built from a config, and reference servers on free
loopback ports that stop themselves at the end of the test."""
from __future__ import annotations

import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from simple_grpo.train.engine import free_port  # noqa: F401  (re-exported for the tests)

torch.set_num_threads(1)  # the test machine is small and shared


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A random tiny Llama + byte-level tokenizer saved as a normal HF folder (no downloads)."""
    from simple_grpo.models import save_tiny_model

    return save_tiny_model(tmp_path_factory.mktemp("models") / "tiny")


@pytest.fixture(scope="session")
def tiny_model(tiny_model_dir):
    """The tiny model loaded once per session, fp32 on CPU, in eval mode."""
    from simple_grpo.models import load_model

    return load_model(str(tiny_model_dir), "float32", "cpu").eval()


@dataclass
class RefServerHandle:
    url: str
    state: object  # simple_grpo.server.app.ServerState
    running: object  # simple_grpo.server.wsgi.RunningServer

    def close(self) -> None:
        self.running.close()


@pytest.fixture
def ref_server(tiny_model_dir, tiny_model):
    """Factory: `ref_server(**ServerConfig overrides) -> RefServerHandle` serving the tiny model
    in-process on a free 127.0.0.1 port; every server started is closed after the test."""
    from simple_grpo.server.app import ServerConfig, ServerState, start

    handles: list[RefServerHandle] = []

    def make(**overrides) -> RefServerHandle:
        cfg = ServerConfig(**{"model": str(tiny_model_dir), "port": 0, **overrides})
        state = ServerState(cfg, tiny_model)
        running = start(state)
        handles.append(RefServerHandle(running.url, state, running))
        return handles[-1]

    yield make
    for h in handles:
        h.close()


@pytest.fixture(scope="module")
def dist_env():
    """Single-process 'distributed' env for DeepSpeed; restores the environment afterwards."""
    import os

    keys = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
    saved = {k: os.environ.get(k) for k in keys}
    for k, v in dict(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1").items():
        os.environ.setdefault(k, v)  # DeepSpeed reads LOCAL_RANK even when the group exists
    if not torch.distributed.is_initialized():
        os.environ["MASTER_PORT"] = str(free_port())
    yield
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


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


def file_version_digest(data: bytes) -> str:
    """A weights file's version digest by its definition (simple_grpo/wire/delta.py), from the
    file's bytes alone: xxh3-128 of the header (with its length), then of each tensor's own
    xxh3-128 digest, in file order. The tests' independent check of the code's digests."""
    import json
    import struct

    import xxhash

    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    h = xxhash.xxh3_128(data[:8 + n])
    for a, b in sorted(v["data_offsets"] for k, v in header.items() if k != "__metadata__"):
        h.update(xxhash.xxh3_128(data[8 + n + a:8 + n + b]).digest())
    return h.hexdigest()
