"""A generation worker: `python grpo_ref_split.py --mode=generate --ref_url=http://HOST:PORT`.

It loads the configured model, takes prompts from the configured task in its own order (seeded by
--seed and --worker_index), samples G completions per prompt, scores them with rewards.py,
computes group advantages (with dynamic sampling when the preset has it), records the sampling
log-probs of every generated token, and uploads the batch, tagged with the weight version it was
generated with, to the reference server; the trainer takes it from the queue. Between batches it
polls GET /weights/version (reporting the version it runs, shown in the server's /stats) and,
when the trainer has published a newer version, applies the server's chain of deltas from its
own version to the file it keeps (or, when there is none, downloads the whole file) and copies
the result into the model one tensor at a time. Any number of workers can be started and stopped
at any time.

A thread of its own reports the worker's version every HEARTBEAT_S, even in the middle of a long
batch, so the trainer can tell a stopped worker (silent for WORKER_SILENCE_S: one line) from a busy
one; the overlap sampler's heartbeat tells trainer ranks on other nodes that it lives.

Faults: a failed or interrupted download keeps the current weights (tried again before the next
batch); an unreachable or busy server is waited for with a message and retried (an upload keeps
its batch id, so a retry is never enqueued twice) until --ref_timeout seconds pass without
success; a worker killed mid-batch loses only that batch.
"""
from __future__ import annotations

import atexit
import json
import os
import random
import re
import shutil
import socket
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Callable, TypeVar

import torch

from simple_grpo import models

from simple_grpo.errors import UserError, exit_if_terminated
from simple_grpo.gen import batch_contract, data, rollout
from simple_grpo.common import lora
from simple_grpo.wire.client import RefClient, RefServerAuthError, RefServerError, RefServerUnavailable
from simple_grpo.wire.delta import DeltaError
from simple_grpo.wire.delta_apply import apply_chain_file

T = TypeVar("T")
# weight syncs: by delta chain / full file, delta attempts that failed (then a full download), the
# server had no chain (too far behind, a new run), links applied, bytes downloaded (deltas + full
# files); seconds of the last sync (what generation waited), its delta application and model load;
# inexact_model 1 when the model's dtype cannot hold the published values (full downloads only)
NO_WEIGHTS = -1  # our version after the server started a new run: nothing to sample with yet
HEARTBEAT_S = 5.0  # a worker (and the overlap sampler) reports this often, generating or not ...
WORKER_SILENCE_S = 20.0  # ... so the trainer says one silent this long has stopped
SAMPLER_ID = "trainer-sampler"  # the overlap sampler's producer and worker id
STREAMS_AFTER = "streams_after"  # meta of the sampler's batches: data.RankStreams.state_dict() after them
PART = "part"  # meta of the sampler's batches: r, for the part drawn from trainer rank r's stream
SYNC_COUNTS = {"delta_syncs": 0, "full_syncs": 0, "delta_fallbacks": 0, "delta_unavailable": 0,
               "delta_links": 0, "bytes_downloaded": 0, "sync_seconds": 0.0, "apply_seconds": 0.0,
               "load_seconds": 0.0, "sync_seconds_total": 0.0, "inexact_model": 0}


def default_worker_id() -> str:
    return re.sub(r"[^A-Za-z0-9_.:@-]", "-", f"gen-{socket.gethostname()}-{os.getpid()}")[:128]


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


class Worker:
    """One worker's model, prompt stream and connection; `sync_weights`, `make_batches`, `upload`."""

    def __init__(self, cfg, client: RefClient):
        from simple_grpo.gen.reward_registry import reward_specs
        from simple_grpo.gen.rollout import dynamic_filter_metric, sample_settings

        self.cfg, self.client = cfg, client
        # the overlap sampler samples the trainer's ranks' prompts (their streams, their seeds) and
        # its batches are the trainer's (bit-exact weights): offpolicy.is_trainer_batch
        self.id = SAMPLER_ID if cfg.weights_from else default_worker_id()
        index = cfg.worker_index if cfg.worker_index >= 0 else random.SystemRandom().randrange(1 << 30)
        self.seed = cfg.seed if cfg.weights_from else cfg.seed + 1009 * (index + 1)  # a worker: never
        torch.manual_seed(self.seed)  # the trainer's order (seed + 0)
        self.device = models.pick_device(cfg.device)
        self.specs = reward_specs(cfg)
        fields = dict(question_field=cfg.question_field, answer_field=cfg.answer_field)
        examples = data.load_examples(cfg.task, "train", seed=cfg.seed, **fields)
        self.stream = data.RankStreams(examples, seed=cfg.seed, world_size=cfg.trainer_ranks) \
            if cfg.weights_from else data.PromptStream(examples, seed=self.seed)
        self.tokenizer = models.load_tokenizer(cfg.model, **models.hub_options(cfg))
        self.model = models.load_model(cfg.model, cfg.dtype, str(self.device), cfg.attn_implementation,
                                       **models.hub_options(cfg)).eval()
        model_id = batch_contract.model_id(self.model)  # the base model, before any weight download
        if cfg.lora_r > 0:  # the trainer's adapter (the same seed): published adapters fill it
            self.model = lora.wrap(self.model, cfg, seed=cfg.seed).eval()
        self.render = data.prompt_renderer(self.tokenizer, cfg.system_prompt, cfg.chat_template_kwargs)
        self.eos_ids = rollout.eos_token_ids(self.tokenizer, self.model)
        self.settings = sample_settings(cfg)
        self.filter_metric = dynamic_filter_metric(cfg, self.specs)
        self.contract = batch_contract.expected_contract(cfg, self.specs, model_id,  # on every batch
                                                         self.tokenizer)
        self.version = 0  # the base model is version 0 of a fresh run
        self.run_id: str | None = None  # the run whose weights we sample with (the server's)
        self.step: int | None = None  # --weights_from: the trainer step of the weights we sample with
        self.receiver = None  # --weights_from: our end of the handoff (simple_grpo/wire/handoff.py)
        self.dir = Path(tempfile.mkdtemp(prefix="simple_grpo-worker-"))  # our weights file; removed at
        atexit.register(shutil.rmtree, self.dir, ignore_errors=True)  # exit (SIGTERM runs it too)
        self.counts = {"batches": 0, "weight_updates": 0, "download_failures": 0, "stale": 0,
                       **SYNC_COUNTS}
        self.weights_digest: str | None = None  # our version's digest, while the model holds it exactly
        self.targets: dict[str, torch.Tensor] | None = None  # the model's tensors a delta writes

    def call(self, what: str, fn: Callable[[], T]) -> T:
        """fn(), waiting out an unreachable / busy server (with a message) for up to
        --ref_timeout seconds; a refused token or a bad request is raised at once."""
        deadline = time.monotonic() + self.cfg.ref_timeout
        while True:
            try:
                return fn()
            except RefServerAuthError:
                raise
            except (RefServerUnavailable, RefServerError) as e:
                if isinstance(e, RefServerError) and e.status < 500:
                    raise
                if time.monotonic() > deadline:
                    raise UserError(f"{what}: the reference server at {self.client.url} stayed "
                                    f"unreachable for {self.cfg.ref_timeout:.0f} s: {e}") from None
                log(f"[{self.id}] {what}: not through yet, retrying ({str(e)[:160]})")
                time.sleep(2.0)

    def sync_weights(self) -> bool:
        """Load the trainer's newest published weights when they differ from ours -> updated.
        The version polled only says whether to download: the worker takes whatever version the
        server sends (a publish may land between the poll and the download, or during it) and
        records that one, verified against the digest sent with it -- never a refusal and retry,
        which a trainer publishing every step could keep the worker in forever.

        When behind, the worker first fetches the chain of deltas from its version (GET
        /weights/delta) and applies it to its model's tensors in place (only the changed elements
        of a sparse tensor are written; every tensor is then checked against its digest); a fresh
        worker, one too far behind (or of another run), one whose model cannot hold the published
        values exactly (a narrower dtype) and one whose delta fails (corrupt, truncated, a
        mismatch: one log line, `delta_fallbacks`) download the full file, load it and delete it.
        A delta that failed after it began to change the model leaves the worker on no version
        (NO_WEIGHTS: it samples nothing) until a full download succeeds."""
        info = self.call("poll weights", lambda: self.client.weights_version(self.id, self.version))
        run = info.get("run_id")
        if run is not None and self.run_id is not None and run != self.run_id:  # a new run: our
            log(f"[{self.id}] the server follows a new run ({run}): dropping weight version "  # weights
                f"{self.version} of run {self.run_id}, waiting for the new run's")  # are the old run's
            self.version, self.weights_digest = NO_WEIGHTS, None
        self.run_id = run if run is not None else self.run_id
        if info.get("version") is None or info["version"] == self.version:
            return False
        t0 = time.perf_counter()
        got = self._sync_delta() if self.weights_digest is not None else None
        if got is None:
            path = self.dir / "policy.safetensors"
            try:
                self.client.download_weights(path)  # checked against the digest of what was sent
            except (RefServerUnavailable, RefServerError) as e:
                if isinstance(e, RefServerAuthError):
                    raise
                self.counts["download_failures"] += 1
                kept = f"keeping version {self.version}" if self.version != NO_WEIGHTS else \
                    "sampling nothing until a download succeeds"
                log(f"[{self.id}] weight download failed, {kept}: {str(e)[:200]}")
                return False
            got = self.client.last_weights
            self.counts["full_syncs"] += 1
            self.counts["bytes_downloaded"] += got["bytes"]
            self.weights_digest = None  # the model is between versions until loaded
            t1 = time.perf_counter()
            self.targets = load_into(self.model, path)
            path.unlink()
            self.counts["load_seconds"] = time.perf_counter() - t1
            if self.targets is None and not self.counts["inexact_model"]:
                self.counts["inexact_model"] = 1
                log(f"[{self.id}] the model's dtype cannot hold the published weights exactly: every "
                    f"update is a full download (publish in the workers' dtype for deltas)")
        self.version = int(got["version"])
        self.weights_digest = got["digest"] if self.targets is not None else None
        self.counts["weight_updates"] += 1
        self.counts["sync_seconds"] = time.perf_counter() - t0
        self.counts["sync_seconds_total"] += self.counts["sync_seconds"]
        self.call("report version", lambda: self.client.weights_version(self.id, self.version))
        return True

    def _sync_delta(self) -> dict | None:
        """Bring the model from our version to the server's newest through its delta chain ->
        {"version", "digest"} of the model now, or None (download the full file): the server has
        no chain from our version, or applying it failed (the model then holds neither)."""
        chain, digest, touched = self.dir / "chain.part", self.weights_digest, False
        try:
            got = self.client.download_delta(self.version, chain, digest=digest)
            if got is None or not got["links"]:
                self.counts["delta_unavailable"] += 1
                return None
            self.counts["bytes_downloaded"] += got["bytes"]
            t0 = time.perf_counter()
            self.weights_digest, touched = None, True  # changed in place: not ours until verified
            links = apply_chain_file(chain, self.targets, self.version, digest)
            self.counts["apply_seconds"] = time.perf_counter() - t0
            self.counts["delta_syncs"] += 1
            self.counts["delta_links"] += len(links)
            return {"version": links[-1]["to_version"], "digest": links[-1]["digest"]}
        except RefServerAuthError:
            raise
        except (DeltaError, RefServerError, RefServerUnavailable, OSError) as e:
            self.counts["delta_fallbacks"] += 1
            log(f"[{self.id}] weight delta from version {self.version} failed, downloading the full "
                f"file: {str(e)[:200]}")
            if touched:  # the model holds neither version: nothing is sampled until a full download
                self.version = NO_WEIGHTS
            return None
        finally:
            chain.unlink(missing_ok=True)

    def follow_trainer(self) -> bool:
        """--weights_from (the overlap sampler): receive the trainer's publishes, in order, until
        ours are the weights the next batch must be sampled with (`handoff.required_step`,
        --max_ahead steps behind it) -> updated. The first call connects and takes the first."""
        from simple_grpo.wire import handoff

        if self.receiver is None:
            self.receiver = handoff.Receiver.join(self.cfg.weights_from, self.device,
                                                  timeout_s=self.cfg.dist_timeout * 60)
        updated = False
        while True:
            if self.step is not None:
                need = handoff.required_step(self.receiver.first, self.counts["batches"] + 1,
                                             self.cfg.trainer_ranks, self.cfg.max_ahead)
                if self.step >= need:
                    return updated
            version, self.step, came = self.receiver.recv(
                lambda names, aliases, metadata: published_params(self.model, names, aliases, metadata),
                state=self.position())
            if came:
                self.version, updated = version, True
                self.counts["weight_updates"] += 1

    def position(self) -> dict:
        """Where the worker's prompt stream stands (JSON-able): after every batch made so far, what
        a checkpoint keeps for an exact resume (`restore`); a batch's sampling is seeded by the
        stream's position (rollout.make_rollout), so no RNG state is needed."""
        return {"stream": self.stream.state_dict()}

    def restore(self, position: dict) -> None:
        """Continue from `position()`'s answer (--sampler_state)."""
        self.stream.load_state_dict(position["stream"])

    def make_batches(self, parts: int | None = None):
        """A trainer step's rows, every rank's share, in one sampling call (refill rounds aside),
        split into `parts` batches of whole groups (default --trainer_ranks: one per rank) ->
        [(batch, stats)]: scored groups with sampling log-probs, each its own batch id."""
        c = self.cfg
        parts = c.trainer_ranks if parts is None else parts
        roll = rollout.make_rollout(self.model, self.tokenizer, self.stream,
                                    c.prompts_per_step // c.trainer_ranks * parts, self.settings, self.specs,
                                    system_render=self.render, eos_ids=self.eos_ids,
                                    dynamic_sampling=c.dynamic_sampling,
                                    filter_metric=self.filter_metric,
                                    max_refill_rounds=c.max_refill_rounds,
                                    failure_value=c.reward_failure_value, scale=c.scale,
                                    weight_version=self.version, record_logprobs=True)
        out = []
        # the sampler's streams are the trainer ranks' own: each part says where they stand after this
        # step's draws, so a rank that trains it continues there (train/sampler.follow_streams)
        after = {STREAMS_AFTER: self.stream.state_dict()} if self.id == SAMPLER_ID else {}
        for r, part in enumerate(rollout.split(roll, parts)):
            batch = part.batch
            batch.batch_id = uuid.uuid4().hex
            batch.contract = self.contract  # the trainer drops it when its settings differ
            batch.meta.update(producer=self.id, reward_breakdown=rollout.json_breakdown(part.breakdown),
                              gen_seconds=roll.stats["gen_seconds"], **after, **({PART: r} if after else {}))
            out.append((batch, part.stats))
        return out

    def upload(self, batch) -> str:
        """-> the server's answer: queued, duplicate (an earlier attempt got through) or stale."""
        self.call("upload", lambda: self.client.upload(batch))
        status = str(self.client.last_upload.get("status", "queued"))
        self.counts["batches"] += 1
        self.counts["stale"] += status == "stale"
        return status


def published_params(model: torch.nn.Module, names: list[str], aliases: dict[str, str],
                     metadata: dict[str, str]) -> dict[str, torch.Tensor]:
    """The tensors of `model` that published weights fill (tensors `names`, tied ones in
    `aliases`; a LoRA adapter, by its metadata, fills only the model's adapter). Raises UserError
    when the names don't fit the model."""
    params = lora.published_params(model, metadata)
    have = set(names) | set(aliases)
    if have != set(params):
        missing, extra = sorted(set(params) - have)[:3], sorted(have - set(params))[:3]
        raise UserError(f"published weights do not fit --model (missing {missing}, unexpected "
                        f"{extra}): start workers with the trainer's --model")
    return params


def load_into(model: torch.nn.Module, path: Path) -> dict[str, torch.Tensor] | None:
    """Copy a published safetensors file into `model`, one tensor at a time (no second full copy
    of the weights in memory); tied tensors sent once are found through the file's "aliases"
    metadata; a LoRA adapter (metadata format=lora-adapter) fills only the model's adapter ->
    the model's tensors under the file's names (what a delta writes), or None when a tensor's
    dtype cannot hold the published values exactly (a narrower float). Raises UserError when the
    names or shapes don't fit the model."""
    from safetensors import safe_open

    exact = True
    with safe_open(str(path), framework="pt", device="cpu") as f:
        aliases = json.loads((f.metadata() or {}).get("aliases", "{}"))
        params = published_params(model, list(f.keys()), aliases, f.metadata() or {})
        with torch.no_grad():
            for name, param in params.items():
                t = f.get_tensor(aliases.get(name, name))
                if t.shape != param.shape:
                    raise UserError(f"published weight {name} has shape {tuple(t.shape)}, the model "
                                    f"{tuple(param.shape)}: start workers with the trainer's --model")
                param.copy_(t)
                exact = exact and holds_exactly(param.dtype, t.dtype)
        return {name: params[name] for name in f.keys()} if exact else None


def holds_exactly(dtype: torch.dtype, published: torch.dtype) -> bool:
    """Whether a tensor of `dtype` keeps every value of `published` (deltas then apply to it)."""
    return dtype == published or (dtype == torch.float32 and published in (torch.bfloat16, torch.float16))


def heartbeat(w: Worker) -> None:
    """Report the worker's version every HEARTBEAT_S from a thread of its own (a batch can take
    minutes), so the trainer can tell a stopped worker from a busy one; outages are the main
    loop's to report."""
    import threading

    client = RefClient(w.cfg.ref_url, token=w.cfg.ref_token, retries=0, timeout=HEARTBEAT_S)

    def beat():
        while True:
            try:
                client.weights_version(w.id, w.version)
            except (RefServerUnavailable, RefServerError):
                pass
            time.sleep(HEARTBEAT_S)

    threading.Thread(target=beat, name="worker-heartbeat", daemon=True).start()


def run_worker(cfg) -> dict:
    """The worker's main loop (until stopped, or --worker_batches uploads)."""
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    client = RefClient(cfg.ref_url, token=cfg.ref_token, timeout=max(600.0, cfg.ref_timeout))
    client.wait_ready(cfg.ref_timeout)
    w = Worker(cfg, client)
    heartbeat(w)  # the overlap sampler's tells trainer ranks on other nodes than rank 0 it lives
    if cfg.weights_from and cfg.max_ahead < 0:
        raise UserError("--weights_from takes every publish in order: give --max_ahead >= 0")
    if cfg.sampler_state:  # a resumed overlapped run: its checkpoint holds the first step's batches
        w.restore(json.loads(Path(cfg.sampler_state).read_text()))
        w.counts["batches"] = cfg.trainer_ranks
    log(f"[{w.id}] generation worker for {cfg.ref_url} on {w.device} (prompt seed {w.seed})")
    while cfg.worker_batches == 0 or w.counts["batches"] < cfg.worker_batches:
        exit_if_terminated()  # a SIGTERM whose exit was swallowed (simple_grpo/errors.py)
        if w.follow_trainer() if cfg.weights_from else w.sync_weights():  # the sampler: --max_ahead
            log(f"[{w.id}] loaded weight version {w.version}" +  # steps ahead of the weights
                (f" (trainer step {w.step})" if cfg.weights_from else ""))
        if w.version == NO_WEIGHTS:  # a new run has published nothing yet: no batch of old weights
            time.sleep(1.0)
            continue
        t0 = time.perf_counter()
        left = cfg.worker_batches - w.counts["batches"] if cfg.worker_batches else cfg.trainer_ranks
        for batch, stats in w.make_batches(min(cfg.trainer_ranks, left)):  # one step's shares at once
            status = w.upload(batch)
            log(f"[{w.id}] batch {w.counts['batches']}: version {batch.weight_version}, reward "
                f"{stats['reward_mean']:.3f}, {batch.batch_size} rows, {time.perf_counter() - t0:.1f} s, "
                f"{status}")
    return {"worker_id": w.id, **w.counts, "weight_version": w.version}
