"""Crash-safe file writes shared by every process: a reader sees the old content or the new, never
a mix, and a crash leaves at most a `.tmp-*` file beside the target (its owner removes those)."""
from __future__ import annotations

import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Iterator


def fsync_path(path: Path) -> None:
    """fsync a file or a directory (directories: best effort, some filesystems refuse)."""
    flags = os.O_RDONLY | (os.O_DIRECTORY if path.is_dir() else 0)
    try:
        fd = os.open(path, flags)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # e.g. EINVAL for directories on some network filesystems
    finally:
        os.close(fd)


def fsync_tree(folder: Path) -> None:
    """fsync every file under `folder`, then the folder itself."""
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            fsync_path(p)
    fsync_path(folder)


@contextmanager
def atomic_open(path: Path, mode: str = "w", *, durable: bool = True) -> Iterator[IO]:
    """Write into a temp file beside `path`; when the block ends without an error it replaces
    `path` (os.replace), else it is removed. `durable`: fsync the file and the folder, so the new
    content survives a power loss too (logs and plots that are rewritten often can skip it)."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".tmp-{path.stem}-", suffix=path.suffix)
    try:
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            if durable:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    if durable:
        fsync_path(path.parent)


def write_text_atomic(path: Path, text: str) -> None:
    """Replace `path`'s content by `text` atomically and durably (atomic_open)."""
    with atomic_open(path) as f:
        f.write(text)
