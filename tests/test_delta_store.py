"""The server's side of weight deltas (simple_grpo/server/weight_store.py, weight_routes.py) and the
trainer's choice of delta or full file (simple_grpo/train/publish.py), over real HTTP on 127.0.0.1:
a delta upload is rebuilt into the full file and checked against the declared sha256, refused
with 412 when the server does not hold its base, the chain endpoint answers 204 / 409 with a
reason, the last K deltas survive a restart, and the publisher falls back to the full file when a
delta would not pay (or cannot apply)."""
from __future__ import annotations

import hashlib
import io

import pytest
import requests
import torch

from simple_grpo.server.weight_store import WeightStore
from simple_grpo.server.wsgi import ApiError
from simple_grpo.train.publish import WeightPublisher
from simple_grpo.wire import delta
from simple_grpo.wire.delta_apply import apply_chain_file
from simple_grpo.wire.client import RefClient, RefServerError
from simple_grpo.wire.weights import state_dict_safetensors_bytes


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def files(n: int, size: int = 3000) -> list[bytes]:
    """n consecutive versions of a small weights file, a few values apart."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(size, generator=g)
    out = []
    for _ in range(n):
        out.append(state_dict_safetensors_bytes({"w": w}, torch.bfloat16))
        w = w + (torch.rand(size, generator=g) < 0.05) * 0.1
    return out


def frame(old: bytes, new: bytes, a: int, b: int, **fields) -> bytes:
    enc = delta.encode_delta([old], [new], from_version=a, to_version=b)
    head = {**enc.header, **fields}
    return delta.pack(delta.MAGIC, head) + b"".join(enc.chunks())[len(delta.pack(delta.MAGIC, enc.header)):]


def test_delta_uploads_are_rebuilt_checked_and_kept_bounded(tmp_path):
    v = files(6)
    store = WeightStore(tmp_path, keep_deltas=2)
    store.publish([v[0]], 1)
    meta = store.delta_publish([frame(v[0], v[1], 1, 2)], 2, 1)
    assert meta == {"version": 2, "bytes": len(v[1]), "sha256": sha(v[1]), "dtype": "BF16",
                    "delta_bytes": len(frame(v[0], v[1], 1, 2))}
    assert (tmp_path / "weights.safetensors").read_bytes() == v[1]
    for bad, status, says in [
            (frame(v[1], v[2], 2, 3, sha256=sha(b"x")), 400, "expected"),    # a wrong declared sha256
            (frame(v[0], v[2], 2, 3), 412, "another file"),                   # made against another file
            (frame(v[1], v[2], 2, 3)[:-3], 400, "truncated"),
            (b"garbage" * 20, 400, "bad magic")]:
        with pytest.raises(ApiError) as e:
            store.delta_publish([bad], 3, 2)
        assert e.value.status == status and says in e.value.message, e.value.message
        assert store.current()["version"] == 2 and (tmp_path / "weights.safetensors").read_bytes() == v[1]
        assert sorted(p.name for p in tmp_path.iterdir()) == ["delta-1-2.sgwd", "weights.json",
                                                              "weights.safetensors"]
    with pytest.raises(ApiError) as e:  # the server holds version 2, not 1
        store.begin_delta(3, 1)
    assert e.value.status == 412 and "holds version 2" in e.value.message
    for u in (2, 3, 4):
        store.delta_publish([frame(v[u - 1], v[u], u, u + 1)], u + 1, u)
    assert [(d["from_version"], d["to_version"]) for d in store.deltas()] == [(3, 4), (4, 5)]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["delta-3-4.sgwd", "delta-4-5.sgwd",
                                                          "weights.json", "weights.safetensors"]
    again = WeightStore(tmp_path, keep_deltas=2)  # a restart keeps the chain
    assert again.current() == store.current() and again.deltas() == store.deltas()
    assert WeightStore(tmp_path, keep_deltas=1).deltas() == store.deltas()[1:]  # and K
    assert sorted(p.name for p in tmp_path.iterdir())[0] == "delta-4-5.sgwd"
    store.publish([v[0]], 9)  # a full upload: no delta leads to it
    assert store.deltas() == [] and len(list(tmp_path.iterdir())) == 2
    (tmp_path / "weights.safetensors").write_bytes(v[1])  # same length, another file: not served
    assert WeightStore(tmp_path).current() is None


def test_the_chain_endpoint(ref_server, tmp_path):
    v = files(5)
    srv = ref_server(weights_dir=str(tmp_path / "w"), weight_deltas=3)
    client = RefClient(srv.url, retries=0)
    assert requests.get(srv.url + "/weights/delta?from=0").status_code == 404
    client.publish_weights(v[0], version=1)
    for u in (1, 2, 3, 4):
        meta = client.publish_delta(frame(v[u - 1], v[u], u, u + 1), version=u + 1, base=u)
        assert meta["version"] == u + 1 and meta["sha256"] == sha(v[u])
    with pytest.raises(RefServerError) as e:
        client.publish_delta(frame(v[3], v[4], 4, 6), version=6, base=4)  # not the current version
    assert e.value.status == 412
    got = client.download_delta(2, tmp_path / "chain", sha256=sha(v[1]))
    assert got == {"version": 5, "links": 3, "bytes": (tmp_path / "chain").stat().st_size}
    (tmp_path / "base").write_bytes(v[1])
    links = apply_chain_file(tmp_path / "base", tmp_path / "chain", tmp_path / "out",
                                   base_sha256=sha(v[1]), from_version=2)
    assert [h["to_version"] for h in links] == [3, 4, 5] and (tmp_path / "out").read_bytes() == v[4]
    assert client.download_delta(5, tmp_path / "chain") == {"version": 5, "links": 0, "bytes": 0}
    for start, digest, reason in [(1, None, "older than the oldest delta kept (from 2"),
                                  (7, None, "newer than the server's 5"),
                                  (3, sha(v[1]), "another file")]:
        assert client.download_delta(start, tmp_path / "chain", sha256=digest) is None
        assert reason in client.last_delta_refusal, client.last_delta_refusal
    r = requests.get(srv.url + "/weights/delta?from=x")
    assert r.status_code == 400 and "from=VERSION" in r.json()["error"]
    st = client.stats()
    assert st["weights_egress"] == {"full_downloads": 0, "full_bytes": 0, "delta_downloads": 1,
                                    "delta_bytes": got["bytes"], "delta_links": 3, "delta_refused": 3}
    assert st["weights_ingress"]["delta_uploads"] == 4 and st["weights_ingress"]["full_uploads"] == 1
    assert [d["to_version"] for d in st["weight_deltas"]] == [3, 4, 5]


def test_no_deltas_kept_with_zero(ref_server, tmp_path):
    v = files(3)
    srv = ref_server(weights_dir=str(tmp_path / "w"), weight_deltas=0)
    client = RefClient(srv.url, retries=0)
    client.publish_weights(v[0], version=1)
    assert client.publish_delta(frame(v[0], v[1], 1, 2), version=2, base=1)["version"] == 2
    assert sorted(p.name for p in (tmp_path / "w").iterdir()) == ["weights.json", "weights.safetensors"]
    assert client.download_delta(1, tmp_path / "chain") is None
    assert requests.get(srv.url + "/weights").content == v[1]


def _randomize(model, seed: int) -> None:
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(std=0.05)


def test_the_publisher_sends_the_full_file_when_a_delta_does_not_pay(tiny_model, ref_server):
    srv = ref_server()
    client = RefClient(srv.url)
    model = type(tiny_model)(tiny_model.config)
    model.load_state_dict(tiny_model.state_dict())
    pub = WeightPublisher(RefClient(srv.url), dtype=torch.bfloat16, full_every=4)
    kinds = []

    def publish(v):
        pub.publish(model, version=v, wait=True)
        m = pub.metrics()
        assert m["published_version"] == v and m["publish_failures"] == 0
        kinds.append("delta" if m["publish_delta"] else "full")
        return m

    full = publish(1)["publish_bytes"]
    with torch.no_grad():
        model.model.embed_tokens.weight[:3] += 0.5  # a few rows move: a small delta
    m = publish(2)
    assert m["publish_bytes"] < 0.1 * full, (m, full)
    _randomize(model, 1)  # every value moves: the delta is not smaller than half the file
    publish(3)
    for v in (4, 5, 6, 7, 8):  # deltas again (the base is version 3), 3 in a row, then the full
        with torch.no_grad():  # file (full_every=4)
            model.model.embed_tokens.weight[v] += 0.5
        publish(v)
    client.start_run("x")
    client.start_run("y")  # a new run: the server drops its weights, the delta against 8 gets 412
    publish(9)
    assert kinds == ["full", "delta", "full", "delta", "delta", "delta", "full", "delta", "full"], kinds
    m = pub.metrics()
    st = client.stats()["weights_ingress"]
    assert (m["publish_deltas"], m["publish_fulls"]) == (st["delta_uploads"], st["full_uploads"]) == (5, 4)
    assert m["publish_bytes_total"] == st["full_bytes"] + st["delta_bytes"]
    assert st["full_bytes"] == 4 * full
    pub.close()


def test_hostile_delta_requests_get_4xx_and_change_nothing(ref_server, tmp_path):
    v = files(3)
    srv = ref_server(weights_dir=str(tmp_path / "w"), weight_deltas=2, token="s3cret")
    auth = {"Authorization": "Bearer s3cret"}
    client = RefClient(srv.url, token="s3cret", retries=0)
    client.publish_weights(v[0], version=1)
    good = frame(v[0], v[1], 1, 2)
    head = len(delta.pack(delta.MAGIC, delta.read_header(io.BytesIO(good))))
    big_header = delta.MAGIC + (1 << 30).to_bytes(4, "little") + good[12:]
    for query, body, status in [
            ("", good, 400), ("?from=1", good, 400), ("?from=x&version=2", good, 400),
            ("?from=2&version=2", good, 400), ("?from=-1&version=2", good, 400),
            ("?from=1&version=3", good, 400),                  # the delta says 1 -> 2
            ("?from=0&version=2", good, 412), ("?from=0&version=1", good, 409),
            ("?from=1&version=2", b"", 400), ("?from=1&version=2", b"garbage" * 9, 400),
            ("?from=1&version=2", big_header, 400),
            ("?from=1&version=2", frame(v[0], v[1], 1, 2, bytes=-1), 400),
            ("?from=1&version=2", frame(v[0], v[1], 1, 2, format="1"), 400),
            ("?from=1&version=2", good[:head] + b"\xff" * (len(good) - head), 400),
            ("?from=1&version=2", iter([good[:50], good[50:-1]]), 400)]:  # chunked, truncated
        r = requests.post(srv.url + "/weights/delta" + query, data=body, headers=auth)
        assert r.status_code == status, (query, r.status_code, r.text)
        assert "\n" not in r.json()["error"]
    assert requests.post(srv.url + "/weights/delta?from=1&version=2", data=good).status_code == 401
    assert requests.get(srv.url + "/weights/delta?from=1").status_code == 401
    for query, status in [("", 400), ("?from=", 400), ("?from=1.5", 400), ("?from=0&sha256=XYZ", 400),
                          ("?from=-1", 409), ("?from=99999999999999999999", 409), ("?from=1", 204)]:
        assert requests.get(srv.url + "/weights/delta" + query, headers=auth).status_code == status, query
    assert client.weights_version()["version"] == 1 and client.stats()["weight_deltas"] == []
    assert sorted(p.name for p in (tmp_path / "w").iterdir()) == ["weights.json", "weights.safetensors"]
    assert client.publish_delta(good, version=2, base=1)["sha256"] == sha(v[1])


def test_bytes_after_a_delta_or_after_a_chains_last_link_are_refused(ref_server, tmp_path):
    """A delta upload with bytes after its body is refused (400) and changes nothing; a chain file
    with bytes after its last link does not apply (DeltaError), and the worker's file is untouched."""
    v = files(3)
    srv = ref_server(weights_dir=str(tmp_path / "w"), weight_deltas=2)
    client = RefClient(srv.url, retries=0)
    client.publish_weights(v[0], version=1)
    with pytest.raises(RefServerError) as e:
        client.publish_delta(frame(v[0], v[1], 1, 2) + b"\x00" * 3, version=2, base=1)
    assert e.value.status == 400 and "trailing bytes" in e.value.message, e.value.message
    assert client.weights_version()["version"] == 1 and client.stats()["weight_deltas"] == []
    for u in (1, 2):
        client.publish_delta(frame(v[u - 1], v[u], u, u + 1), version=u + 1, base=u)
    assert client.download_delta(1, tmp_path / "chain", sha256=sha(v[0]))["links"] == 2
    chain = (tmp_path / "chain").read_bytes()
    (tmp_path / "base").write_bytes(v[0])
    for extra in (b"\x00", b"junk" * 100):
        (tmp_path / "chain").write_bytes(chain + extra)
        with pytest.raises(delta.DeltaError, match="trailing bytes"):
            apply_chain_file(tmp_path / "base", tmp_path / "chain", base_sha256=sha(v[0]), from_version=1)
        assert (tmp_path / "base").read_bytes() == v[0]
    (tmp_path / "chain").write_bytes(chain)  # the chain as sent applies
    apply_chain_file(tmp_path / "base", tmp_path / "chain", base_sha256=sha(v[0]), from_version=1)
    assert (tmp_path / "base").read_bytes() == v[2]


def test_two_uploads_racing_for_one_version(tmp_path):
    """Two uploads of version 2 start while the store holds 1 (both pass the check at the start);
    the first to commit becomes version 2, the other is refused (409) when it commits and leaves
    the first one's file and no temporary file behind; of two deltas of version 3 the second finds
its base replaced (412)."""
    v = files(4)
    store = WeightStore(tmp_path, keep_deltas=2)
    store.publish([v[0]], 1)
    first, second = store.begin(2), store.begin(2)
    first.write(v[1])
    second.write(v[2])
    meta = first.commit()
    with pytest.raises(ApiError) as e:
        second.commit()
    assert e.value.status == 409 and "not newer" in e.value.message
    assert store.current() == meta and meta["sha256"] == sha(v[1])
    assert (tmp_path / "weights.safetensors").read_bytes() == v[1]
    first, second = store.begin_delta(3, 2), store.begin_delta(3, 2)
    first.write(frame(v[1], v[2], 2, 3))
    second.write(frame(v[1], v[3], 2, 3))
    assert first.commit()["sha256"] == sha(v[2])
    with pytest.raises(ApiError) as e:
        second.commit()
    assert e.value.status == 412 and "holds version 3" in e.value.message  # its base is gone
    assert store.current()["sha256"] == sha(v[2]) and (tmp_path / "weights.safetensors").read_bytes() == v[2]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["delta-2-3.sgwd", "weights.json",
                                                          "weights.safetensors"]


def test_uploaded_and_rebuilt_weight_files_are_fsynced(ref_server, tmp_path, monkeypatch):
    """Every file the server makes current is on disk first: the full upload, the file it rebuilds
    from a delta, and the delta it keeps (os.fsync on each, seen by the inode it syncs)."""
    import os

    synced, real = set(), os.fsync

    def spy(fd):
        st = os.fstat(fd)
        synced.add((st.st_dev, st.st_ino))
        return real(fd)
    monkeypatch.setattr(os, "fsync", spy)

    def inode(path):
        st = path.stat()
        return st.st_dev, st.st_ino
    v = files(2)
    folder = tmp_path / "w"
    client = RefClient(ref_server(weights_dir=str(folder), weight_deltas=2).url, retries=0)
    client.publish_weights(v[0], version=1)
    assert inode(folder / "weights.safetensors") in synced
    synced.clear()
    assert client.publish_delta(frame(v[0], v[1], 1, 2), version=2, base=1)["sha256"] == sha(v[1])
    assert (folder / "weights.safetensors").read_bytes() == v[1]
    assert inode(folder / "weights.safetensors") in synced, "the rebuilt file was not fsynced"
    assert inode(folder / "delta-1-2.sgwd") in synced, "the kept delta was not fsynced"
