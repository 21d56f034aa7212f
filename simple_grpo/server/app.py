"""The reference-model server: a bottle app on waitress that computes reference log-probs and
holds the queue of scored batches between producers and the trainer.

Endpoints (tensors travel in the simple_grpo.wire.codec format, control as JSON; errors are a one-line
JSON object {"error": "..."} with a 4xx/5xx status):
    GET  /health    200 {"status", "model", "dtype", "device", "vocab_size", "protocol_version",
                    "queue_depth", "max_len", "max_body_bytes", ...}
    POST /upload    codec RolloutBatch -> 200 {"batch_id", "status": "queued" | "duplicate" |
                    "stale", "queue_depth", "compute_ms"}; 400 bad input, 413 body too large,
                    429 queue full (policy block, Retry-After), 503 busy (Retry-After)
    GET  /get       ?wait=SECONDS&weight_version=N -> 200 codec RolloutBatch with ref_logprobs and
                    batch_id (headers X-Batch-Id, X-Batch-Seq, X-Queue-Depth), 204 when none ready;
                    &request_id=ID makes it idempotent: a repeat gets the same answer (last 16);
                    &prefer=BATCH_ID: that batch (a trainer rank's own), waiting while it computes
    POST /logprobs  codec LogprobRequest -> 200 codec LogprobResponse (stateless)
    GET  /stats     200 counters (see ServerState.stats)
    POST /weights[/delta], GET /weights/version, GET /weights[/delta]: policy weights
                    (simple_grpo.server.weight_routes)
With a token every request lacking `Authorization: Bearer <token>` gets 401.
Batches and /logprobs requests carry the sampling temperature (codec schema 2): the reference
log-probs are log_softmax(logits / temperature), as the trainer computes its policy's.

Threading: waitress runs handlers on `threads` threads. Scoring goes through `ServerState.compute`
to one scorer thread that owns the model (simple_grpo.server.scorer): requests waiting together are
scored in one forward pass (up to `batch_tokens` padded tokens), each answered with its own rows.
At most `max_inflight` requests may wait for it (more get 503), so at least
`threads - max_inflight` threads always serve /health, /get and /stats while the model computes.

Padding: ids at padding positions (outside prompt_lens / completion_lens) are ignored: any int64
is accepted there and the model sees 0 instead. The batch handed to the trainer is bit-exactly the
uploaded one plus ref_logprobs and batch_id.

Extending (e.g. weight publishing): `app = make_app(state)` then add routes with `@app.get(...)`
and `@api_handler(state)`; the auth hook and the JSON error pages apply to them too.
"""
from __future__ import annotations

import hmac
import json
import re
import threading
import time
import uuid
from collections import OrderedDict
from typing import Any, Callable

import bottle
import torch

from simple_grpo.algo.masks import mask_from_lengths
from simple_grpo.models import fingerprint
from simple_grpo.server.config import ServerConfig, resolve_weights_limit
from simple_grpo.server.queue import BatchQueue, Busy, QueueFull
from simple_grpo.server.scorer import Rows, Scorer
from simple_grpo.server.weight_routes import add_weight_routes
from simple_grpo.server.weight_store import WeightStore
from simple_grpo.server.wsgi import ApiError, RunningServer, json_response, raw_header, read_body
from simple_grpo.wire import codec


_REQUEST_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")
ANSWERS_KEPT = 16  # /get answers kept for replay to a client that retries the same request_id


class ServerState:
    """Everything the handlers share: the frozen model, its lock, the queue and the counters."""

    def __init__(self, cfg: ServerConfig, model, model_name: str | None = None):
        self.cfg = resolve_weights_limit(cfg, model)  # --max_weights_mb=auto: from the model's size
        self.model = model.eval().requires_grad_(False)
        self.model_name = model_name or cfg.model
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype
        self.vocab_size = int(model.get_output_embeddings().weight.shape[0])
        self.fingerprint = fingerprint(model)  # trainers compare it with theirs (/health)
        self.max_len = cfg.max_len or int(getattr(model.config, "max_position_embeddings", 8192))
        self.queue = BatchQueue(cfg.queue_size, cfg.queue_order, cfg.when_full, cfg.max_staleness)
        self.model_lock = threading.Lock()  # held by the scorer thread around each forward pass
        self.inflight = threading.BoundedSemaphore(cfg.max_inflight)
        self.scorer = Scorer(self.model, self.model_lock, batch_tokens=cfg.batch_tokens,
                             batch_wait_s=cfg.batch_wait_ms / 1000, torch_threads=cfg.torch_threads,
                             max_logits_bytes=cfg.max_logits_mb << 20,
                             admitted=lambda: cfg.max_inflight - self.inflight._value)
        self._lock = threading.Lock()
        self.counters = {"compute_calls": 0, "tokens": 0, "rejected": 0,
                         "logprob_requests": 0, "busy": 0, "get_replays": 0}
        self.started = time.monotonic()
        self.instance = uuid.uuid4().hex  # a restarted server has another: clients notice lost batches
        self.answered: OrderedDict[str, tuple[bytes, dict]] = OrderedDict()  # /get request_id -> answer
        self.stats_hooks: list[Callable[[], dict[str, Any]]] = []  # extra /stats entries

    @classmethod
    def from_config(cls, cfg: ServerConfig) -> "ServerState":
        from simple_grpo.models import load_model, pick_device

        model = load_model(cfg.model, cfg.dtype, str(pick_device(cfg.device)), cfg.attn_implementation,
                           trust_remote_code=cfg.trust_remote_code, revision=cfg.revision or None)
        return cls(cfg, model, cfg.model)

    def count(self, key: str, n: float = 1) -> None:
        with self._lock:
            self.counters[key] += n

    def check(self, obj: codec.RolloutBatch | codec.LogprobRequest) -> None:
        """Value checks the codec cannot do (it does dtypes, shapes and length ranges)."""
        B, P = obj.prompt_ids.shape
        C = obj.completion_ids.shape[1]
        if B == 0:
            raise ApiError(400, "empty batch (B = 0)")
        if P + C > self.max_len:
            raise ApiError(400, f"sequence too long: prompt width {P} + completion width {C} "
                                f"> max_len {self.max_len}")
        if int(obj.prompt_lens.min()) < 1:
            raise ApiError(400, "prompt_lens must be >= 1 (a completion needs a prefix)")
        for name, ids, mask in (
                ("prompt_ids", obj.prompt_ids, mask_from_lengths(obj.prompt_lens, P).flip(1)),
                ("completion_ids", obj.completion_ids,
                 mask_from_lengths(obj.completion_lens, C))):
            valid = ids[mask]
            if valid.numel() and (int(valid.min()) < 0 or int(valid.max()) >= self.vocab_size):
                raise ApiError(400, f"{name} out of range: values in [{int(valid.min())}, "
                                    f"{int(valid.max())}], vocab size {self.vocab_size}")
        if isinstance(obj, codec.RolloutBatch):
            for name in ("rewards", "advantages"):
                if not bool(torch.isfinite(getattr(obj, name)).all()):
                    raise ApiError(400, f"{name} contain NaN or inf")
            for name in ("gen_logprobs", "gen_logprobs_full"):
                t = getattr(obj, name)
                if t is not None and not bool(torch.isfinite(t[mask_from_lengths(obj.completion_lens, C)]).all()):
                    raise ApiError(400, f"{name} contain NaN or inf inside the completions")

    def compute(self, obj: codec.RolloutBatch | codec.LogprobRequest) -> tuple[torch.Tensor, float]:
        """Reference log-probs [B, C] float32 on CPU, and the seconds of the forward pass that
        scored them (shared with the requests batched with this one)."""
        P, C = obj.prompt_ids.shape[1], obj.completion_ids.shape[1]
        pmask = mask_from_lengths(obj.prompt_lens, P).flip(1)
        cmask = mask_from_lengths(obj.completion_lens, C)
        args = [torch.where(pmask, obj.prompt_ids, 0), obj.prompt_lens,  # padding ids -> 0
                torch.where(cmask, obj.completion_ids, 0), obj.completion_lens]
        args = [t.to(self.device, non_blocking=True) for t in args]
        logp, dt = self.scorer.score(Rows(*args, temperature=float(obj.temperature)))
        with self._lock:
            self.counters["compute_calls"] += 1
            self.counters["tokens"] += obj.num_tokens
        return logp, dt

    def admit(self) -> None:
        """Take a compute slot or answer 503 (the caller must release self.inflight)."""
        if not self.inflight.acquire(blocking=False):
            self.count("busy")
            raise ApiError(503, f"server busy ({self.cfg.max_inflight} compute requests in "
                                f"flight); retry later", {"Retry-After": "1"})

    def health(self) -> dict[str, Any]:
        return {"status": "ok", "model": self.model_name,
                "dtype": str(self.dtype).removeprefix("torch."), "device": str(self.device),
                "vocab_size": self.vocab_size, "protocol_version": codec.SCHEMA_VERSION,
                "queue_depth": len(self.queue), "max_len": self.max_len,
                "max_body_bytes": self.cfg.max_body_bytes, "queue_order": self.cfg.queue_order,
                "when_full": self.cfg.when_full, "max_staleness": self.cfg.max_staleness,
                "auth": bool(self.cfg.token), "instance": self.instance,
                "max_weights_bytes": self.cfg.max_weights_bytes, "fingerprint": self.fingerprint,
                "max_inflight": self.cfg.max_inflight, "batch_tokens": self.cfg.batch_tokens}

    def stats(self) -> dict[str, Any]:
        with self._lock:
            c = dict(self.counters)
        out = self.queue.stats()
        f = self.scorer.stats()
        out.update(c, **f, uptime_s=time.monotonic() - self.started,
                   tokens_per_s=c["tokens"] / f["compute_s"] if f["compute_s"] else 0.0,
                   compute_ms_mean=1000 * f["compute_s"] / max(1, f["forwards"]))
        if self.device.type == "cuda":
            out["gpu_mem_gb_max"] = torch.cuda.max_memory_allocated(self.device) / 2**30
        for hook in self.stats_hooks:
            out.update(hook())
        return out


_BATCH_ID = re.compile(r"[A-Za-z0-9_.:-]{1,128}")


def api_handler(state: ServerState) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorator for route functions: CodecError -> 400 and ApiError -> its status, as one-line
    JSON, counting client errors; anything else becomes bottle's 500 (JSON via make_app)."""
    def handler(fn: Callable[..., Any]) -> Callable[..., Any]:
        def wrapped(*a, **kw):
            try:
                return fn(*a, **kw)
            except codec.CodecError as e:
                state.count("rejected")
                return json_response({"error": str(e)}, 400)
            except ApiError as e:
                if e.status < 500 and e.status != 429:
                    state.count("rejected")
                return json_response({"error": e.message}, e.status, e.headers)
        wrapped.__name__ = fn.__name__
        return wrapped
    return handler


def make_app(state: ServerState) -> bottle.Bottle:
    """The bottle app. To extend the server: `app = make_app(state)`, then add routes decorated
    with `@app.post(path)` and `@api_handler(state)`; auth and JSON errors apply to them too."""
    app = bottle.Bottle(catchall=True)
    app.config.update(request_timeout_s=state.cfg.request_timeout_s, token=state.cfg.token,
                      connection_limit=state.cfg.connection_limit)
    limit = state.cfg.max_body_bytes
    handler = api_handler(state)

    @app.hook("before_request")
    def _auth() -> None:
        token = state.cfg.token
        if token and not hmac.compare_digest((raw_header("Authorization") or "").encode("latin-1"),
                                             f"Bearer {token}".encode()):
            state.count("rejected")
            raise json_response({"error": "missing or wrong bearer token"}, 401,
                                {"WWW-Authenticate": "Bearer"})

    def error_page(res: bottle.HTTPError) -> str:
        bottle.response.content_type = "application/json"
        req = bottle.request
        if res.status_code == 404:
            paths = sorted({r.rule for r in app.routes})
            msg = f"no such endpoint {req.method} {req.path} (endpoints: {', '.join(paths)})"
        elif res.status_code == 405:
            msg = (f"method {req.method} not allowed on {req.path} "
                   f"(allowed: {res.headers.get('Allow', '?')})")
        elif res.status_code >= 500:
            msg = f"internal error: {type(res.exception).__name__}: {res.exception}"
        else:
            msg = f"{res.status_line}: {res.body}"
        return json.dumps({"error": " ".join(str(msg).split())[:500]})

    app.default_error_handler = error_page

    @app.get("/health")
    @handler
    def health():
        return json_response(state.health())

    @app.get("/stats")
    @handler
    def stats():
        return json_response(state.stats())

    @app.post("/upload")
    @handler
    def upload():
        batch = codec.decode(read_body(bottle.request.environ, limit), codec.RolloutBatch)
        state.check(batch)
        bid = batch.batch_id or uuid.uuid4().hex
        if not _BATCH_ID.fullmatch(bid):
            raise ApiError(400, "batch_id must match [A-Za-z0-9_.:-]{1,128}")
        state.admit()
        try:
            try:
                status = state.queue.reserve(bid, batch.weight_version)
            except QueueFull as e:
                raise ApiError(429, f"{e}; retry later", {"Retry-After": "1"}) from None
            except Busy as e:
                raise ApiError(503, f"{e}; retry later", {"Retry-After": "1"}) from None
            if status != "ok":
                return json_response({"batch_id": bid, "status": status,
                                      "queue_depth": len(state.queue)})
            try:
                batch.ref_logprobs, dt = state.compute(batch)
                batch.batch_id = bid
                data = codec.encode(batch)
            except BaseException:
                state.queue.release(bid)  # nothing half-enqueued
                raise
            state.queue.put(bid, data, batch.weight_version)
        finally:
            state.inflight.release()
        return json_response({"batch_id": bid, "status": "queued",
                              "queue_depth": len(state.queue), "compute_ms": 1000 * dt})

    @app.get("/get")
    @handler
    def get():
        if bottle.request.method == "HEAD":  # bottle routes HEAD to GET: it would drop a batch
            raise ApiError(405, "HEAD /get would consume a batch; use GET", {"Allow": "GET"})
        q = bottle.request.query
        try:
            wait_s = min(float(q.get("wait", "0")), state.cfg.max_wait_s)
            version = int(q["weight_version"]) if "weight_version" in q else None
        except ValueError:
            raise ApiError(400, "wait must be a number and weight_version an int") from None
        if not wait_s >= 0 or (version is not None and version < 0):
            raise ApiError(400, "wait and weight_version must be >= 0")
        rid = q.get("request_id")
        if rid is not None and not _REQUEST_ID.fullmatch(rid):
            raise ApiError(400, "request_id must match [A-Za-z0-9_-]{1,64}")
        with state._lock:  # a retried /get (its answer was lost in transit) gets the same batch
            replay = state.answered.get(rid) if rid else None
        if replay is not None:
            state.count("get_replays")
            return bottle.HTTPResponse(replay[0], status=200, headers=replay[1])
        prefer = q.get("prefer")
        if prefer is not None and not _BATCH_ID.fullmatch(prefer):
            raise ApiError(400, "prefer must be a batch id ([A-Za-z0-9_.:-]{1,128})")
        entry = state.queue.get(wait_s, version, prefer)
        if entry is None:
            return bottle.HTTPResponse(status=204, headers={"X-Queue-Depth": "0",
                                                            "X-Instance": state.instance})
        headers = {"Content-Type": "application/octet-stream", "X-Batch-Id": entry.batch_id,
                   "X-Instance": state.instance,
                   "X-Batch-Seq": str(entry.seq), "X-Queue-Depth": str(len(state.queue))}
        if rid:
            with state._lock:
                state.answered[rid] = (entry.item, headers)
                while len(state.answered) > ANSWERS_KEPT:
                    state.answered.popitem(last=False)
        return bottle.HTTPResponse(entry.item, status=200, headers=headers)

    @app.post("/logprobs")
    @handler
    def logprobs():
        req = codec.decode(read_body(bottle.request.environ, limit), codec.LogprobRequest)
        state.check(req)
        state.admit()
        try:
            logp, dt = state.compute(req)
        finally:
            state.inflight.release()
        state.count("logprob_requests")
        return bottle.HTTPResponse(codec.encode(codec.LogprobResponse(logp)), status=200, headers={
            "Content-Type": "application/octet-stream", "X-Compute-Ms": f"{1000 * dt:.3f}"})

    add_weight_routes(app, state, api_handler(state),
                      WeightStore(state.cfg.weights_dir, keep_deltas=state.cfg.weight_deltas))
    return app


def start(state: ServerState, host: str | None = None, port: int | None = None) -> RunningServer:
    """Serve `state` in a background thread (port 0 = a free port)."""
    cfg = state.cfg
    return RunningServer(make_app(state), host or cfg.host, cfg.port if port is None else port,
                         cfg.threads, cfg.max_body_bytes, cfg.large_body_paths)
