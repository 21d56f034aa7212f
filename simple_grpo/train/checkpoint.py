"""Crash-safe training checkpoints through DeepSpeed, HF exports, and RNG state helpers.

Layout of `ckpt_root` (it is also a valid DeepSpeed checkpoint folder, so DeepSpeed's own
`zero_to_fp32.py`, which it copies there, works on it unchanged):

    ckpt_root/latest              text file naming the newest complete checkpoint, e.g. "step-000012"
    ckpt_root/step-000012/        mp_rank_00_model_states.pt (weights + client_state) and one
                                  zero_pp_rank_<r>_mp_rank_00_optim_states.pt per rank (ZeRO-2 shards)
    ckpt_root/.tmp-step-000014/   a save in progress (or left by a crash); never loaded

Atomicity: every rank writes into `.tmp-step-N`; only when all ranks succeeded does rank 0 fsync
the files, `os.replace` the folder to `step-N`, and then atomically replace `latest` (write a temp
file, fsync, `os.replace`). Old checkpoints beyond `keep_last` are deleted only after that. A crash or
a full disk at any point leaves `latest` naming the previous complete checkpoint.

Multi-rank: `save_checkpoint` and `load_latest` must be called on EVERY rank (DeepSpeed requires it:
each rank writes and reads its own ZeRO-2 optimizer shard), with `ckpt_root` on a filesystem all
ranks share. Only rank 0 renames, writes `latest` and deletes; barriers separate the phases and an
all-reduce makes all ranks agree whether the save succeeded (simple_grpo/train/collectives.py).
"""
from __future__ import annotations

import errno
import logging
import os
import random
import re
import resource
import shutil
import tempfile
import uuid
from pathlib import Path

import torch

from simple_grpo.errors import UserError
from simple_grpo.io import fsync_path, fsync_tree, write_text_atomic
from simple_grpo.train import collectives
from simple_grpo.common import lora

log = logging.getLogger("simple_grpo")

LATEST = "latest"
_CLIENT_KEY = "simple_grpo_client_state"  # nested so trainer keys never clobber DeepSpeed's own
_LORA_KEY = "simple_grpo_lora"  # the adapter's settings (lora.resume_settings), checked on resume
_STEP_RE = re.compile(r"^step-(\d+)$")
# torch.save reports a failed write (ENOSPC, EFBIG) as a RuntimeError from its zip writer, not OSError,
# and safetensors (the final export) as a SafetensorError wrapping the IoError
_WRITE_FAILURE_MARKERS = ("inline_container", "PytorchStreamWriter", "file write failed",
                          "No space left", "File too large", "Parent directory", "IoError")


def step_tag(step: int) -> str:
    """The folder name of the checkpoint of `step`."""
    return f"step-{step:06d}"


# ----------------------------------------------------------------------------- distributed helpers

def _dist_on() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def _rank() -> int:
    return torch.distributed.get_rank() if _dist_on() else 0


def _barrier() -> None:
    collectives.barrier(collectives.rank_device())


def _any_rank(flag: bool) -> bool:
    """True on every rank when `flag` is True on at least one rank."""
    return collectives.any_rank(flag, collectives.rank_device())


def is_write_failure(e: BaseException) -> bool:
    """An OSError, or torch's / safetensors' report of a failed file write."""
    if isinstance(e, OSError):
        return True
    wrapped = isinstance(e, RuntimeError) or type(e).__name__ == "SafetensorError"
    return wrapped and any(m in str(e) for m in _WRITE_FAILURE_MARKERS)


def describe_write_failure(e: BaseException, folder: Path) -> str:
    """One line: the error and its likely cause (torch and safetensors do not carry the errno)."""
    why = " ".join(f"{type(e).__name__}: {e}".split())
    code = e.errno if isinstance(e, OSError) else None  # None: torch / safetensors, errno unknown
    if isinstance(e, OSError) and code not in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        return why
    soft = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    if code in (None, errno.EFBIG) and soft != resource.RLIM_INFINITY:
        return f"{why} (this process may write files of at most {soft} bytes: ulimit -f)"
    try:
        free = f"{shutil.disk_usage(folder).free / 1e9:.2f} GB free"
    except OSError:
        free = "free space unknown"
    return f"{why} (disk full or quota reached? {free} in {folder})"


def _folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def _read_latest(ckpt_root: Path) -> str | None:
    p = Path(ckpt_root) / LATEST
    if not p.is_file():
        return None
    tag = p.read_text().strip()
    return tag or None


def list_checkpoints(ckpt_root: Path) -> list[tuple[int, Path]]:
    """Complete checkpoint folders as (step, path), oldest first; `.tmp-*` folders are skipped."""
    root = Path(ckpt_root)
    if not root.is_dir():
        return []
    out = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _STEP_RE.match(p.name))]
    return sorted(out)


def _estimate_bytes(engine, ckpt_root: Path) -> int:
    """Size of the newest checkpoint, else ~weights + fp32 master/Adam moments from the model."""
    prev = _read_latest(ckpt_root)
    if prev and (ckpt_root / prev).is_dir():
        return _folder_bytes(ckpt_root / prev)
    module = getattr(engine, "module", engine)
    return sum(p.numel() * (p.element_size() + 12) for p in module.parameters() if p.requires_grad)


def _check_disk(engine, ckpt_root: Path, min_free_gb: float) -> None:
    need = max(_estimate_bytes(engine, ckpt_root), int(min_free_gb * 1e9))
    free = shutil.disk_usage(ckpt_root).free
    if free < need:
        log.warning("low disk space for checkpoint in %s: %.2f GB free, about %.2f GB needed; "
                    "the save may fail (free space or lower keep_last)", ckpt_root, free / 1e9,
                    need / 1e9)


def _remove_stale_tmp(ckpt_root: Path) -> None:
    for p in ckpt_root.glob(".tmp-*"):
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)


# ----------------------------------------------------------------------------- save / load

def save_checkpoint(engine, ckpt_root: Path, step: int, client_state: dict, *, keep_last: int = 2,
                    min_free_gb: float = 1.0, on_error: str = "warn") -> Path | None:
    """Save weights, optimizer (+ scheduler) and `client_state` as `ckpt_root/step-<step>`.

    Call on every rank. `client_state` is what the trainer needs to resume exactly (step, RNG states
    from `rng_state()`, data position, weight version, config); `load_latest` returns it. Keeps the
    `keep_last` newest checkpoints (0 keeps all). On a write failure (full disk, quota, I/O error)
    the partial folder is removed and `latest` is untouched; then `on_error="warn"` logs and returns
    None so training continues, `on_error="stop"` raises UserError. Returns the checkpoint folder.
    """
    assert on_error in ("warn", "stop"), f"on_error must be 'warn' or 'stop', got {on_error!r}"
    assert keep_last >= 0, f"keep_last must be >= 0 (0 keeps all), got {keep_last}"
    assert step >= 0, f"step must be >= 0, got {step}"
    ckpt_root = Path(ckpt_root)
    tag = step_tag(step)
    tmp_tag, final = f".tmp-{tag}", ckpt_root / tag
    rank0 = _rank() == 0

    # phase 1 (rank 0): prepare the root, clear leftovers of crashed saves, check the free space
    prep_error: BaseException | None = None
    if rank0:
        try:
            ckpt_root.mkdir(parents=True, exist_ok=True)
            _remove_stale_tmp(ckpt_root)
            _check_disk(engine, ckpt_root, min_free_gb)
        except OSError as e:
            prep_error = e
    if _any_rank(prep_error is not None):
        return _failed(ckpt_root, tmp_tag, step, prep_error, on_error, rank0)

    # phase 2 (all ranks): DeepSpeed writes this rank's files into the temp tag folder
    error: BaseException | None = None
    try:
        saved = {_CLIENT_KEY: client_state, _LORA_KEY: lora.resume_settings(engine.module)}
        engine.save_checkpoint(str(ckpt_root), tag=tmp_tag, client_state=saved, save_latest=False,
                               **lora.checkpoint_save_kwargs(engine))
    except (OSError, RuntimeError) as e:
        if not is_write_failure(e):
            raise
        error = e
        # DeepSpeed's file writes sit between its tag-validation all-reduce and its closing barrier
        # (torch.distributed.barrier), so a rank that failed here skipped exactly that barrier:
        # take the same one to stay in step (an all-reduce would not match it, and both would hang).
        collectives.deepspeed_barrier()
    if _any_rank(error is not None):
        return _failed(ckpt_root, tmp_tag, step, error, on_error, rank0)

    # phase 3 (rank 0): make the new checkpoint durable and visible, then point `latest` at it
    commit_error: BaseException | None = None
    if rank0:
        try:
            fsync_tree(ckpt_root / tmp_tag)
            trash = None
            if final.exists():  # same step saved again, or a folder from a crash before `latest`
                trash = ckpt_root / f".tmp-old-{tag}"
                os.replace(final, trash)
            try:
                os.replace(ckpt_root / tmp_tag, final)
            except OSError:
                if trash is not None and not final.exists():
                    os.replace(trash, final)  # put the old folder back: `latest` may name it
                raise
            fsync_path(ckpt_root)
            write_text_atomic(ckpt_root / LATEST, tag)
            if trash is not None:
                shutil.rmtree(trash, ignore_errors=True)
        except OSError as e:
            commit_error = e
    if _any_rank(commit_error is not None):
        return _failed(ckpt_root, tmp_tag, step, commit_error, on_error, rank0)

    # phase 4 (rank 0): only now delete the older checkpoints
    if rank0 and keep_last > 0:
        older = [p for s, p in list_checkpoints(ckpt_root) if s < step]
        for p in older[:max(len(older) - (keep_last - 1), 0)]:
            shutil.rmtree(p, ignore_errors=True)
            log.info("deleted old checkpoint %s (keep_last=%d)", p, keep_last)
    _barrier()
    log.info("saved checkpoint %s", final)
    return final


def _failed(ckpt_root: Path, tmp_tag: str, step: int, error: BaseException | None, on_error: str,
            rank0: bool) -> None:
    """Clean up after a failed save on all ranks, then warn (rank 0) or raise UserError (every
    rank, the same line): either names the first failed rank's error."""
    if rank0:
        shutil.rmtree(ckpt_root / tmp_tag, ignore_errors=True)
    mine = describe_write_failure(error, ckpt_root) if error is not None else None
    gathered = collectives.all_gather_objects(mine, collectives.rank_device())  # also a barrier
    why = next((w for w in gathered if w), "a write failed")
    latest = _read_latest(ckpt_root)
    msg = (f"checkpoint of step {step} in {ckpt_root} failed ({why}); the partial files were removed "
           f"and the previous checkpoint {latest or '(none)'} is still the latest")
    if on_error == "stop":
        raise UserError(msg)  # the trainer prints it as its one error line
    if rank0:
        log.warning(msg + "; training continues (--on_save_error=stop ends the run instead)")
    return None


def latest_checkpoint(ckpt_root: Path) -> Path | None:
    """The complete checkpoint folder that `ckpt_root/latest` names, if any."""
    tag = _read_latest(Path(ckpt_root))
    return Path(ckpt_root) / tag if tag and (Path(ckpt_root) / tag).is_dir() else None


def load_latest(engine, ckpt_root: Path) -> dict | None:
    """Load the checkpoint that `ckpt_root/latest` names into `engine` (weights, optimizer and
    scheduler) and return its client_state; None when there is no checkpoint yet. Call on every
    rank. Leftover `.tmp-*` folders from crashed saves are never loaded."""
    ckpt_root = Path(ckpt_root)
    tag = _read_latest(ckpt_root)
    if tag is None:
        return None
    folder = ckpt_root / tag
    if not folder.is_dir():
        found = ", ".join(p.name for _, p in list_checkpoints(ckpt_root)) or "none"
        if (ckpt_root / f".tmp-old-{tag}").is_dir():  # crash while re-saving the same step
            found += f"; or rename {ckpt_root / f'.tmp-old-{tag}'} to {folder}"
        raise UserError(f"{ckpt_root / LATEST} names {tag!r} but {folder} does not exist "
                        f"(complete checkpoints there: {found}); write one of them into "
                        f"{ckpt_root / LATEST} or start without resuming")
    path, client = engine.load_checkpoint(str(ckpt_root), tag=tag, custom_load_fn=lora.load_module)
    if path is None:
        raise UserError(f"DeepSpeed could not load checkpoint {folder} (see its log above); "
                        "it may be incomplete or from a different model/ZeRO setup")
    lora.check_resume((client or {}).get(_LORA_KEY), engine.module)
    log.info("resumed from checkpoint %s", folder)
    return dict((client or {}).get(_CLIENT_KEY, {}))


RESUME_MODES = ("false", "true", "auto")


def require_checkpoint(ckpt_root: Path) -> None:
    """--resume=true needs a checkpoint: one UserError line when `ckpt_root` names none (one it
    names but lacks is load_latest's own line)."""
    if _read_latest(Path(ckpt_root)) is None:
        raise UserError(f"--resume=true: no checkpoint in {ckpt_root} (--resume=auto starts fresh "
                        f"when there is none)")


def resume(engine, ckpt_root: Path, mode: str, stream, rank: int) -> dict:
    """Where the run starts -> {"step", "weight_version", "run_id", "empty_steps", "overlap" (the
    overlap sampler's held batches and position: sampler.hold_next_batch)}. Call on every rank.

    mode "false": a fresh run (step 0), whatever `ckpt_root` holds. "true": the latest checkpoint,
    a UserError when there is none. "auto": the latest checkpoint when there is one, else fresh
    (what a launcher's automatic restart needs). Resuming loads the checkpoint into `engine`
    (weights, optimizer, scheduler) and restores this rank's data position (`stream`) and RNG
    states, so the run continues as if it had never stopped. `run_id` names the run for the
    reference server (a new one drops an earlier run's queue and weights): new when fresh, the
    checkpoint's when resumed; rank 0's is the one used and saved."""
    assert mode in RESUME_MODES, f"resume must be one of {RESUME_MODES}, got {mode!r}"
    client = None if mode == "false" else load_latest(engine, ckpt_root)
    if client is None and mode == "true":
        require_checkpoint(ckpt_root)
    if client is None:
        return {"step": 0, "weight_version": 0, "run_id": uuid.uuid4().hex, "empty_steps": 0, "overlap": None}
    stream.load_state_dict(client["stream"][rank])
    set_rng_state(client["rng"][rank])
    if rank == 0:
        print(f"[trainer] resumed from {latest_checkpoint(ckpt_root)} at step {client['step']} "
              f"(data epoch {client['stream'][0]['epoch']}, position {client['stream'][0]['position']})",
              flush=True)
    return {"step": client["step"], "weight_version": client["weight_version"],
            "run_id": client.get("run_id") or uuid.uuid4().hex, "empty_steps": client.get("empty_steps", 0),
            "overlap": client.get("overlap")}


# ----------------------------------------------------------------------------- HF export

def export_pretrained(model, tokenizer, out_dir: Path, save=None) -> Path:
    """Write the (unwrapped) model as safetensors + the tokenizer into `out_dir`, atomically, so
    `AutoModelForCausalLM.from_pretrained(out_dir)` loads it (`save(folder)`, when given, writes
    the model instead: LoRA's merged export). With ZeRO-2 every rank holds the full weights: any
    rank may call this, only rank 0 writes (no collective, no barrier)."""
    out_dir = Path(out_dir)
    if _rank() != 0:
        return out_dir
    module = getattr(model, "module", model)  # a DeepSpeed engine wraps the HF model as .module
    assert hasattr(module, "save_pretrained"), f"{type(module).__name__} has no save_pretrained"
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    for stale in out_dir.parent.glob(f".tmp-*{out_dir.name}-*"):  # left by a killed export
        if stale.is_dir():
            shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".tmp-{out_dir.name}-"))
    try:
        (save or module.save_pretrained)(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        fsync_tree(tmp)
        trash = None
        if out_dir.exists():
            trash = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".tmp-old-{out_dir.name}-"))
            os.replace(out_dir, trash / out_dir.name)
        os.replace(tmp, out_dir)
        fsync_path(out_dir.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if trash is not None:
        shutil.rmtree(trash, ignore_errors=True)
    log.info("exported model to %s", out_dir)
    return out_dir


# ----------------------------------------------------------------------------- RNG state

def rng_state() -> dict:
    """Python, numpy, torch CPU (and CUDA) generator states as JSON-able lists and numbers."""
    version, internal, gauss = random.getstate()
    state: dict = {"python": [version, list(internal), gauss],
                   "torch": torch.get_rng_state().tolist()}
    try:
        import numpy as np
    except ImportError:
        np = None
    if np is not None:
        name, key, pos, has_gauss, cached = np.random.get_state()
        state["numpy"] = {"bit_generator": name, "key": key.tolist(), "pos": int(pos),
                          "has_gauss": int(has_gauss), "cached_gaussian": float(cached)}
    if torch.cuda.is_available():
        state["cuda"] = [s.tolist() for s in torch.cuda.get_rng_state_all()]
    return state


def _byte_tensor(x) -> torch.Tensor:
    return x.to(torch.uint8).cpu() if isinstance(x, torch.Tensor) else torch.tensor(x, dtype=torch.uint8)


def set_rng_state(d: dict) -> None:
    """Restore generator states from `rng_state()` (also after a JSON round trip)."""
    assert isinstance(d, dict) and "torch" in d, f"not an rng_state() dict: {type(d).__name__}"
    version, internal, gauss = d["python"]
    random.setstate((version, tuple(internal), gauss))
    torch.set_rng_state(_byte_tensor(d["torch"]))
    if "numpy" in d:
        import numpy as np

        n = d["numpy"]
        np.random.set_state((n["bit_generator"], np.asarray(n["key"], dtype=np.uint32), n["pos"],
                             n["has_gauss"], n["cached_gaussian"]))
    if "cuda" in d and torch.cuda.is_available():
        saved, have = d["cuda"], torch.cuda.device_count()
        if len(saved) != have:
            log.warning("checkpoint has CUDA RNG states for %d devices, this machine has %d; "
                        "restoring the first %d", len(saved), have, min(len(saved), have))
        for i, s in enumerate(saved[:have]):
            torch.cuda.set_rng_state(_byte_tensor(s), device=i)
