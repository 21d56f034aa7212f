"""Overlapped generation (--overlap): a sampler process beside the reference server, on the
reference's device, generates and scores the next batch while the trainer trains this one.

    sampler = Sampler.start(cfg, ref_url, token, device, world_size, trainer_device, run_dir)
    sampler.publish(engine.module, version, step)  # at once, then after each step but the last
    sampler.alive()                           # False after a crash: the trainer generates again
    sampler.stop()                            # at exit (also atexit; the child dies with us)

The sampler is a generation worker (`--mode=generate`, simple_grpo/gen/worker.py) started with
the trainer's own config (`run_dir/sampler-config.json`, its log `run_dir/sampler.log`), posting
to the trainer's reference server; two things differ from a worker on another box:
  * weights come straight from the trainer's rank 0 through a torch.distributed group of the two
    of them (simple_grpo/wire/handoff.py: NCCL between two GPUs, else gloo), not HTTP and no
    file: after each step rank 0 sends that step's weights in buckets into the sampler's model.
    The sampler receives every step's publish in order, so the send waits until it has finished
    the batch it is sampling (the trainer would wait for that batch next anyway) and then takes
    the transfer's time; a step that left the weights as they were sends only its step number;
  * `--max_ahead=1` (the trainer's --max_ahead; 0: no overlap, below), counted in trainer
    steps, not weight versions (a step advances the version
    by --num_iterations, or not at all when it trained nothing): the sampler's n-th batch
    (n = 1, 2, ...; trainer_ranks batches per step) is sampled with the weights of trainer step
    first + ceil(n / trainer_ranks) - 2 (first: the step of the first weights published, the
    trainer's at start; `handoff.required_step`): exactly those, never newer ones, whatever the
    timing. So batch k+1 is sampled with the weights of step k-1 while step k trains: one step
    (--num_iterations versions) stale, corrected by the off-policy machinery (TIS on by default
    in this mode). The last step publishes nothing (no batch after it is trained).
  * its prompts are the trainer ranks' own (their streams, `data.RankStreams`: batch part r holds
    what rank r would have drawn) and every batch's sampling is seeded by where those streams
    stand (`rollout.make_rollout`), as the trainer's own batches are; its batches count as the
    trainer's (producer "trainer-sampler": the weights are the trainer's, bit for bit). So with
    `--max_ahead=0` (each batch sampled with the current weights: no overlap gain) and one rank,
    a run is bitwise the synchronous one (tests/test_overlap.py).
"""
from __future__ import annotations

import atexit
import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from simple_grpo.common import lora
from simple_grpo.common.config import overlap_ahead
from simple_grpo.train import publish
from simple_grpo.train.engine import standalone_env
from simple_grpo.wire import handoff

ROOT = Path(__file__).resolve().parents[2]


class Sampler:
    """The sampler child process and the trainer's end of its weights handoff (module docstring)."""

    def __init__(self, proc: subprocess.Popen, sender: handoff.Sender, log: Path):
        self.proc, self.sender, self.log = proc, sender, log
        self.failure: str | None = None  # why the handoff ended (the sampler is then stopped)
        self.wait_seconds, self.send_seconds = 0.0, 0.0
        self.position: dict | None = None  # its prompt stream and RNG at the last handoff
        atexit.register(self.stop)

    @classmethod
    def start(cls, cfg, ref_url: str, token: str | None, device: str, world_size: int,
              trainer_device: str | torch.device, run_dir: Path, position: dict | None = None) -> "Sampler":
        """Start the sampler on `device`; it generates once the first `publish` has landed.
        `position`: a resumed run's (`hold_next_batch`): it continues from there."""
        from simple_grpo.train.ref_process import _die_with_parent

        sender = handoff.Sender.listen(handoff.backend_for(trainer_device, device), trainer_device,
                                       timeout_s=cfg.dist_timeout * 60)
        run_dir.mkdir(parents=True, exist_ok=True)
        config, log = run_dir / "sampler-config.json", run_dir / "sampler.log"
        config.write_text(json.dumps(dataclasses.asdict(cfg)))
        state = run_dir / "sampler-state.json"
        state.unlink(missing_ok=True)
        if position is not None:
            state.write_text(json.dumps(position))
        args = [sys.executable, str(ROOT / "grpo_ref_split.py"), f"--config={config}",
                "--mode=generate", f"--ref_url={ref_url}", f"--weights_from={sender.address}",
                f"--max_ahead={overlap_ahead(cfg)}", f"--trainer_ranks={world_size}", f"--device={device}",
                "--worker_index=0", "--worker_batches=0", "--overlap=false"] + \
            ([f"--sampler_state={state}"] if position is not None else [])
        env = standalone_env(OMP_NUM_THREADS="1", **({"GRPO_REF_TOKEN": token} if token else {}))
        proc = subprocess.Popen(args, env=env, stdin=subprocess.DEVNULL, stdout=open(log, "w"),
                                stderr=subprocess.STDOUT, cwd=ROOT, preexec_fn=_die_with_parent)
        return cls(proc, sender, log)

    def publish(self, module: torch.nn.Module, version: int, step: int) -> None:
        """Hand the weights of `step` to the sampler (blocks until it has them); a sampler that
        dies meanwhile ends the wait at once (`alive()` is then False)."""
        if not self.alive():
            return
        running = lambda: self.proc.poll() is None  # noqa: E731
        try:
            if self.sender.pg is None:
                self.sender.connect(running)
            weights = {}
            if version != self.sender.sent_version:  # else the step trained nothing: its step alone
                tensors, aliases = publish.unique_tensors(module)
                weights = dict(tensors=tensors, aliases=aliases, metadata=lora.publish_metadata(module))
            got = self.sender.send(version, step, running, **weights)
            self.wait_seconds, self.send_seconds = got["wait_seconds"], got["send_seconds"]
            self.position = got["peer_state"]
        except (handoff.HandoffError, RuntimeError) as e:  # RuntimeError: the group's own failure
            if running():  # the group failed under a live sampler: it is stopped (one line later)
                self.failure = f"the weights handoff failed: {(str(e).splitlines() or [''])[0][:200]}"
            self.stop()

    def alive(self) -> bool:
        return self.proc.poll() is None and self.failure is None

    def why_dead(self) -> str:
        """One line: how the sampler ended, with the end of its log."""
        if self.failure:
            return self.failure
        tail = self.log.read_text(errors="replace").strip().splitlines()[-1:] if self.log.exists() else []
        return f"exit code {self.proc.returncode}" + (f": {tail[0][:200]}" if tail else "")

    def metrics(self) -> dict[str, float]:
        return {"sampler_wait_seconds": self.wait_seconds, "sampler_send_seconds": self.send_seconds}

    def stop(self, timeout: float = 10.0) -> None:
        from simple_grpo.train.ref_process import stop_process

        stop_process(self.proc, timeout)
        if self.sender.pg is not None:
            self.sender.close()
            self.sender.pg = None


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
    if 0 <= cfg.max_staleness < cfg.num_iterations * overlap_ahead(cfg):  # its batches: all stale
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

    def __init__(self, sampler: Sampler | None, dist, pid: int, ref_url: str = "", token: str | None = None):
        self.sampler, self.dist, self.pid, self.running = sampler, dist, pid, True
        self.one_node = dist.world_size == dist.local_world_size  # the pid is visible to every rank
        self.ref_url, self.token = ref_url, token  # other nodes: the sampler's heartbeat, there
        self._client, self._asked_at, self._silent = None, 0.0, False

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

    def publish(self, module: torch.nn.Module, version: int, step: int, last: bool) -> dict[str, float]:
        """After a step (rank 0): the weights of `step` to the sampler (only the step, when the
        version is unchanged; nothing after the `last` step) -> the handoff's metrics."""
        if self.sampler is None:
            return {}
        if self.running and not last:
            self.sampler.publish(module, version, step)
            return self.sampler.metrics()
        return dict.fromkeys(self.sampler.metrics(), 0.0)

    def stop(self) -> None:
        if self.sampler is not None:
            self.sampler.stop()

    def stopped(self) -> bool:
        """Polled while a rank waits for the sampler's batch: its process is gone (rank 0's node),
        or (other nodes) the reference server has not heard its heartbeat for WORKER_SILENCE_S."""
        if self.sampler is not None:
            return not self.sampler.alive()
        if not self.one_node:
            return self._silent_on_server()
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            return False
        return False

    def _silent_on_server(self, every_s: float = 2.0) -> bool:
        """The sampler's heartbeat as the reference server last heard it (asked at most every
        `every_s`): a sampler never heard yet is not silent (it is heard before the first batch)."""
        import time

        from simple_grpo.gen.worker import SAMPLER_ID, WORKER_SILENCE_S
        from simple_grpo.wire.client import RefClient, RefServerError, RefServerUnavailable

        if time.monotonic() - self._asked_at >= every_s:
            self._asked_at = time.monotonic()
            if self._client is None:
                self._client = RefClient(self.ref_url, token=self.token, retries=0, timeout=5.0)
            try:
                seen = self._client.stats().get("workers", {}).get(SAMPLER_ID)
            except (RefServerUnavailable, RefServerError):
                return self._silent  # an outage is the queue wait's to report
            self._silent = seen is not None and float(seen["last_seen_s_ago"]) > WORKER_SILENCE_S
        return self._silent


def finalize(cfg, dist):
    """The config with --overlap decided (`enabled`) and --tis=auto resolved (token with overlap)."""
    from simple_grpo.common.config import resolved_tis

    on = enabled(cfg, dist)
    return dataclasses.replace(cfg, overlap="true" if on else "false", tis=resolved_tis(cfg, on))


def start_overlap(cfg, dist, ref, module: torch.nn.Module, version: int, step: int,
                  run_dir: Path, held: dict | None = None) -> Overlap | None:
    """With --overlap (finalized): global rank 0 starts the sampler on the reference's device
    (`ref`: rollout_source.RefTarget) and hands it the current weights (of `step`); every rank
    gets the Overlap view (the sampler's pid for ranks on its node). `held`: a resumed run's
    checkpoint entry (`hold_next_batch`): the sampler continues from its position. None without
    overlap."""
    from simple_grpo.train import collectives

    if cfg.overlap != "true":
        return None
    sampler, pid = None, 0
    if dist.rank == 0:
        device = ref.device or "cpu"
        sampler = Sampler.start(cfg, ref.url, ref.token, device, dist.world_size, dist.device, run_dir,
                                position=held["sampler"] if held else None)
        pid = sampler.proc.pid
        print(f"[trainer] overlap: a sampler on {device} samples each next batch while this one "
              f"trains (pid {pid}, weights by {sampler.sender.backend}, log: {sampler.log})", flush=True)
        sampler.publish(module, version, step)
    pid = collectives.all_gather_objects(pid, dist.device)[0]
    return Overlap(sampler, dist, pid, ref.url, ref.token)


def follow_streams(stream, batch, rank: int) -> None:
    """After a rank trains a batch of the sampler's: its own prompt stream moves to where the sampler
    left that rank's stream (the batch's meta STREAMS_AFTER, written after the step's draws). The
    rank draws nothing itself while the sampler feeds it, so without this, the batches it makes
    after the sampler stops would draw again every prompt the sampler had already drawn for it;
    with it they continue right after them, and its checkpoints hold that position too. Other
    producers' batches (workers, the rank's own) leave the stream where it is."""
    from simple_grpo.gen.worker import SAMPLER_ID, STREAMS_AFTER

    after = batch.meta.get(STREAMS_AFTER)
    if batch.meta.get("producer") != SAMPLER_ID or not isinstance(after, dict):
        return
    shard = after["shards"][rank]
    assert shard["rank"] == rank, f"the sampler's stream {shard['rank']} is not rank {rank}'s"
    stream.load_state_dict(shard)


def own_part(batch, dist):
    """Every rank (while the sampler feeds them): the part of the sampler's step that was drawn from
    this rank's stream (meta PART), whichever part the queue handed it. The queue hands a step's
    parts in the order the ranks ask, which timing decides: rank r would train the prompts drawn
    for another rank, and with 3 or more ranks the sum of their gradients would differ in the last
    bits from run to run. One all-gather of the part numbers a step; the batches themselves cross
    (as the codec's bytes) only when some rank holds another's part and every rank holds a part of
    one step. A rank without a batch (the sampler died while it waited) keeps what it has.
    Bytes, estimated for a GSM8K-style 7B step: a part of 64 rows x 1,300 positions holds int64 ids
    (1.3 MB) and three fp32 [64, 1024] log-prob tensors (0.8 MB), 2.8 MB as base64; out of order, each
    of 8 ranks receives 8 x 2.8 = 22 MB, milliseconds over NVLink or the node's network, once a step."""
    import base64

    from simple_grpo.gen.worker import PART, SAMPLER_ID
    from simple_grpo.train import collectives
    from simple_grpo.wire import codec

    if dist.world_size == 1:
        return batch
    mine = batch.meta.get(PART) if batch is not None and batch.meta.get("producer") == SAMPLER_ID else None
    parts = collectives.all_gather_objects(mine, dist.device)
    if parts == list(range(dist.world_size)) or sorted(p if p is not None else -1 for p in parts) != \
            list(range(dist.world_size)):
        return batch  # in order already, or not one whole step (a part missing)
    blobs = collectives.all_gather_objects(base64.b64encode(codec.encode(batch)).decode(), dist.device)
    return codec.decode(base64.b64decode(blobs[parts.index(dist.rank)]))


def hold_next_batch(ctx, weight_version: int) -> dict | None:
    """Before a checkpoint, with the sampler running (every rank): take this rank's batch of the
    next step from the queue now and keep it for that step (ctx.prefetched); -> what an exact
    resume needs (the checkpoint's "overlap" entry): every rank's batch, and the sampler's position
    after them (rank 0's; the handoff of the step just ended reported it), or None (no sampler, or
    one that died). Batch k+1 was sampled with step k-1's weights, which no checkpoint holds, so
    the batch itself is kept; the sampler resumes at the batch after it (`resume_held`)."""
    import base64

    from simple_grpo.train import collectives
    from simple_grpo.wire import codec

    if ctx.overlap is None:  # the same on every rank
        return None
    got = ctx.ref.next_batch(weight_version, stop=ctx.overlap.stopped) if ctx.overlap.running else None
    ctx.prefetched = got
    blob = base64.b64encode(codec.encode(got)).decode() if got is not None else None
    batches = collectives.all_gather_objects(blob, ctx.dist.device)
    sampler = ctx.overlap.sampler
    position = sampler.position if sampler is not None else None
    if any(b is None for b in batches) or (ctx.dist.rank == 0 and position is None):
        return None
    return {"batches": batches, "sampler": position}


def resume_held(ctx, held: dict | None) -> None:
    """A resumed run (every rank): the batch its checkpoint held for this rank's next step."""
    import base64

    from simple_grpo.wire import codec

    if held is not None and ctx.overlap is not None:
        ctx.prefetched = codec.decode(base64.b64decode(held["batches"][ctx.dist.rank]))
