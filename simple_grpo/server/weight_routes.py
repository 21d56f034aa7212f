"""Weight publishing on the reference server: the trainer POSTs its policy weights (safetensors),
generation workers poll the version and download the file.

    POST /weights?version=N   body = a safetensors file (Content-Length or chunked), streamed to
                              disk -> 200 {"version", "bytes", "digest", "dtype"}; 400 invalid
                              body or version, 409 version not newer than the current, 413 too big
    GET  /weights/version     200 {"version": N | null, "bytes", "digest", "dtype", "run_id"}; headers
                              X-Worker-Id + X-Weight-Version record what a worker runs (/stats)
    GET  /weights             the current file (Content-Length, ETag = "digest", X-Weight-Version),
                              rebuilt from the deltas first when the full file trails the latest;
                              Range: bytes=START- (or START-END) -> 206 to resume (If-Range with
                              the ETag: a newer version answers 200 with the whole new file);
                              404 when nothing is published, 416 for an unsatisfiable range
    POST /weights/delta?from=P&version=N   body = a delta (simple_grpo/wire/delta.py) of version N
                              against P, whose header is checked and which is kept as the newest
                              link (nothing rebuilt) -> 200 {"version", "bytes", "digest", "dtype",
                              "delta_bytes"}; 412 when the current version is not P or has
                              another digest (send the full file), 400 a bad delta, 409 not
                              newer, 413 too big
    GET  /weights/delta?from=U[&digest=D]  the chain of kept deltas from version U (whose digest is
                              D) to the current one, streamed from the files without holding a
                              request thread: 200 (X-Weight-Version, X-Delta-Links, ETag = the
                              result's digest); 204 when U is current; 409 when there
                              is none (U too old, no delta from U, U newer or another file, e.g.
                              a new run): download GET /weights
    POST /run?id=RUN          a trainer starts (or resumes) run RUN -> 200 {"run_id", "reset",
                              "dropped"}: another run than the last one drops the queue's batches
                              and the published weights (their versions counted the old run's
                              steps); the same run (a resume), or the first run a server sees,
                              keeps both. The run is kept beside the weights (--weights_dir
                              run.json), so a restarted server knows whose weights it holds
"""
from __future__ import annotations

import bisect
import os
import re
import threading
import time
from typing import Any

import bottle

from simple_grpo.server.weight_store import WeightStore
from simple_grpo.server.wsgi import ApiError, iter_body, json_response, raw_header
from simple_grpo.wire import delta

_RANGE = re.compile(r"bytes=(\d+)-(\d*)")
_DIGEST = re.compile(r"[0-9a-f]{32}")
_WORKER_ID = re.compile(r"[A-Za-z0-9_.:@-]{1,128}")
MAX_WORKERS = 4096  # bound on remembered worker ids


class WorkerTable:
    """Which weight version each generation worker last reported, and when."""

    def __init__(self):
        self._lock = threading.Lock()
        self._seen: dict[str, tuple[int | None, float]] = {}

    def report(self, worker_id: str, version: int | None) -> None:
        with self._lock:
            self._seen.pop(worker_id, None)
            self._seen[worker_id] = (version, time.monotonic())
            while len(self._seen) > MAX_WORKERS:
                self._seen.pop(next(iter(self._seen)))

    def stats(self) -> dict[str, Any]:
        now = time.monotonic()
        with self._lock:
            seen = list(self._seen.items())
        return {w: {"version": v, "last_seen_s_ago": now - t} for w, (v, t) in seen}


class Traffic:
    """Weight bytes in and out, for /stats: "weights_egress" (responses started: full files and
    delta chains, and the chain requests answered 409 "download the full file") and
    "weights_ingress" (uploads committed, full or delta)."""

    def __init__(self):
        self._lock = threading.Lock()
        self.egress = {"full_downloads": 0, "full_bytes": 0, "delta_downloads": 0, "delta_bytes": 0,
                       "delta_links": 0, "delta_refused": 0}
        self.ingress = {"full_uploads": 0, "full_bytes": 0, "delta_uploads": 0, "delta_bytes": 0}

    def add(self, table: str, **counts: int) -> None:
        with self._lock:
            for k, n in counts.items():
                getattr(self, table)[k] += n

    def stats(self) -> dict[str, Any]:
        with self._lock:
            return {"weights_egress": dict(self.egress), "weights_ingress": dict(self.ingress)}


class ChainReader:
    """A chain's bytes as one seekable file (its header, then each link's file): a body like this
    goes to waitress's wsgi.file_wrapper, which feeds the socket from it without holding a
    request thread for the whole transfer (a generator body would, and waitress only takes a
    file it can seek to size it)."""

    def __init__(self, head: bytes, files: list):
        self.head, self.files, self.pos = head, list(files), 0
        self.starts, at = [], len(head)  # where each file's bytes begin in the chain
        for f in self.files:
            self.starts.append(at)
            at += os.fstat(f.fileno()).st_size
        self.size = at

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.pos

    def seek(self, offset: int, whence: int = 0) -> int:
        self.pos = {0: 0, 1: self.pos, 2: self.size}[whence] + offset
        return self.pos

    def read(self, n: int = -1) -> bytes:
        n = self.size - self.pos if n is None or n < 0 else min(n, self.size - self.pos)
        out = []
        while n > 0:
            if self.pos < len(self.head):
                piece = self.head[self.pos:self.pos + n]
            else:
                i = bisect.bisect_right(self.starts, self.pos) - 1
                self.files[i].seek(self.pos - self.starts[i])
                end = self.starts[i + 1] if i + 1 < len(self.starts) else self.size
                piece = self.files[i].read(min(n, end - self.pos))
                if not piece:
                    break  # a file shorter than it was: the client sees a short body
            out.append(piece)
            self.pos += len(piece)
            n -= len(piece)
        return b"".join(out)

    def close(self) -> None:
        for f in self.files:
            f.close()


def add_weight_routes(app: bottle.Bottle, state, handler, store: WeightStore) -> WorkerTable:
    """Add the /weights endpoints to `make_app`'s app (its auth hook applies; `handler` is its
    `api_handler(state)`, for JSON errors) and the "weights", "weight_deltas", "workers",
    "weights_egress" and "weights_ingress" entries to /stats."""
    workers, traffic = WorkerTable(), Traffic()
    limit = state.cfg.max_weights_bytes
    state.stats_hooks.append(lambda: {"weights": store.current() or {"version": None},
                                      "weight_deltas": store.deltas(), "workers": workers.stats(),
                                      **traffic.stats()})

    def receive(writer) -> dict[str, Any]:
        try:
            for chunk in iter_body(bottle.request.environ, limit, required=True):
                writer.write(chunk)
        except BaseException:
            writer.abort()
            raise
        return writer.commit()

    @app.post("/weights")
    @handler
    def publish():
        try:
            version = int(bottle.request.query["version"])
        except (KeyError, ValueError):
            raise ApiError(400, "POST /weights needs ?version=N (an int >= 0)") from None
        meta = receive(store.begin(version))
        traffic.add("ingress", full_uploads=1, full_bytes=meta["bytes"])
        return json_response(meta)

    @app.post("/weights/delta")
    @handler
    def publish_delta():
        try:
            version, base = int(bottle.request.query["version"]), int(bottle.request.query["from"])
        except (KeyError, ValueError):
            raise ApiError(400, "POST /weights/delta needs ?from=P&version=N (ints)") from None
        meta = receive(store.begin_delta(version, base))
        traffic.add("ingress", delta_uploads=1, delta_bytes=meta["delta_bytes"])
        return json_response(meta)

    @app.get("/weights/delta")
    @handler
    def chain():
        q = bottle.request.query
        try:
            start = int(q["from"])
        except (KeyError, ValueError):
            raise ApiError(400, "GET /weights/delta needs ?from=VERSION (an int)") from None
        digest = q.get("digest") or None
        if digest is not None and not _DIGEST.fullmatch(digest):
            raise ApiError(400, "digest must be 32 lowercase hex digits")
        meta, links, files = store.open_chain(start, digest)
        headers = {"X-Weight-Version": str(meta["version"]), "ETag": f'"{meta["digest"]}"'}
        if links is None:  # `files` says why: the worker downloads the full file
            traffic.add("egress", delta_refused=1)
            return json_response({"error": f"no delta chain: {files}; download GET /weights",
                                  "full": True}, 409, headers)
        if not links:
            return bottle.HTTPResponse(status=204, headers=headers)
        head = delta.pack_chain([{k: d[k] for k in ("from_version", "to_version", "bytes")}
                                 for d in links])
        size = len(head) + sum(d["bytes"] for d in links)
        traffic.add("egress", delta_downloads=1, delta_bytes=size, delta_links=len(links))

        return bottle.HTTPResponse(ChainReader(head, files), status=200, headers={
            **headers, "Content-Type": "application/octet-stream", "Content-Length": str(size),
            "X-Weight-Version": str(links[-1]["to_version"]), "X-Delta-Links": str(len(links))})

    run = {"id": None}

    @app.post("/run")
    @handler
    def start_run():
        rid = bottle.request.query.get("id", "")
        if not _WORKER_ID.fullmatch(rid):
            raise ApiError(400, "POST /run needs ?id=RUN ([A-Za-z0-9_.:@-]{1,128})")
        known = run["id"] if run["id"] is not None else store.saved_run()  # a restarted server:
        reset = known is not None and rid != known  # the run of the weights its --weights_dir holds
        dropped = 0
        if reset:
            dropped = state.queue.reset()
            store.reset()
        run["id"] = rid
        store.save_run(rid)
        return json_response({"run_id": rid, "reset": reset, "dropped": dropped})

    @app.get("/weights/version")
    @handler
    def version():
        wid = raw_header("X-Worker-Id")
        if wid is not None:
            running = raw_header("X-Weight-Version")
            if not _WORKER_ID.fullmatch(wid):
                raise ApiError(400, "X-Worker-Id must match [A-Za-z0-9_.:@-]{1,128}")
            try:
                running = None if running in (None, "") else int(running)
            except ValueError:
                raise ApiError(400, "X-Weight-Version must be an int") from None
            workers.report(wid, running)
        return json_response({**(store.current() or {"version": None}), "run_id": run["id"]})

    @app.get("/weights")
    @handler
    def download():
        opened = store.open()
        if opened is None:
            raise ApiError(404, "no weights published yet")
        meta, f = opened
        try:
            size, etag = meta["bytes"], f'"{meta["digest"]}"'
            headers = {"Content-Type": "application/octet-stream", "ETag": etag,
                       "X-Weight-Version": str(meta["version"]), "Accept-Ranges": "bytes"}
            start, end, status = 0, size - 1, 200
            rng = raw_header("Range")
            if_range = raw_header("If-Range")
            if rng and (if_range is None or if_range == etag):
                m = _RANGE.fullmatch(rng.strip())
                if m is None:
                    raise ApiError(400, f"unsupported Range {rng[:60]!r} (use bytes=START-)")
                start = int(m[1])
                end = min(int(m[2]), size - 1) if m[2] else size - 1
                if start >= size or end < start:
                    raise ApiError(416, f"range {rng[:60]!r} outside the {size}-byte file",
                                   {"Content-Range": f"bytes */{size}", **headers})
                status = 206
                headers["Content-Range"] = f"bytes {start}-{end}/{size}"
            headers["Content-Length"] = str(end - start + 1)
            f.seek(start)
        except BaseException:
            f.close()
            raise
        traffic.add("egress", full_downloads=1, full_bytes=end - start + 1)
        # a file body goes to waitress's wsgi.file_wrapper: the socket is fed from the open file
        # without holding a worker thread, and the file stays this version even if replaced
        return bottle.HTTPResponse(f, status=status, headers=headers)

    return workers
