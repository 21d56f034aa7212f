"""The reference server's configuration (one dataclass, `--key=value` overridable), the bind
check that refuses a public address without a token, and the weight limit that follows the
served model (--max_weights_mb=auto)."""
from __future__ import annotations

import dataclasses
import errno
import ipaddress
import math
import socket
from dataclasses import dataclass
from typing import Literal

import torch

from simple_grpo.cli import check_choices
from simple_grpo.errors import UserError
from simple_grpo.models import ATTN_IMPLEMENTATIONS
from simple_grpo.server.queue import ORDERS, WHEN_FULL
from simple_grpo.wire.weights import publish_bytes


@dataclass
class ServerConfig:
    """Reference-model server: per-token reference log-probs over HTTP, plus the rollout queue."""
    model: str = ""
    """HF hub name, local model folder, or smollm2-135m (the bundled offline model). Required."""
    trust_remote_code: bool = False
    """Let from_pretrained run the model's own code (models transformers does not ship)."""
    revision: str | None = None
    """Hub revision (branch, tag or commit) of --model; none: the default branch."""
    host: str = "127.0.0.1"
    """Address to bind. Anything but loopback requires --token."""
    port: int = 59875
    """TCP port (0 picks a free one)."""
    dtype: Literal["auto", "float32", "bfloat16", "float16", "fp32", "bf16", "fp16"] = "auto"
    """Model dtype: auto (bf16 on CUDA, fp32 on CPU), float32, bfloat16, float16."""
    device: str = "auto"
    """cpu, cuda, cuda:N, or auto (cuda when available)."""
    attn_implementation: Literal[ATTN_IMPLEMENTATIONS] = "auto"
    """auto (flash_attention_2 on GPUs in half precision when flash-attn is installed, else sdpa) |
    sdpa | flash_attention_2 | eager."""
    token: str = ""
    """Shared secret: every request must carry Authorization: Bearer <token>. Prefer the
    REF_SERVER_TOKEN environment variable to the command line."""
    max_len: int = 0
    """Longest padded sequence accepted (prompt width + completion width); 0 = the model's
    max_position_embeddings."""
    max_body_mb: float = 64.0
    """Largest request body in MiB; larger ones get 413 before being read."""
    max_logits_mb: int = 1024
    """fp32 logits alive at once: completion tokens are scored in chunks below it, and a pass takes
    as many rows as keep its fp32 hidden states within it (never limited by the vocabulary size)."""
    queue_size: int = 256
    """Bound on ready + in-flight batches (0 = unbounded)."""
    queue_order: Literal[ORDERS] = "fifo"
    """Order /get hands batches out: fifo (oldest first) or lifo (newest first)."""
    when_full: Literal[WHEN_FULL] = "block"
    """When the queue is full: block (uploads get 429 + Retry-After) or drop_oldest (counted)."""
    max_staleness: int = -1
    """Drop batches more than this many weight versions behind the newest version seen in an
    upload or reported by the consumer (/get?weight_version=N); -1 = keep everything."""
    max_inflight: int = 8
    """Compute requests (upload, logprobs) admitted at once (those waiting together share a forward
    pass, see --batch_tokens); more get 503 + Retry-After."""
    batch_tokens: int = 65536
    """Padded tokens (rows x (prompt width + completion width)) of concurrent scoring requests
    gathered into one forward pass; a larger request runs alone."""
    batch_wait_ms: float = 5.0
    """Longest wait for more requests before a forward pass, while other admitted requests are
    still on their way (0: take only those already waiting)."""
    threads: int = 16
    """HTTP worker threads; must exceed max_inflight so /health and /get stay responsive."""
    torch_threads: int = 0
    """torch.set_num_threads for the forward passes (0 = torch's default)."""
    max_wait_s: float = 30.0
    """Longest long-poll a consumer may ask for with /get?wait=SECONDS."""
    weights_dir: str = ""
    """Folder holding the latest published policy weights (POST /weights); "" = a temporary folder
    made at the first publish. A given folder keeps its weights across restarts."""
    max_weights_mb: float | str = "auto"
    """Largest weights upload in MiB (413 above it). auto (or 0): follows the served model: its
    weights as an fp32 file (the largest a trainer publishes) plus 10% and 64 MiB, about 32,000 MiB
    for a 7B; a number sets it instead. The weights folder should have room for two files this
    size (the latest one and an upload in progress): at start-up the server warns when it has not."""
    weight_deltas: int = 8
    """Deltas kept besides the latest full weights file (simple_grpo/wire/delta.py): a worker up to
    this many versions behind downloads the chain of deltas from its version (GET /weights/delta)
    instead of the full file; 0 keeps none (every worker downloads full files)."""
    request_timeout_s: float = 60.0
    """A request's headers, and its body except a weights upload, must arrive within this many
    seconds, else the connection is closed (slow clients); idle connections close after it too."""
    connection_limit: int = 256
    """Open client connections served at once; further ones wait in the OS backlog until one
    closes (idle ones close after request_timeout_s)."""

    def __post_init__(self):
        check_choices(self)  # the Literal fields, also for a config built in code
        if self.batch_tokens < 1 or not self.batch_wait_ms >= 0:
            raise UserError("--batch_tokens must be >= 1 and --batch_wait_ms >= 0")
        if self.max_inflight < 1 or self.threads < self.max_inflight + 2:
            raise UserError(f"need --max_inflight >= 1 and --threads >= max_inflight + 2, got "
                            f"max_inflight={self.max_inflight}, threads={self.threads}")
        if (self.queue_size < 0 or self.max_body_mb <= 0 or self.max_logits_mb <= 0
                or not self.request_timeout_s > 0 or self.connection_limit < 1 or self.weight_deltas < 0):
            raise UserError("--queue_size and --weight_deltas must be >= 0, --max_body_mb, "
                            "--max_logits_mb, --request_timeout_s and --connection_limit > 0")
        self.max_weights_mb = _weights_mb(self.max_weights_mb)

    @property
    def max_body_bytes(self) -> int:
        return int(self.max_body_mb * (1 << 20))

    @property
    def max_weights_bytes(self) -> int:
        if self.max_weights_mb == "auto":
            raise ValueError("--max_weights_mb=auto is resolved with the model: use ServerState.cfg")
        return int(self.max_weights_mb * (1 << 20))

    @property
    def large_body_paths(self) -> dict[str, int]:
        """POST paths allowed bodies over max_body_bytes (waitress refuses the rest early)."""
        return {"/weights": self.max_weights_bytes, "/weights/delta": self.max_weights_bytes}


def _weights_mb(value) -> float | str:
    """--max_weights_mb as given (a number, or text from the command line) -> MiB > 0 or "auto"."""
    if isinstance(value, str) and value.strip().lower() == "auto":
        return "auto"
    try:
        mb = float(value) if not isinstance(value, bool) else math.nan
    except (TypeError, ValueError):
        mb = math.nan
    if mb == 0:
        return "auto"
    if not 0 < mb < math.inf:
        raise UserError(f"--max_weights_mb must be a number of MiB > 0, or auto (0), got {value!r}")
    return mb


def auto_weights_bytes(model) -> int:
    """--max_weights_mb=auto for `model`: its state dict as an fp32 file (a trainer publishes in
    its training dtype, fp32 at most, or a LoRA adapter: smaller), plus 10% and 64 MiB for the
    file's header and anything the trainer's copy holds besides. Shapes and dtypes only: a model
    on the meta device works."""
    return int(publish_bytes(model.state_dict(), torch.float32) * 1.10) + (64 << 20)


def resolve_weights_limit(cfg: ServerConfig, model) -> ServerConfig:
    """`cfg` with --max_weights_mb=auto replaced by the limit for `model` (whole MiB); an explicit
    number is kept as it is."""
    if cfg.max_weights_mb != "auto":
        return cfg
    return dataclasses.replace(cfg, max_weights_mb=float(-(-auto_weights_bytes(model) // (1 << 20))))


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name: may resolve to a public address


def check_bind(cfg: ServerConfig) -> None:
    """Before the slow model load: refuse to expose the server beyond this machine without a
    token, and a port that another process already listens on."""
    if not is_loopback(cfg.host) and not cfg.token:
        raise UserError(f"refusing to bind {cfg.host} (not loopback) without a token; pass "
                        f"--token=SECRET or set REF_SERVER_TOKEN, or bind 127.0.0.1")
    if not 0 <= cfg.port <= 65535:
        raise UserError(f"--port={cfg.port}: a port is 0-65535 (0: a free one)")
    if cfg.port:
        try:
            with socket.socket(socket.AF_INET6 if ":" in cfg.host else socket.AF_INET) as s:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as waitress binds
                s.bind((cfg.host.strip("[]"), cfg.port))
        except OSError as e:
            raise UserError(port_error(cfg.host, cfg.port, e)) from None


def port_error(host: str, port: int, e: OSError) -> str:
    """One line for a failed bind."""
    if e.errno == errno.EADDRINUSE:
        return (f"port {port} on {host} is already in use (another ref_server.py?): stop it, or "
                f"pick another --port (0: a free one)")
    return f"cannot bind {host}:{port}: {e.strerror or e}"
