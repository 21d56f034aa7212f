"""One run per folder (simple_grpo/train/loop.py `claim_run_dir`): a new run into a folder that
holds another run's files stops with one line before anything loads, --overwrite removes them
first (and nothing else in the folder), --resume continues the run that is there."""
from __future__ import annotations

import pytest

from simple_grpo.errors import UserError
from simple_grpo.train.loop import claim_run_dir


@pytest.mark.parametrize("files, resume, overwrite, want", [
    ([], "false", False, "ok"),                                       # an empty folder: a fresh run
    (["notes.txt"], "false", False, "ok"),                            # the user's own file is no run
    (["checkpoints/"], "false", False, "ok"),                         # an empty folder (a mount point)
    (["metrics.jsonl"], "false", False, "error"),                     # a previous run's logs
    (["checkpoints/step-2/x"], "false", False, "error"),              # ... or its checkpoints
    (["final/model.safetensors"], "false", False, "error"),           # ... or its final model
    (["metrics.jsonl", "checkpoints/step-2/x"], "true", False, "ok"),  # --resume continues it
    (["metrics.jsonl"], "auto", False, "ok"),                         # a launcher's restart
    (["metrics.jsonl", "plots.png", "checkpoints/step-2/x", "notes.txt"], "false", True, "removed"),
])
def test_one_run_per_folder(files, resume, overwrite, want, tmp_path):
    for name in files:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        if name.endswith("/"):
            (tmp_path / name).mkdir()
        else:
            (tmp_path / name).write_text("x")
    if want == "error":
        with pytest.raises(UserError, match="holds another run .*--resume=true.*--overwrite"):
            claim_run_dir(tmp_path, resume, overwrite, rank=0)
        assert all((tmp_path / n).exists() for n in files), "nothing removed"
        return
    claim_run_dir(tmp_path, resume, overwrite, rank=0)
    if want == "removed":
        assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"], "only the run's files go"
    else:
        assert all((tmp_path / n).exists() for n in files)


def test_only_rank_0_removes(tmp_path):
    (tmp_path / "metrics.jsonl").write_text("x")
    claim_run_dir(tmp_path, "false", True, rank=1)
    assert (tmp_path / "metrics.jsonl").exists()
