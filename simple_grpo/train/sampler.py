"""Overlapped generation (--overlap): a sampler process beside the reference server, on the
reference's device, generates and scores the next batch while the trainer trains this one.

    sampler = Sampler.start(cfg, ref_url, token, device, world_size)  # global rank 0
    sampler.publish(engine.module, version)   # at once (the sampler waits for it), then after
                                              # each step: a CPU snapshot, written behind
    sampler.alive()                           # False after a crash: the trainer generates again
    sampler.stop()                            # at exit (also atexit; the child dies with us)

The sampler is a generation worker (`--mode=generate`, simple_grpo/train/worker.py) started with
the trainer's own config, posting to the trainer's reference server; two things differ from a
worker on another box:
  * weights come through a folder in shared memory (/dev/shm), not HTTP: after each step the
    trainer copies its weights to the CPU (the step waits only for that copy) and a background
    thread writes them as `weights-<version>.safetensors`, then `latest.json` naming it (written
    atomically, so a reader never sees a partial file; the two newest files are kept);
  * `--max_ahead=1`: the sampler's n-th batch (n = 1, 2, ...; trainer_ranks batches per step)
    waits for weight version >= first + ceil(n / trainer_ranks) - 2 (first: the version of the
    first weights it reads, the trainer's at start), so batch k+1 is sampled with the weights of
    step k-1 while step k trains: never more than one step stale, corrected by
    the off-policy machinery (TIS on by default in this mode).
"""
from __future__ import annotations

import atexit
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

from simple_grpo.io import write_text_atomic
from simple_grpo.train.engine import standalone_env

LATEST = "latest.json"
ROOT = Path(__file__).resolve().parents[2]


def shm_folder(prefix: str = "simple_grpo-sampler-") -> Path:
    """A fresh folder in shared memory (/dev/shm on Linux), else in the temp folder."""
    base = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None
    return Path(tempfile.mkdtemp(prefix=prefix, dir=base))


class LocalWeights:
    """The writer side of the shared-memory weights folder (module docstring)."""

    def __init__(self, folder: Path, dtype: torch.dtype | None = None):
        self.folder, self.dtype = Path(folder), dtype
        self.snapshot_seconds, self.write_seconds, self.version = 0.0, 0.0, None
        self._thread: threading.Thread | None = None
        self.failure: str | None = None

    def publish(self, module: torch.nn.Module, version: int) -> None:
        """Copy the weights to the CPU now, write them in the background (waiting first for the
        previous write: at most one in flight)."""
        from simple_grpo.train import lora, publish

        self.wait()
        t = time.perf_counter()
        state, aliases = publish.cpu_snapshot(module, self.dtype)
        self.snapshot_seconds = time.perf_counter() - t
        metadata = {"aliases": json.dumps(aliases), **lora.publish_metadata(module)}
        self._thread = threading.Thread(target=self._write, args=(state, metadata, version), daemon=True,
                                        name="sampler-weights")
        self._thread.start()

    def _write(self, state, metadata, version: int) -> None:
        from simple_grpo.wire.weights import iter_state_dict_safetensors

        t = time.perf_counter()
        name = f"weights-{version}.safetensors"
        tmp = self.folder / f".{name}.tmp"
        try:
            with open(tmp, "wb") as f:
                for chunk in iter_state_dict_safetensors(state, None, metadata):
                    f.write(chunk)
            os.replace(tmp, self.folder / name)
            write_text_atomic(self.folder / LATEST, json.dumps({"version": version, "file": name}))
            for old in self.folder.glob("weights-*.safetensors"):  # keep this one and the one before
                v = int(old.name.split("-")[1].split(".")[0])
                if v < (self.version if self.version is not None else version):
                    old.unlink(missing_ok=True)
            self.version = version
        except OSError as e:  # /dev/shm full: the sampler keeps its weights, the trainer is told
            self.failure = f"{type(e).__name__}: {e}"
            tmp.unlink(missing_ok=True)
        self.write_seconds = time.perf_counter() - t

    def wait(self) -> None:
        if self._thread is not None:
            self._thread.join()
            self._thread = None


def read_latest(folder: str | Path) -> tuple[int, Path] | None:
    """The reader side: (version, file) of the newest complete weights, or None yet."""
    try:
        info = json.loads((Path(folder) / LATEST).read_text())
    except (OSError, ValueError):
        return None
    return int(info["version"]), Path(folder) / info["file"]


def required_version(first: int, n: int, ranks: int, ahead: int) -> int:
    """The weight version the n-th batch (1-based) must be sampled with: batch n belongs to step
    ceil(n / ranks) of the sampler's run, which may be at most `ahead` steps ahead of the weights."""
    step = -(-n // ranks)
    return first + max(step - 1 - ahead, 0)


class Sampler:
    """The sampler child process and its weights folder (module docstring)."""

    def __init__(self, proc: subprocess.Popen, weights: LocalWeights, folder: Path, log: Path):
        self.proc, self.weights, self.folder, self.log = proc, weights, folder, log
        self.warned = False
        atexit.register(self.stop)

    @classmethod
    def start(cls, cfg, ref_url: str, token: str | None, device: str, world_size: int,
              dtype: torch.dtype | None = None) -> "Sampler":
        """Start the sampler on `device`; it generates once the first `publish` has landed."""
        from simple_grpo.train.ref_process import _die_with_parent

        folder = shm_folder()
        (folder / "config.json").write_text(json.dumps(dataclasses.asdict(cfg)))
        args = [sys.executable, str(ROOT / "grpo_ref_split.py"), f"--config={folder / 'config.json'}",
                "--mode=generate", f"--ref_url={ref_url}", f"--weights_dir={folder}", "--max_ahead=1",
                f"--trainer_ranks={world_size}", f"--device={device}", "--worker_index=0",
                "--worker_batches=0", "--overlap=false"]
        env = standalone_env(OMP_NUM_THREADS="1", **({"GRPO_REF_TOKEN": token} if token else {}))
        log = folder / "sampler.log"
        proc = subprocess.Popen(args, env=env, stdin=subprocess.DEVNULL, stdout=open(log, "w"),
                                stderr=subprocess.STDOUT, cwd=ROOT, preexec_fn=_die_with_parent)
        return cls(proc, LocalWeights(folder, dtype), folder, log)

    def publish(self, module: torch.nn.Module, version: int) -> None:
        if self.alive():
            self.weights.publish(module, version)

    def alive(self) -> bool:
        return self.proc.poll() is None and self.weights.failure is None

    def why_dead(self) -> str:
        """One line: how the sampler ended, with the end of its log."""
        if self.weights.failure:
            return f"its weights could not be written ({self.weights.failure})"
        tail = self.log.read_text(errors="replace").strip().splitlines()[-1:] if self.log.exists() else []
        return f"exit code {self.proc.returncode}" + (f": {tail[0][:200]}" if tail else "")

    def metrics(self) -> dict[str, float]:
        return {"sampler_snapshot_seconds": self.weights.snapshot_seconds,
                "sampler_write_seconds": self.weights.write_seconds}

    def stop(self, timeout: float = 10.0) -> None:
        from simple_grpo.train.ref_process import stop_process

        stop_process(self.proc, timeout)
        self.weights.wait()
        shutil.rmtree(self.folder, ignore_errors=True)


def enabled(cfg, dist) -> bool:
    """Whether this run overlaps generation with training (--overlap). auto: when the trainer
    starts its own reference server (beta > 0 without LoRA, no --ref_url, generating itself) and
    there is a device for it beside the training ranks: a spare GPU, or a spare CPU core."""
    from simple_grpo.errors import UserError

    if cfg.overlap == "false" or cfg.mode != "train":
        return False
    if cfg.ref_url or not cfg.generate_locally:
        if cfg.overlap == "true":
            raise UserError("--overlap=true starts a sampler beside the trainer's own reference server: "
                            "drop --ref_url and --generate_locally=false (generation workers on other "
                            "boxes feed that server's queue instead)")
        return False
    if cfg.overlap == "true":
        return True
    if cfg.beta == 0 or cfg.lora_r > 0 or cfg.ref_device != "auto":
        return False
    gpus = torch.cuda.device_count() if dist.device.type == "cuda" else 0
    room = gpus if gpus else (os.cpu_count() or 1)
    return room > dist.local_world_size


class Overlap:
    """Every rank's view of the sampler (which runs beside global rank 0)."""

    def __init__(self, sampler: Sampler | None, dist, pid: int):
        self.sampler, self.dist, self.pid, self.running = sampler, dist, pid, True
        self.one_node = dist.world_size == dist.local_world_size  # the pid is visible to every rank

    def begin_step(self, step: int) -> bool:
        """Whether the sampler still feeds this step (rank 0 decides; one collective a step).
        The step it is found dead, rank 0 prints one line, and every rank generates again."""
        from simple_grpo.train import collectives

        alive = float(self.sampler is not None and self.sampler.alive())
        if self.dist.world_size > 1:
            alive = float(collectives.all_reduce([alive], self.dist.device, op="max")[0])
        if self.running and not alive and self.sampler is not None:
            print(f"[trainer] the overlap sampler stopped ({self.sampler.why_dead()}); generating "
                  f"batches in the trainer from step {step} on", file=sys.stderr, flush=True)
        self.running = bool(alive)
        return self.running

    def publish(self, module: torch.nn.Module, version: int) -> None:
        """After a step (rank 0): the new weights for the sampler, written behind."""
        if self.sampler is not None and self.running:
            self.sampler.publish(module, version)

    def metrics(self) -> dict[str, float]:
        return self.sampler.metrics() if self.sampler is not None else {}

    def stop(self) -> None:
        if self.sampler is not None:
            self.sampler.stop()

    def stopped(self) -> bool:
        """Polled while a rank waits for the sampler's batch: its process is gone (ranks on
        other nodes than rank 0 cannot see it and wait up to --ref_timeout)."""
        if self.sampler is not None:
            return not self.sampler.alive()
        if not self.one_node:
            return False
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            return False
        return False


def finalize(cfg, dist):
    """The config with --overlap decided (`enabled`) and --tis=auto resolved (token with overlap)."""
    from simple_grpo.train.config import resolved_tis

    on = enabled(cfg, dist)
    return dataclasses.replace(cfg, overlap="true" if on else "false", tis=resolved_tis(cfg.tis, on))


def start_overlap(cfg, dist, ref, module: torch.nn.Module, version: int) -> Overlap | None:
    """With --overlap (finalized): global rank 0 starts the sampler on the reference's device
    (`ref`: rollout_source.RefTarget) and writes the current weights for it; every rank gets
    the Overlap view (the sampler's pid for ranks on its node). None without overlap."""
    from simple_grpo.train import collectives

    if cfg.overlap != "true":
        return None
    sampler, pid = None, 0
    if dist.rank == 0:
        device = ref.device or "cpu"
        sampler = Sampler.start(cfg, ref.url, ref.token, device, dist.world_size)
        sampler.publish(module, version)
        pid = sampler.proc.pid
        print(f"[trainer] overlap: a sampler on {device} samples each next batch while this one "
              f"trains (log: {sampler.log})", flush=True)
    pid = collectives.all_gather_objects(pid, dist.device)[0]
    return Overlap(sampler, dist, pid)
