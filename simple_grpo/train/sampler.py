"""Overlapped generation (--overlap): a sampler process beside the reference server, on the
reference's device, generates and scores the next batch while the trainer trains this one.

    sampler = Sampler.start(cfg, ref_url, token, device, world_size)  # global rank 0
    sampler.publish(engine.module, version, step)  # at once (the sampler waits for it), then
                                              # after each step: a CPU snapshot, written behind
    sampler.alive()                           # False after a crash: the trainer generates again
    sampler.stop()                            # at exit (also atexit; the child dies with us)

The sampler is a generation worker (`--mode=generate`, simple_grpo/gen/worker.py) started with
the trainer's own config, posting to the trainer's reference server; two things differ from a
worker on another box:
  * weights come through a folder in shared memory (/dev/shm), not HTTP: after each step the
    trainer copies its weights to the CPU (the step waits only for that copy) and a background
    thread writes them as `weights-<version>.safetensors`, then `latest.json` naming it with the
    trainer step they belong to (written atomically, so a reader never sees a partial file; the
    files of the two newest versions are kept, and latest.json maps each recent step to its
    file). A step that left the weights as they were (its version unchanged: nothing trained)
    publishes only its step, in latest.json, pointing at the same file;
  * `--max_ahead=1`, counted in trainer steps, not weight versions (a step advances the version
    by --num_iterations, or not at all when it trained nothing): the sampler's n-th batch
    (n = 1, 2, ...; trainer_ranks batches per step) is sampled with the weights of trainer step
    first + ceil(n / trainer_ranks) - 2 (first: the step of the first weights published, the
    trainer's at start; `required_step`), waiting until that step is published and loading that
    step's file (`pick_weights`; a newer one only if it is gone, never an older one). So batch k+1
    is sampled with the weights of step k-1 while step k trains: never more than one step
    (--num_iterations versions) stale, corrected by the off-policy machinery (TIS on by default
    in this mode).
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

from simple_grpo.gen.shm_weights import LATEST
from simple_grpo.io import write_text_atomic
from simple_grpo.train.engine import standalone_env

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
        self.first: int | None = None  # the first step published
        self.steps: dict[int, tuple[int, str]] = {}  # recent step -> (version, file) while kept

    def publish(self, module: torch.nn.Module, version: int, step: int) -> None:
        """The weights of trainer `step` (at `version`): copy them to the CPU now, write them in
        the background (waiting first for the previous write: at most one in flight). When the
        version is the one last written (the step trained nothing), only latest.json changes."""
        from simple_grpo.common import lora
        from simple_grpo.train import publish

        self.wait()
        self.first = step if self.first is None else self.first
        if version == self.version:
            self.snapshot_seconds = 0.0
            try:
                self._record(step, version, f"weights-{version}.safetensors")
            except OSError as e:
                self.failure = f"{type(e).__name__}: {e}"
            return
        t = time.perf_counter()
        state, aliases = publish.cpu_snapshot(module, self.dtype)
        self.snapshot_seconds = time.perf_counter() - t
        metadata = {"aliases": json.dumps(aliases), **lora.publish_metadata(module)}
        self._thread = threading.Thread(target=self._write, args=(state, metadata, version, step),
                                        daemon=True, name="sampler-weights")
        self._thread.start()

    def _record(self, step: int, version: int, name: str) -> None:
        """latest.json: `step`'s weights are in file `name`; the recent steps whose file is kept."""
        self.steps[step] = (version, name)
        self.steps = {s: vn for s, vn in self.steps.items() if (self.folder / vn[1]).exists()}
        write_text_atomic(self.folder / LATEST, json.dumps({
            "version": version, "step": step, "file": name, "first": self.first,
            "steps": {str(s): list(vn) for s, vn in sorted(self.steps.items())}}))

    def _write(self, state, metadata, version: int, step: int) -> None:
        from simple_grpo.wire.weights import iter_state_dict_safetensors

        t = time.perf_counter()
        name = f"weights-{version}.safetensors"
        tmp = self.folder / f".{name}.tmp"
        try:
            with open(tmp, "wb") as f:
                for chunk in iter_state_dict_safetensors(state, None, metadata):
                    f.write(chunk)
            os.replace(tmp, self.folder / name)
            for old in self.folder.glob("weights-*.safetensors"):  # keep this one and the one before
                v = int(old.name.split("-")[1].split(".")[0])
                if v < (self.version if self.version is not None else version):
                    old.unlink(missing_ok=True)
            self._record(step, version, name)
            self.version = version
        except OSError as e:  # /dev/shm full: the sampler keeps its weights, the trainer is told
            self.failure = f"{type(e).__name__}: {e}"
            tmp.unlink(missing_ok=True)
        self.write_seconds = time.perf_counter() - t

    def wait(self) -> None:
        if self._thread is not None:
            self._thread.join()
            self._thread = None


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

    def publish(self, module: torch.nn.Module, version: int, step: int) -> None:
        if self.alive():
            self.weights.publish(module, version, step)

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
    there is a device for it beside the training ranks: a spare GPU, or a spare CPU core; never
    when --max_staleness would drop its one-step-stale batches (an error with --overlap=true)."""
    from simple_grpo.errors import UserError

    if cfg.overlap == "false" or cfg.mode != "train":
        return False
    if cfg.ref_url or not cfg.generate_locally:
        if cfg.overlap == "true":
            raise UserError("--overlap=true starts a sampler beside the trainer's own reference server: "
                            "drop --ref_url and --generate_locally=false (generation workers on other "
                            "boxes feed that server's queue instead)")
        return False
    if 0 <= cfg.max_staleness < cfg.num_iterations:  # its batches would all be dropped as stale
        if cfg.overlap == "true":
            raise UserError(f"--overlap=true trains each batch one step (--num_iterations="
                            f"{cfg.num_iterations} weight versions) stale, more than --max_staleness="
                            f"{cfg.max_staleness}: raise --max_staleness to {cfg.num_iterations} or -1")
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

    def publish(self, module: torch.nn.Module, version: int, step: int) -> None:
        """After a step (rank 0): the weights of `step` for the sampler, written behind (only
        the step, when the version is unchanged)."""
        if self.sampler is not None and self.running:
            self.sampler.publish(module, version, step)

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
    from simple_grpo.common.config import resolved_tis

    on = enabled(cfg, dist)
    return dataclasses.replace(cfg, overlap="true" if on else "false", tis=resolved_tis(cfg.tis, on))


def start_overlap(cfg, dist, ref, module: torch.nn.Module, version: int,
                  step: int = 0) -> Overlap | None:
    """With --overlap (finalized): global rank 0 starts the sampler on the reference's device
    (`ref`: rollout_source.RefTarget) and writes the current weights (of `step`) for it; every
    rank gets the Overlap view (the sampler's pid for ranks on its node). None without overlap."""
    from simple_grpo.train import collectives

    if cfg.overlap != "true":
        return None
    sampler, pid = None, 0
    if dist.rank == 0:
        device = ref.device or "cpu"
        sampler = Sampler.start(cfg, ref.url, ref.token, device, dist.world_size)
        sampler.publish(module, version, step)
        pid = sampler.proc.pid
        print(f"[trainer] overlap: a sampler on {device} samples each next batch while this one "
              f"trains (log: {sampler.log})", flush=True)
    pid = collectives.all_gather_objects(pid, dist.device)[0]
    return Overlap(sampler, dist, pid)
