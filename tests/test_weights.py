"""Weight publishing over real HTTP on 127.0.0.1 (tiny model): streamed publish -> version ->
download gives exactly the tensors (or their bf16 cast), versions must increase, bad or oversize
uploads are refused and leave the previous version served, auth, resumable and consistent
downloads, worker version reports in /stats; and the streamed serialiser against safetensors."""
from __future__ import annotations

import io
import json
import threading

import pytest
import requests
import safetensors.torch
import torch

from simple_grpo.server.weight_store import WeightStore
from simple_grpo.wire.client import RefClient, RefServerAuthError, RefServerError
from simple_grpo.wire.weights import (InvalidWeights, check_safetensors, iter_state_dict_safetensors,
                                      load_safetensors_file, state_dict_safetensors_bytes)
from conftest import file_version_digest as sha


def assert_tensors_equal(got: dict, want: dict) -> None:
    assert got.keys() == want.keys()
    for k, v in want.items():
        assert got[k].dtype == v.dtype and torch.equal(got[k], v), k


def test_streamed_serialiser_matches_safetensors(tiny_model):
    sd = tiny_model.state_dict()
    chunks = list(iter_state_dict_safetensors(sd, chunk_bytes=4096))
    assert len(chunks) > len(sd)  # header + tensors, big ones split
    data = b"".join(chunks)
    assert_tensors_equal(safetensors.torch.load(data), sd)
    ref = safetensors.torch.save({k: v.clone() for k, v in sd.items()})
    assert_tensors_equal(safetensors.torch.load(data), safetensors.torch.load(ref))
    check_safetensors(io.BytesIO(ref), len(ref))  # the library's own files pass our check
    bf16 = safetensors.torch.load(state_dict_safetensors_bytes(sd, torch.bfloat16))
    assert_tensors_equal(bf16, {k: v.to(torch.bfloat16) for k, v in sd.items()})
    mixed = {"i": torch.arange(5), "b": torch.tensor([True, False]), "e": torch.zeros(0, 3)}
    assert_tensors_equal(safetensors.torch.load(state_dict_safetensors_bytes(mixed)), mixed)


@pytest.mark.parametrize("bad", [b"", b"\x00" * 7, b"\xff" * 64, b"\x05" + b"\x00" * 7 + b"[1,2]",
                                 "truncated", "trailing", "overlap"])
def test_check_safetensors_rejects(bad):
    good = state_dict_safetensors_bytes({"a": torch.ones(3), "b": torch.ones(2, 2)})
    if bad == "truncated":
        bad = good[:-1]
    elif bad == "trailing":
        bad = good + b"\x00"
    elif bad == "overlap":
        n = int.from_bytes(good[:8], "little")
        h = json.loads(good[8:8 + n])
        h["b"]["data_offsets"] = [0, 16]
        raw = json.dumps(h).encode()
        bad = len(raw).to_bytes(8, "little") + raw + good[8 + n:8 + n + 16]
    with pytest.raises(InvalidWeights):
        check_safetensors(io.BytesIO(bad), len(bad))


def test_store_versions_and_restart(tmp_path):
    store = WeightStore(tmp_path)
    assert store.current() is None and store.open() is None
    data = state_dict_safetensors_bytes({"w": torch.arange(6.0)})
    meta = store.publish([data[:5], data[5:]], 3)
    assert meta == {"version": 3, "bytes": len(data), "digest": sha(data), "dtype": "F32"}
    assert json.loads((tmp_path / "weights.json").read_text()) == meta
    with pytest.raises(Exception, match="not newer"):
        store.publish([data], 3)
    assert WeightStore(tmp_path).current() == meta  # survives a restart
    assert sorted(p.name for p in tmp_path.iterdir()) == ["full.json", "weights.json", "weights.safetensors"]


def test_publish_download_roundtrip_and_workers(ref_server, tiny_model, tmp_path):
    srv = ref_server(weights_dir=str(tmp_path / "w"))
    client = RefClient(srv.url, retries=1, backoff_s=0.01)
    assert client.weights_version() == {"version": None, "run_id": None}
    r = requests.get(srv.url + "/weights")
    assert r.status_code == 404 and "no weights" in r.json()["error"]
    sd = tiny_model.state_dict()
    meta = client.publish_weights(iter_state_dict_safetensors(sd, chunk_bytes=8192), version=1)
    assert meta["version"] == 1 and meta["dtype"] == "F32"
    assert client.weights_version("gen-0", running_version=0) == {**meta, "run_id": None}
    dest = client.download_weights(tmp_path / "policy.safetensors", expected_digest=meta["digest"])
    assert_tensors_equal(load_safetensors_file(dest), sd)
    assert client.last_weights == {"version": 1, "digest": meta["digest"], "bytes": meta["bytes"]}

    meta2 = client.publish_weights(state_dict_safetensors_bytes(sd, torch.bfloat16), version=5)
    assert meta2["version"] == 5 and meta2["dtype"] == "BF16"
    client.weights_version("gen-1", running_version=5)
    client.download_weights(dest)
    assert_tensors_equal(load_safetensors_file(dest), {k: v.bfloat16() for k, v in sd.items()})
    for v in (5, 4):
        with pytest.raises(RefServerError) as e:
            client.publish_weights(state_dict_safetensors_bytes(sd), version=v)
        assert e.value.status == 409 and "not newer" in e.value.message
    stats = client.stats()
    assert stats["weights"]["version"] == 5
    assert stats["workers"]["gen-0"]["version"] == 0 and stats["workers"]["gen-1"]["version"] == 5
    assert 0 <= stats["workers"]["gen-0"]["last_seen_s_ago"] < 60
    r = requests.get(srv.url + "/weights/version", headers={"X-Worker-Id": "x y"})
    assert r.status_code == 400


def test_bad_uploads_keep_previous_version(ref_server, tmp_path):
    srv = ref_server(max_weights_mb=0.01)  # 10 KiB; default temporary weights folder
    client = RefClient(srv.url, retries=0)
    good = state_dict_safetensors_bytes({"w": torch.arange(100.0)})
    meta = client.publish_weights(good, version=1)
    for body in (good[:-7], b"garbage" * 10, good + b"x"):
        with pytest.raises(RefServerError) as e:
            client.publish_weights(body, version=2)
        assert e.value.status == 400 and "invalid weights" in e.value.message
    big = state_dict_safetensors_bytes({"w": torch.zeros(4000)})
    for body in (big, iter([big[:9000], big[9000:]])):  # declared length, then chunked
        with pytest.raises(RefServerError) as e:
            client.publish_weights(body, version=2)
        assert e.value.status == 413
    r = requests.post(srv.url + "/weights", data=good)
    assert r.status_code == 400 and "version" in r.json()["error"]
    assert client.weights_version() == {**meta, "run_id": None}
    assert requests.get(srv.url + "/weights").content == good
    assert client.stats()["rejected"] >= 6


def test_auth_required(ref_server):
    srv = ref_server(token="s3cret")
    good = state_dict_safetensors_bytes({"w": torch.ones(4)})
    for method, path in (("POST", "/weights?version=1"), ("GET", "/weights"),
                         ("GET", "/weights/version")):
        r = requests.request(method, srv.url + path, data=good if method == "POST" else None)
        assert r.status_code == 401 and "token" in r.json()["error"]
    with pytest.raises(RefServerAuthError):
        RefClient(srv.url, token="wrong").publish_weights(good, version=1)
    assert RefClient(srv.url, token="s3cret").publish_weights(good, version=1)["version"] == 1


def test_interrupted_download_resumes_and_stays_consistent(ref_server, tmp_path):
    srv = ref_server()
    client = RefClient(srv.url, retries=2, backoff_s=0.01)
    v1 = state_dict_safetensors_bytes({"w": torch.randn(300_000)})  # 1.2 MB
    meta = client.publish_weights(v1, version=1)
    etag = f'"{meta["digest"]}"'
    with requests.get(srv.url + "/weights", stream=True) as r:  # read half, then hang up
        assert r.status_code == 200 and r.headers["ETag"] == etag
        assert int(r.headers["Content-Length"]) == len(v1) and r.headers["X-Weight-Version"] == "1"
        half = r.raw.read(len(v1) // 2)
    r = requests.get(srv.url + "/weights", headers={"Range": f"bytes={len(half)}-",
                                                     "If-Range": etag})
    assert r.status_code == 206
    assert r.headers["Content-Range"] == f"bytes {len(half)}-{len(v1) - 1}/{len(v1)}"
    assert sha(half + r.content) == meta["digest"]
    assert requests.get(srv.url + "/weights", headers={"Range": "bytes=2-5"}).content == v1[2:6]
    assert requests.get(srv.url + "/weights",
                        headers={"Range": f"bytes={len(v1)}-"}).status_code == 416

    # a publish during a download: the open download stays version 1 to the end
    v2 = state_dict_safetensors_bytes({"w": torch.randn(300_000)})
    with requests.get(srv.url + "/weights", stream=True) as r:
        first = r.raw.read(1000)
        meta2 = client.publish_weights(v2, version=2)
        assert first + r.raw.read() == v1
    r = requests.get(srv.url + "/weights", headers={"Range": "bytes=1000-", "If-Range": etag})
    assert r.status_code == 200 and r.content == v2  # a stale resume gets the whole new file

    # the client resumes by itself after a broken connection
    real_get, calls = client.session.get, []

    def flaky_get(*a, **kw):
        resp = real_get(*a, **kw)
        calls.append(kw.get("headers"))
        if len(calls) == 1:
            def broken(n, _it=resp.iter_content):
                it = _it(n)
                yield next(it)
                raise requests.exceptions.ChunkedEncodingError("connection broken")
            resp.iter_content = broken
        return resp

    client.session.get = flaky_get
    dest = tmp_path / "p.safetensors"
    assert client.download_weights(dest) == dest and dest.read_bytes() == v2
    assert calls[0] == {} and calls[1]["Range"] == "bytes=1048576-"
    assert calls[1]["If-Range"] == f'"{meta2["digest"]}"'

    # a failed download leaves the old file untouched and no temp file behind
    client.session.get = real_get
    with pytest.raises(RefServerError, match="digest"):
        client.download_weights(dest, expected_digest="0" * 32)
    assert dest.read_bytes() == v2 and sorted(tmp_path.iterdir()) == [dest]


def test_large_cap_only_for_weight_uploads(ref_server):
    """waitress's cap is raised for POST /weights alone: an /upload that declares more than
    max_body_mb is answered 413 right after its headers, without the server waiting for a body."""
    import socket
    from urllib.parse import urlparse

    srv = ref_server(max_body_mb=1.0, max_weights_mb=64.0)
    u = urlparse(srv.url)
    with socket.create_connection((u.hostname, u.port), timeout=5) as s:
        s.sendall(b"POST /upload HTTP/1.1\r\nHost: x\r\nContent-Length: 33554432\r\n\r\n")  # 32 MiB
        data = b""
        while chunk := s.recv(4096):  # the server closes the connection after a 413
            data += chunk
        answer = data.decode("latin-1")
    assert answer.startswith("HTTP/1.1 413"), answer[:200]
    assert '"error"' in answer


def test_publish_during_download_completes_with_the_version_sent(ref_server, tmp_path):
    """A publish (from another thread) between the first and last chunk of a slow download: the
    download finishes in one GET with the version it was sending (that version's digest), and the
    next download gets the new version."""
    srv = ref_server()
    client = RefClient(srv.url, retries=2, backoff_s=0.01)
    v1 = state_dict_safetensors_bytes({"w": torch.randn(1_000_000)})  # 4 MB: over socket buffers
    v2 = state_dict_safetensors_bytes({"w": torch.randn(1_000_000)})
    client.publish_weights(v1, version=1)
    trainer = RefClient(srv.url)
    real_get, sent, published = client.session.get, [], []

    def slow_get(*a, **kw):
        resp = real_get(*a, **kw)
        sent.append(resp.headers["X-Weight-Version"])

        def throttled(n, _it=resp.iter_content):
            for i, piece in enumerate(_it(64 << 10)):  # the reading side is slow
                if i == 1 and not published:
                    t = threading.Thread(target=lambda: published.append(
                        trainer.publish_weights(v2, version=2)))
                    t.start()
                    t.join()
                yield piece
        resp.iter_content = throttled
        return resp

    client.session.get = slow_get
    dest = tmp_path / "p.safetensors"
    client.download_weights(dest)
    assert published[0]["version"] == 2  # it landed mid-download
    assert sent == ["1"]  # one GET: nothing refused, nothing retried
    assert dest.read_bytes() == v1
    assert client.last_weights == {"version": 1, "digest": sha(v1), "bytes": len(v1)}
    client.download_weights(dest)
    assert sent == ["1", "2"] and dest.read_bytes() == v2
    assert client.last_weights == {"version": 2, "digest": sha(v2), "bytes": len(v2)}


@pytest.mark.parametrize("if_range_kept", [True, False])
def test_resumed_download_after_a_publish_never_mixes_versions(ref_server, tmp_path, if_range_kept):
    """The connection breaks after 1 MiB of version 1, the trainer publishes version 2 (same size),
    the client resumes: with If-Range the server sends all of version 2 (200); when something in
    between drops If-Range the server resumes version 2's bytes (206, another ETag) and the client
    starts over. Either way the file is exactly version 2, never version 1's head + 2's tail."""
    srv = ref_server()
    client = RefClient(srv.url, retries=3, backoff_s=0.01)
    v1 = state_dict_safetensors_bytes({"w": torch.randn(600_000)})  # 2.4 MB
    v2 = state_dict_safetensors_bytes({"w": torch.randn(600_000)})
    assert len(v1) == len(v2)  # a splice would have the right length: only the check can tell
    client.publish_weights(v1, version=1)
    trainer = RefClient(srv.url)
    real_get, calls = client.session.get, []

    def flaky_get(*a, **kw):
        asked = dict(kw.get("headers") or {})
        if not if_range_kept:
            kw["headers"] = {k: v for k, v in asked.items() if k != "If-Range"}
        resp = real_get(*a, **kw)
        calls.append((asked.get("Range"), resp.status_code, resp.headers["X-Weight-Version"]))
        if len(calls) == 1:
            def broken(n, _it=resp.iter_content):
                it = _it(n)
                yield next(it)
                trainer.publish_weights(v2, version=2)  # while the worker is disconnected
                raise requests.exceptions.ChunkedEncodingError("connection broken")
            resp.iter_content = broken
        return resp

    client.session.get = flaky_get
    dest = tmp_path / "p.safetensors"
    client.download_weights(dest)
    resume = "bytes=1048576-"
    if if_range_kept:
        assert calls == [(None, 200, "1"), (resume, 200, "2")]
    else:
        assert calls == [(None, 200, "1"), (resume, 206, "2"), (None, 200, "2")]
    assert dest.read_bytes() == v2
    assert client.last_weights == {"version": 2, "digest": sha(v2), "bytes": len(v2)}
    assert sorted(tmp_path.iterdir()) == [dest]


def test_a_resumed_download_appends_the_rest_and_egress_counts_bytes_sent(ref_server, tmp_path):
    """The connection breaks after the first MiB; the resume (206, the same ETag) appends exactly
    the missing bytes: two GETs, no third one from the start. /stats egress counts what each
    response sends: the whole file for the first, the rest for the resume, a range's length."""
    srv = ref_server()
    client = RefClient(srv.url, retries=3, backoff_s=0.01)
    data = state_dict_safetensors_bytes({"w": torch.randn(600_000)})  # 2.4 MB
    client.publish_weights(data, version=1)
    real_get, calls = client.session.get, []

    def flaky_get(*a, **kw):
        resp = real_get(*a, **kw)
        calls.append(((kw.get("headers") or {}).get("Range"), resp.status_code))
        if len(calls) == 1:
            def broken(n, _it=resp.iter_content):
                yield next(_it(n))
                raise requests.exceptions.ChunkedEncodingError("connection broken")
            resp.iter_content = broken
        return resp

    client.session.get = flaky_get
    dest = tmp_path / "p.safetensors"
    client.download_weights(dest)
    assert calls == [(None, 200), ("bytes=1048576-", 206)]
    assert dest.read_bytes() == data and client.last_weights["bytes"] == len(data)
    egress = client.stats()["weights_egress"]
    assert egress["full_downloads"] == 2 and egress["full_bytes"] == 2 * len(data) - (1 << 20)

    sent = [requests.get(srv.url + "/weights", headers={"Range": r}).content
            for r in ("bytes=10-19", "bytes=2000000-", f"bytes=100-{10 ** 9}")]
    assert sent == [data[10:20], data[2_000_000:], data[100:]]
    egress2 = client.stats()["weights_egress"]
    assert egress2["full_downloads"] == 5
    assert egress2["full_bytes"] - egress["full_bytes"] == sum(map(len, sent))
