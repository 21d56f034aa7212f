"""Client of the reference server (simple_grpo.server.app), for the trainer and generation workers.

    client = RefClient("http://127.0.0.1:59875", token=os.environ.get("REF_SERVER_TOKEN"))
    client.wait_ready(timeout_s=300)          # prints "waiting for ref server at URL ..."
    batch_id = client.upload(batch)           # RolloutBatch -> id; safe to retry (idempotent)
    batch = client.get(wait_s=10)             # RolloutBatch with ref_logprobs, or None
    logp_BC = client.logprobs(prompt_ids, prompt_lens, completion_ids, completion_lens,
                              temperature=0.7)  # scored at the sampling temperature
    client.publish_weights(iter_state_dict_safetensors(model.state_dict()), version=3)  # trainer
    client.weights_version("gen-0", running_version=2)  # -> {"version": 3, "digest", ...}
    client.download_weights(Path("policy.safetensors"))  # resumable, digest-checked, atomic
    client.download_delta(2, Path("chain"), digest=...)  # deltas from version 2, or None: full

Retries: connection errors, timeouts, 429, 502, 503 and 504 are retried with exponential backoff
(honouring Retry-After), up to `retries` times, then RefServerUnavailable (a UserError) is raised;
any other 4xx/5xx raises RefServerError at once with the server's one-line message (401 raises
RefServerAuthError, also a UserError). Uploads carry a client-made batch_id, so a retried upload whose first
attempt did reach the server is answered "duplicate" instead of being enqueued twice. A /get
carries a request id too: a retry after a lost answer gets the batch the first attempt popped.
`timeout` bounds each HTTP request; it must exceed the server's longest forward pass (a 64 x 512
batch of SmolLM2-135M takes minutes on a 2-core CPU), or a slow upload is retried while the first
attempt is still computing (answered 503 "still being processed" until it is done).
A RefClient holds a requests.Session: use one client per thread.
"""
from __future__ import annotations

import os
import random
import sys
import time
import uuid
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, Iterable

import requests
import torch

from simple_grpo.errors import UserError
from simple_grpo.wire import codec
from simple_grpo.wire.delta import DeltaError
from simple_grpo.wire.delta_apply import file_digest

_RETRY_STATUS = (429, 502, 503, 504)  # queue full, busy, or a proxy in between


class RefServerError(RuntimeError):
    """The server refused a request (a 4xx, or a 500); `.status`, `.message`."""

    def __init__(self, status: int, message: str, url: str):
        super().__init__(f"ref server {url} answered {status}: {message}")
        self.status, self.message, self.url = status, message, url


class RefServerAuthError(RefServerError, UserError):
    """401: the token is missing or wrong -- something the user must fix."""


class RefServerUnavailable(UserError):
    """The server could not be reached (or stayed busy) within the retries or the timeout."""


class RefServerQueueFull(RefServerUnavailable):
    """The server is up but its queue stayed full (429) through the retries."""


class RefClient:
    """HTTP client of the reference server; see the module docstring."""

    def __init__(self, url: str, token: str | None = None, timeout: float = 600.0,
                 retries: int = 5, backoff_s: float = 0.25, max_backoff_s: float = 8.0,
                 max_body_bytes: int | None = None):
        self.url = url.rstrip("/")
        self.timeout, self.retries = timeout, retries
        self.backoff_s, self.max_backoff_s = backoff_s, max_backoff_s
        self.max_body_bytes = max_body_bytes  # learnt from /health when not given
        self.last_upload: dict[str, Any] = {}  # the server's answer to the last upload
        self.last_compute_ms = 0.0  # server-side forward time of the last /logprobs call
        self.last_instance: str | None = None  # the server instance that answered the last /get
        self.last_weights: dict[str, Any] = {}  # version and digest of the last download
        self.last_delta_refusal = ""  # why the server last had no delta chain to offer
        self.session = requests.Session()
        if token:
            self.session.headers["Authorization"] = f"Bearer {token}"

    # ------------------------------------------------------------------ plumbing
    def _delay(self, attempt: int, retry_after: str | None) -> float:
        if retry_after is not None:
            try:
                return min(max(float(retry_after), 0.0), 60.0)
            except ValueError:
                pass  # an HTTP date: fall back to our own backoff
        return min(self.max_backoff_s, self.backoff_s * 2 ** attempt) * (0.5 + random.random() / 2)

    def _error(self, r: requests.Response) -> RefServerError:
        try:
            message = str(r.json()["error"])
        except (ValueError, KeyError, TypeError):
            message = " ".join(r.text.split())[:300] or r.reason
        cls = RefServerAuthError if r.status_code == 401 else RefServerError
        return cls(r.status_code, message, self.url)

    def _request(self, method: str, path: str, body: bytes | None = None,
                 params: dict | None = None, timeout: float | None = None,
                 retries: int | None = None, headers: dict | None = None) -> requests.Response:
        retries = self.retries if retries is None else retries
        if body is not None and self.max_body_bytes is not None and len(body) > self.max_body_bytes:
            raise RefServerError(413, f"body of {len(body)} bytes exceeds the server's limit of "
                                      f"{self.max_body_bytes} (split the batch)", self.url)
        if body is not None:
            headers = {"Content-Type": "application/octet-stream", **(headers or {})}
        last, status = "", None
        for attempt in range(retries + 1):
            try:
                r = self.session.request(method, self.url + path, data=body, params=params,
                                         headers=headers, timeout=timeout or self.timeout)
            except (requests.ConnectionError, requests.Timeout) as e:
                last, retry_after, status = f"{type(e).__name__}: {e}", None, None
            else:
                if r.status_code < 400:
                    return r
                if r.status_code not in _RETRY_STATUS:
                    raise self._error(r)
                last, retry_after, status = str(self._error(r)), r.headers.get("Retry-After"), r.status_code
            if attempt < retries:
                time.sleep(self._delay(attempt, retry_after))
        cls = RefServerQueueFull if status == 429 else RefServerUnavailable
        raise cls(f"ref server at {self.url} failed {method} {path} after "
                                   f"{retries + 1} attempt(s): {last[:300]}")

    # ------------------------------------------------------------------ API
    def health(self) -> dict[str, Any]:
        """GET /health -> {"model", "dtype", "device", "vocab_size", "protocol_version", ...}."""
        info = self._request("GET", "/health").json()
        self.max_body_bytes = self.max_body_bytes or info.get("max_body_bytes")
        return info

    def wait_ready(self, timeout_s: float = 300.0, poll_s: float = 0.5,
                   log=lambda msg: print(msg, file=sys.stderr, flush=True),
                   dead: Callable[[], str | None] | None = None) -> dict[str, Any]:
        """Poll /health until it answers (printing what it waits for), or raise after timeout_s.
        `dead`: for a server this process started, None while it runs, else how it ended: then
        one UserError line at once, not a wait for a server that will never answer."""
        deadline, said, last = time.monotonic() + timeout_s, 0.0, ""
        while True:
            why = dead() if dead is not None else None
            if why:
                raise UserError(f"the reference server this run started ({self.url}) {why} before it "
                                f"was ready; its own message is above")
            try:
                info = self._request("GET", "/health", timeout=min(10.0, self.timeout), retries=0)
            except RefServerAuthError:
                raise
            except (RefServerUnavailable, RefServerError) as e:
                last = str(e)
            else:
                info = info.json()
                if info.get("protocol_version") != codec.SCHEMA_VERSION:
                    raise UserError(f"ref server at {self.url} speaks protocol "
                                    f"{info.get('protocol_version')}, this client "
                                    f"{codec.SCHEMA_VERSION}; upgrade one of them")
                self.max_body_bytes = self.max_body_bytes or info.get("max_body_bytes")
                return info
            now = time.monotonic()
            if now >= deadline:
                raise RefServerUnavailable(f"ref server at {self.url} not ready after "
                                           f"{timeout_s:.0f} s (start it with: python "
                                           f"ref_server.py --model=...); last error: {last[:200]}")
            if now - said >= 10.0:
                log(f"waiting for ref server at {self.url} ... ({deadline - now:.0f} s left)")
                said = now
            time.sleep(min(poll_s, max(0.0, deadline - now)))

    def upload(self, batch: codec.RolloutBatch) -> str:
        """POST /upload -> the batch id ("queued", or already known: "duplicate", or "stale")."""
        batch_id = batch.batch_id or uuid.uuid4().hex
        r = self._request("POST", "/upload", codec.encode(replace(batch, batch_id=batch_id)))
        self.last_upload = r.json()
        return self.last_upload["batch_id"]

    def get(self, wait_s: float = 0.0, weight_version: int | None = None,
            prefer: str | None = None) -> codec.RolloutBatch | None:
        """GET /get -> the next ready batch (with ref_logprobs), or None when none is ready
        within wait_s. weight_version reports the consumer's version (for max_staleness);
        `prefer`: our own batch's id, handed back to us rather than to another rank."""
        params: dict[str, Any] = {"wait": wait_s, "request_id": uuid.uuid4().hex}  # same on retries
        if weight_version is not None:
            params["weight_version"] = weight_version
        if prefer is not None:
            params["prefer"] = prefer
        r = self._request("GET", "/get", params=params, timeout=self.timeout + wait_s)
        self.last_instance = r.headers.get("X-Instance")  # changes when the server restarted
        if r.status_code == 204:
            return None
        return codec.decode(r.content, codec.RolloutBatch)

    def logprobs(self, prompt_ids_BP: torch.Tensor, prompt_lens_B: torch.Tensor,
                 completion_ids_BC: torch.Tensor, completion_lens_B: torch.Tensor,
                 temperature: float = 1.0) -> torch.Tensor:
        """POST /logprobs -> reference log-probs [B, C] float32, 0 past each completion length,
        of log_softmax(logits / temperature) (the sampling temperature)."""
        req = codec.LogprobRequest(prompt_ids_BP, prompt_lens_B, completion_ids_BC,
                                   completion_lens_B, temperature=temperature)
        r = self._request("POST", "/logprobs", codec.encode(req))
        self.last_compute_ms = float(r.headers.get("X-Compute-Ms", "nan"))
        return codec.decode(r.content, codec.LogprobResponse).logprobs

    def stats(self) -> dict[str, Any]:
        """GET /stats -> counters (batches in/out/dropped, tokens/s, mean compute ms, ...)."""
        return self._request("GET", "/stats").json()

    def publish_weights(self, chunks: Iterable[bytes] | bytes, version: int) -> dict[str, Any]:
        """POST /weights?version=N with a safetensors file, streamed from `chunks` (e.g.
        wire.weights.iter_state_dict_safetensors). Not retried: a stream cannot be replayed."""
        try:
            r = self.session.post(self.url + "/weights", params={"version": version}, data=chunks,
                                  headers={"Content-Type": "application/octet-stream"},
                                  timeout=self.timeout)
        except (requests.ConnectionError, requests.Timeout) as e:
            raise RefServerUnavailable(f"publishing weights to {self.url} failed: {e}") from e
        if r.status_code >= 400:
            raise self._error(r)
        return r.json()

    def start_run(self, run_id: str) -> dict[str, Any]:
        """POST /run?id=RUN -> {"run_id", "reset", "dropped"}: another run than the server's last
        one drops that run's queued batches and published weights."""
        return self._request("POST", "/run", params={"id": run_id}).json()

    def weights_version(self, worker_id: str | None = None,
                        running_version: int | None = None) -> dict[str, Any]:
        """GET /weights/version -> {"version": N or None, "bytes", "digest"}; a worker_id also
        reports the version this worker runs (shown in /stats "workers")."""
        headers = {}
        if worker_id is not None:
            headers["X-Worker-Id"] = worker_id
            if running_version is not None:
                headers["X-Weight-Version"] = str(running_version)
        return self._request("GET", "/weights/version", headers=headers).json()

    def download_weights(self, dest: str | Path, expected_digest: str | None = None) -> Path:
        """GET /weights into dest: written to dest.part, resumed with Range + If-Range after a
        broken connection (up to `retries` times), then renamed over dest. Whatever version the
        server sends is taken: its X-Weight-Version and ETag (its digest, simple_grpo/wire/delta.py)
        come with the file it streams, the file is checked against that digest (and against
        expected_digest when given), and a resume answered with another version starts over, so
        two versions are never mixed. On success sets last_weights = {"version", "digest",
        "bytes"} of the file in dest;
        on failure dest and last_weights are untouched and RefServerError /
        RefServerUnavailable is raised."""
        dest = Path(dest)
        part, have, etag, total, last = dest.with_name(dest.name + ".part"), 0, None, None, ""
        got: dict[str, Any] = {}  # version and digest of the file the server is sending
        try:
            with open(part, "wb") as f:
                for attempt in range(self.retries + 1):
                    headers = {"Range": f"bytes={have}-", "If-Range": etag} if have else {}
                    try:
                        with self.session.get(self.url + "/weights", headers=headers, stream=True,
                                              timeout=self.timeout) as r:
                            if r.status_code >= 400 and r.status_code not in _RETRY_STATUS:
                                raise self._error(r)
                            if r.status_code == 206 and r.headers.get("ETag") != etag:
                                # a resume must continue the same file: never splice two versions
                                have, etag, got = 0, None, {}
                                f.seek(0)
                                f.truncate()
                                last = "the server resumed another version; starting over"
                            elif r.status_code in (200, 206):
                                if r.status_code == 200:  # a fresh start (or a newer version)
                                    have, etag = 0, r.headers["ETag"]
                                    f.seek(0)
                                    f.truncate()
                                    got = {"version": int(r.headers["X-Weight-Version"]),
                                           "digest": etag.strip('"')}
                                total = have + int(r.headers["Content-Length"])
                                _write_body(r, f)
                                have = f.tell()
                                if have == total:
                                    break
                                last = f"body ended after {have} of {total} bytes"
                            else:
                                last = str(self._error(r))
                    except (requests.ConnectionError, requests.Timeout,
                            requests.exceptions.ChunkedEncodingError) as e:
                        last = f"{type(e).__name__}: {e}"
                        have = f.tell()  # what arrived before the break: the resume point
                    if attempt < self.retries:
                        time.sleep(self._delay(attempt, None))
                else:
                    raise RefServerUnavailable(f"downloading weights from {self.url} failed "
                                               f"after {self.retries + 1} attempt(s): "
                                               f"{last[:300]}")
            try:
                digest = file_digest(part)[0]
            except DeltaError as e:
                raise RefServerError(200, f"downloaded weights are not a safetensors file: {e}",
                                     self.url) from None
            want = [w for w in (got["digest"], expected_digest) if w]
            if any(digest != w for w in want):
                raise RefServerError(200, f"downloaded weights have digest {digest}, "
                                          f"expected {' and '.join(want)}", self.url)
            os.replace(part, dest)
        except BaseException:
            part.unlink(missing_ok=True)
            raise
        self.last_weights = {**got, "bytes": have}
        return dest

    def publish_delta(self, chunks: Iterable[bytes], version: int, base: int) -> dict[str, Any]:
        """POST /weights/delta?from=BASE&version=N with a framed delta (simple_grpo/wire/delta.py).
        Not retried; RefServerError 412 means the server does not hold `base`: send the full file."""
        try:
            r = self.session.post(self.url + "/weights/delta", params={"version": version, "from": base},
                                  data=chunks, headers={"Content-Type": "application/octet-stream"},
                                  timeout=self.timeout)
        except (requests.ConnectionError, requests.Timeout) as e:
            raise RefServerUnavailable(f"publishing a weight delta to {self.url} failed: {e}") from e
        if r.status_code >= 400:
            raise self._error(r)
        return r.json()

    def download_delta(self, from_version: int, dest: str | Path,
                       digest: str | None = None) -> dict[str, Any] | None:
        """GET /weights/delta?from=U into dest (a chain file, simple_grpo/wire/delta.py) ->
        {"version", "links", "bytes"}; None when the server has no chain from U to offer (409:
        download the full file; `last_delta_refusal` says why); links 0 when U is current. A broken
        transfer is retried from the start (up to `retries` times). `digest`: that of our version
        U, so a server of another run refuses instead of sending deltas that cannot apply."""
        dest, last = Path(dest), ""
        params = {"from": from_version, **({"digest": digest} if digest else {})}
        for attempt in range(self.retries + 1):
            try:
                with self.session.request("GET", self.url + "/weights/delta", params=params,
                                          stream=True, timeout=self.timeout) as r:
                    if r.status_code == 409:
                        self.last_delta_refusal = self._error(r).message
                        return None
                    if r.status_code == 204:
                        return {"version": from_version, "links": 0, "bytes": 0}
                    if r.status_code >= 400 and r.status_code not in _RETRY_STATUS:
                        raise self._error(r)
                    if r.status_code == 200:
                        want = int(r.headers["Content-Length"])
                        with open(dest, "wb") as f:
                            have = _write_body(r, f)
                        if have == want:
                            return {"version": int(r.headers["X-Weight-Version"]),
                                    "links": int(r.headers["X-Delta-Links"]), "bytes": have}
                        last = f"body ended after {have} of {want} bytes"
                    else:
                        last = str(self._error(r))
            except (requests.ConnectionError, requests.Timeout,
                    requests.exceptions.ChunkedEncodingError) as e:
                last = f"{type(e).__name__}: {e}"
            if attempt < self.retries:
                time.sleep(self._delay(attempt, None))
        dest.unlink(missing_ok=True)
        raise RefServerUnavailable(f"downloading weight deltas from {self.url} failed after "
                                   f"{self.retries + 1} attempt(s): {last[:300]}")

    def close(self) -> None:
        self.session.close()

    def __enter__(self) -> "RefClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _write_body(r, f) -> int:
    """Stream a response body into the open file `f` in 1 MiB chunks -> bytes written."""
    n = 0
    for chunk in r.iter_content(1 << 20):
        f.write(chunk)
        n += len(chunk)
    return n
