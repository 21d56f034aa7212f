"""The server's side of weight deltas (simple_grpo/server/weight_store.py, weight_routes.py) and the
trainer's choice of delta or full file (simple_grpo/train/publish.py), over real HTTP on 127.0.0.1:
a delta upload is checked (its header; 412 unless the server holds its base version and digest) and
kept as a link; the full file follows in the background every max(keep, 1) links and on a full
download, byte-identical to the version's file; links that do not rebuild are dropped; old links
stay bounded; a restart keeps the chain from the full file; the chain endpoint answers 204 / 409
with a reason; the publisher falls back to the full file when a delta would not pay or apply."""
from __future__ import annotations

import io
import threading
import time

import pytest
import requests
import torch

from simple_grpo.server.weight_store import WeightStore
from simple_grpo.server.wsgi import ApiError
from simple_grpo.train.publish import WeightPublisher
from simple_grpo.wire import delta
from simple_grpo.wire.client import RefClient, RefServerError
from simple_grpo.wire.delta_apply import apply_chain_file
from simple_grpo.wire.weights import iter_state_dict_safetensors, state_dict_safetensors_bytes
from conftest import file_version_digest as digest

BASE_FILES = ["full.json", "weights.json", "weights.safetensors"]


def files(n: int, size: int = 3000) -> tuple[list[dict[str, torch.Tensor]], list[bytes]]:
    """n consecutive versions of small bf16 weights -> (their tensors, their files): "w" moves a
    few values a version (a sparse tensor), "b" never (an unchanged one)."""
    g = torch.Generator().manual_seed(0)
    w, b = torch.randn(size, generator=g), torch.randn(16, generator=g)
    tensors = []
    for _ in range(n):
        tensors.append({"w": w.to(torch.bfloat16), "b": b.to(torch.bfloat16)})
        w = w + (torch.rand(size, generator=g) < 0.05) * 0.1
    return tensors, [state_dict_safetensors_bytes(t) for t in tensors]


def frame(old: dict, new: dict, a: int, b: int, **fields) -> bytes:
    """The delta a -> b from tensors `old` to `new` (format 2), header `fields` overridden."""
    enc, _, _ = delta.encode(clone(old), new, next(iter_state_dict_safetensors(new)), from_version=a,
                             to_version=b, base_digest=digest(state_dict_safetensors_bytes(old)),
                             file_bytes=len(state_dict_safetensors_bytes(new)))
    with enc:
        body = b"".join(enc.chunks())[len(delta.pack(delta.MAGIC, enc.header)):]
        return delta.pack(delta.MAGIC, {**enc.header, **fields}) + body


def clone(tensors: dict) -> dict:
    return {k: t.clone() for k, t in tensors.items()}


def same(a: dict, b: dict) -> bool:  # bit for bit
    return list(a) == list(b) and all(torch.equal(a[k].view(torch.int16), b[k].view(torch.int16)) for k in a)


def listing(folder) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def wait_for(cond, what: str, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


def test_delta_uploads_are_linked_checked_rebuilt_and_kept_bounded(tmp_path):
    t, v = files(7)
    store = WeightStore(tmp_path, keep_deltas=2)
    store.publish([v[0]], 1)
    up = frame(t[0], t[1], 1, 2)
    meta = store.delta_publish([up], 2, 1)
    assert meta == {"version": 2, "bytes": len(v[1]), "digest": digest(v[1]), "dtype": "BF16",
                    "delta_bytes": len(up)} and len(up) < len(v[1]) // 2
    cur = store.current()  # the latest version moves; the full file stays version 1 (no rebuild)
    assert cur == {k: meta[k] for k in ("version", "bytes", "digest", "dtype")} and store.full_version() == 1
    for bad, status, says in [
            (frame(t[0], t[2], 2, 3), 412, "holds another file"),         # against version 1's file
            (frame(t[1], t[2], 2, 3)[:-3], 400, "its header describes"),  # its body cut short
            (frame(t[1], t[2], 2, 3)[:20], 400, "header truncated"),      # its header cut short
            (frame(t[1], t[2], 2, 4), 400, "the request says 2 to 3"),    # another pair of versions
            (b"garbage" * 20, 400, "bad magic")]:
        with pytest.raises(ApiError) as e:
            store.delta_publish([bad], 3, 2)
        assert e.value.status == status and says in e.value.message, e.value.message
        assert store.current() == cur and store.full_version() == 1 and listing(tmp_path) == [
            "delta-1-2.sgwd", *BASE_FILES] and (tmp_path / "weights.safetensors").read_bytes() == v[0]
    with pytest.raises(ApiError) as e:  # the server holds version 2, not 1
        store.begin_delta(3, 1)
    assert e.value.status == 412 and "holds version 2" in e.value.message
    meta, f = store.open()  # a full download: rebuilt first
    with f:
        assert meta == cur and f.read() == v[1]
    assert store.full_version() == 2 and (tmp_path / "weights.safetensors").read_bytes() == v[1]
    # (upload u -> u + 1, the full file's version then, the links kept): every 2nd link after the
    # full file rebuilds it in the background; of the links it has passed the newest 2 stay
    for u, full, kept in [(2, 2, [(1, 2), (2, 3)]),
                          (3, 4, [(2, 3), (3, 4)]),
                          (4, 4, [(2, 3), (3, 4), (4, 5)]),
                          (5, 6, [(4, 5), (5, 6)]),
                          (6, 6, [(4, 5), (5, 6), (6, 7)])]:
        store.delta_publish([frame(t[u - 1], t[u], u, u + 1)], u + 1, u)
        if full == u + 1:
            wait_for(lambda: store.full_version() == u + 1, f"the rebuild to {u + 1}")
            assert store.rebuild()["version"] == full  # waits for the background one to finish
        assert store.full_version() == full and store.current()["digest"] == digest(v[u])
        assert [(d["from_version"], d["to_version"]) for d in store.deltas()] == kept
        assert listing(tmp_path) == sorted([f"delta-{a}-{b}.sgwd" for a, b in kept] + BASE_FILES)
        assert (tmp_path / "weights.safetensors").read_bytes() == v[full - 1]
    again = WeightStore(tmp_path, keep_deltas=2)  # a restart: the full file, the link after it and
    assert (again.current(), again.full_version(), again.deltas()) == (store.current(), 6, store.deltas())
    assert listing(tmp_path) == ["delta-4-5.sgwd", "delta-5-6.sgwd", "delta-6-7.sgwd", *BASE_FILES]
    again = WeightStore(tmp_path, keep_deltas=1)  # the 2 (then 1) that led to the full file
    assert again.deltas() == store.deltas()[1:] and listing(tmp_path) == ["delta-5-6.sgwd", "delta-6-7.sgwd",
                                                                          *BASE_FILES]
    again.publish([v[0]], 9)  # a full upload: no delta leads to it
    assert again.deltas() == [] and again.full_version() == 9 and listing(tmp_path) == BASE_FILES
    assert WeightStore(tmp_path).current() == again.current()
    (tmp_path / "weights.safetensors").write_bytes(v[1])  # same length, another file: not served
    assert WeightStore(tmp_path).current() is None


def test_links_that_do_not_rebuild_are_dropped(tmp_path):
    """A link is taken on its header (only a rebuild reads the bodies); one that does not rebuild
    goes with every link after the full file, whose version is served and held from then on."""
    t, v = files(3)
    store = WeightStore(tmp_path, keep_deltas=3)  # 3: no background rebuild, the download's
    store.publish([v[0]], 1)
    full, good = store.current(), frame(t[1], t[2], 2, 3)
    head = len(delta.pack(delta.MAGIC, delta.read_header(io.BytesIO(good))))
    for bad in [frame(t[1], t[2], 2, 3, digest=digest(v[0])),  # declares another file's digest
                good[:head] + b"\xff" * (len(good) - head)]:    # a body that does not decompress
        store.delta_publish([frame(t[0], t[1], 1, 2)], 2, 1)
        assert store.delta_publish([bad], 3, 2)["version"] == 3
        meta, f = store.open()
        with f:
            assert meta == full and f.read() == v[0]
        assert store.current() == full and store.deltas() == [] and listing(tmp_path) == BASE_FILES
        with pytest.raises(ApiError) as e:  # the trainer's next delta gets 412: it sends the full file
            store.begin_delta(4, 3)
        assert e.value.status == 412 and "holds version 1" in e.value.message


def test_the_chain_endpoint(ref_server, tmp_path):
    t, v = files(5)
    srv = ref_server(weights_dir=str(tmp_path / "w"), weight_deltas=3)
    client = RefClient(srv.url, retries=0)
    assert requests.get(srv.url + "/weights/delta?from=0").status_code == 404
    client.publish_weights(v[0], version=1)
    for u in (1, 2, 3, 4):
        meta = client.publish_delta(frame(t[u - 1], t[u], u, u + 1), version=u + 1, base=u)
        assert (meta["version"], meta["digest"]) == (u + 1, digest(v[u]))
    with pytest.raises(RefServerError) as e:
        client.publish_delta(frame(t[3], t[4], 4, 6), version=6, base=4)  # not the current version
    assert e.value.status == 412 and "holds version 5" in e.value.message
    r = requests.get(srv.url + "/weights")  # rebuilt to 5: links 1-2 goes, the newest 3 stay
    assert (r.content, r.headers["ETag"], r.headers["X-Weight-Version"]) == (v[4], f'"{digest(v[4])}"', "5")
    got = client.download_delta(2, tmp_path / "chain", digest=digest(v[1]))
    assert got == {"version": 5, "links": 3, "bytes": (tmp_path / "chain").stat().st_size}
    model = clone(t[1])
    links = apply_chain_file(tmp_path / "chain", model, from_version=2, base_digest=digest(v[1]))
    assert [h["to_version"] for h in links] == [3, 4, 5] and same(model, t[4])
    assert client.download_delta(5, tmp_path / "chain") == {"version": 5, "links": 0, "bytes": 0}
    for start, d, reason in [(1, None, "version 1 is older than the oldest delta kept (from 2, --weight_deltas=3)"),
                             (7, None, "version 7 is newer than the server's 5"),
                             (3, digest(v[1]), "version 3 here is another file")]:
        assert client.download_delta(start, tmp_path / "chain", digest=d) is None
        assert reason in client.last_delta_refusal, client.last_delta_refusal
    st = client.stats()
    assert st["weights_egress"] == {"full_downloads": 1, "full_bytes": len(v[4]), "delta_downloads": 1,
                                    "delta_bytes": got["bytes"], "delta_links": 3, "delta_refused": 3}
    assert (st["weights_ingress"]["delta_uploads"], st["weights_ingress"]["full_uploads"]) == (4, 1)
    assert [d["to_version"] for d in st["weight_deltas"]] == [3, 4, 5]


def test_no_deltas_kept_with_zero(ref_server, tmp_path):
    t, v = files(3)
    folder = tmp_path / "w"
    srv = ref_server(weights_dir=str(folder), weight_deltas=0)
    client = RefClient(srv.url, retries=0)
    client.publish_weights(v[0], version=1)
    for u in (1, 2):  # every link is rebuilt into the full file in the background, then dropped
        assert client.publish_delta(frame(t[u - 1], t[u], u, u + 1), version=u + 1, base=u)["version"] == u + 1
        wait_for(lambda: (folder / "weights.safetensors").read_bytes() == v[u]
                 and client.stats()["weight_deltas"] == [], f"the rebuild to {u + 1}")
        assert listing(folder) == BASE_FILES
        assert client.download_delta(u, tmp_path / "chain", digest=digest(v[u - 1])) is None
        assert f"version {u} is older than the oldest delta kept (from {u + 1}, --weight_deltas=0)" \
            in client.last_delta_refusal, client.last_delta_refusal
    assert requests.get(srv.url + "/weights").content == v[2]


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
    torch.manual_seed(1)
    with torch.no_grad():  # every value moves: the delta is not smaller than half the file
        for p in model.parameters():
            p.normal_(std=0.05)
    publish(3)
    for v in (4, 5, 6, 7, 8):  # deltas again (the base is version 3), 3 in a row, then the full
        with torch.no_grad():  # file (full_every=4)
            model.model.embed_tokens.weight[v] += 0.5
        publish(v)
    r = requests.get(srv.url + "/weights")  # the server's file rebuilt from the deltas is the version
    assert r.headers["X-Weight-Version"] == "8" and digest(r.content) == client.weights_version()["digest"]
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
    t, v = files(3)
    srv = ref_server(weights_dir=str(tmp_path / "w"), weight_deltas=2, token="s3cret")
    auth = {"Authorization": "Bearer s3cret"}
    client = RefClient(srv.url, token="s3cret", retries=0)
    client.publish_weights(v[0], version=1)
    good = frame(t[0], t[1], 1, 2)
    big_header = delta.MAGIC + (1 << 30).to_bytes(4, "little") + good[12:]
    ok = "?from=1&version=2"
    for query, body, status in [
            ("", good, 400), ("?from=1", good, 400), ("?from=x&version=2", good, 400),  # bad queries
            ("?from=2&version=2", good, 400), ("?from=-1&version=2", good, 400),
            ("?from=1&version=3", good, 400),                          # the delta says 1 -> 2
            ("?from=0&version=2", good, 412),                          # the server holds 1, not 0
            ("?from=0&version=1", good, 409),                          # not newer than 1
            (ok, b"", 400), (ok, b"garbage" * 9, 400),                 # no delta at all
            (ok, big_header, 400),                                     # a 1 GiB header
            (ok, frame(t[0], t[1], 1, 2, bytes=-1), 400),              # a negative file size
            (ok, frame(t[0], t[1], 1, 2, format="1"), 400),            # another format
            (ok, frame(t[0], t[1], 1, 2, base_digest="X" * 32), 400),  # a digest that is not hex
            (ok, frame(t[0], t[1], 1, 2, st_header="[1"), 400),        # not a safetensors header
            (ok, frame(t[0], t[1], 1, 2, base_digest=digest(v[1])), 412),  # made against another file
            (ok, iter([good[:50], good[50:-1]]), 400)]:                # chunked, one byte short
        r = requests.post(srv.url + "/weights/delta" + query, data=body, headers=auth)
        assert r.status_code == status, (query, r.status_code, r.text)
        assert "\n" not in r.json()["error"]
    assert requests.post(srv.url + "/weights/delta?from=1&version=2", data=good).status_code == 401
    assert requests.get(srv.url + "/weights/delta?from=1").status_code == 401
    d0 = digest(v[0])
    for query, status in [("", 400), ("?from=", 400), ("?from=1.5", 400),      # no version
                          ("?from=0&digest=XYZ", 400), (f"?from=0&digest={d0.upper()}", 400),
                          (f"?from=0&digest={d0[:31]}", 400),                  # not 32 lowercase hex
                          ("?from=-1", 409), ("?from=99999999999999999999", 409),  # no chain
                          ("?from=1", 204), (f"?from=1&digest={d0}", 204),     # current
                          (f"?from=1&digest={'0' * 32}", 409)]:  # current, but another file
        r = requests.get(srv.url + "/weights/delta" + query, headers=auth)
        assert r.status_code == status, (query, r.status_code, r.text)
    assert client.weights_version()["version"] == 1 and client.stats()["weight_deltas"] == []
    assert listing(tmp_path / "w") == BASE_FILES
    assert client.publish_delta(good, version=2, base=1)["digest"] == digest(v[1])


def test_bytes_after_a_delta_or_after_a_chains_last_link_are_refused(ref_server, tmp_path):
    """A delta upload with bytes after its body is refused (400) and changes nothing; a chain file
    with bytes after its last link, or after the last link's body, does not apply (DeltaError)."""
    t, v = files(3)
    srv = ref_server(weights_dir=str(tmp_path / "w"), weight_deltas=2)
    client = RefClient(srv.url, retries=0)
    client.publish_weights(v[0], version=1)
    up = frame(t[0], t[1], 1, 2)
    with pytest.raises(RefServerError) as e:
        client.publish_delta(up + b"\x00" * 3, version=2, base=1)
    assert e.value.status == 400, e.value.message
    assert f"the delta is {len(up) + 3} bytes, its header describes {len(up)}" in e.value.message
    assert client.weights_version()["version"] == 1 and client.stats()["weight_deltas"] == []
    links = [frame(t[0], t[1], 1, 2), frame(t[1], t[2], 2, 3)]
    for u in (1, 2):
        client.publish_delta(links[u - 1], version=u + 1, base=u)
    assert client.download_delta(1, tmp_path / "chain", digest=digest(v[0]))["links"] == 2
    chain = (tmp_path / "chain").read_bytes()
    head = [{"from_version": u, "to_version": u + 1, "bytes": len(links[u - 1])} for u in (1, 2)]
    assert chain == delta.pack_chain(head) + b"".join(links)
    head[1]["bytes"] += 3
    for raw, untouched in [(chain + b"\x00", True), (chain + b"junk" * 100, True),  # after the chain
                           (delta.pack_chain(head) + b"".join(links) + b"\x00" * 3, False)]:  # in its last link
        (tmp_path / "chain").write_bytes(raw)
        model = clone(t[0])
        with pytest.raises(delta.DeltaError, match="trailing bytes"):
            apply_chain_file(tmp_path / "chain", model, from_version=1, base_digest=digest(v[0]))
        assert same(model, t[0]) == untouched  # refused before a link is read, or half applied
    (tmp_path / "chain").write_bytes(chain)  # the chain as sent applies
    apply_chain_file(tmp_path / "chain", model := clone(t[0]), from_version=1, base_digest=digest(v[0]))
    assert same(model, t[2])


def test_two_uploads_racing_for_one_version(tmp_path):
    """Two uploads of version 2 start while the store holds 1 (both pass the check at the start);
    the first to commit becomes version 2, the other is refused (409) when it commits and leaves
    the first one's file and no temporary file behind; so is the second of two deltas of version 3,
    and a delta of version 4 that a full upload of 4 beat (which drops every link)."""
    t, v = files(4)
    store = WeightStore(tmp_path, keep_deltas=2)
    store.publish([v[0]], 1)
    first, second = store.begin(2), store.begin(2)
    first.write(v[1])
    second.write(v[2])
    meta = first.commit()
    with pytest.raises(ApiError) as e:
        second.commit()
    assert e.value.status == 409 and "not newer" in e.value.message
    assert store.current() == meta and (tmp_path / "weights.safetensors").read_bytes() == v[1]
    first, second = store.begin_delta(3, 2), store.begin_delta(3, 2)
    first.write(frame(t[1], t[2], 2, 3))
    second.write(frame(t[1], t[3], 2, 3))
    assert first.commit()["digest"] == digest(v[2])
    with pytest.raises(ApiError) as e:
        second.commit()
    assert e.value.status == 409 and "not newer than the current version 3" in e.value.message
    assert store.current()["digest"] == digest(v[2]) and listing(tmp_path) == ["delta-2-3.sgwd", *BASE_FILES]
    late, full = store.begin_delta(4, 3), store.begin(4)
    late.write(frame(t[2], t[3], 3, 4))
    full.write(v[3])
    assert full.commit()["digest"] == digest(v[3])
    with pytest.raises(ApiError) as e:
        late.commit()
    assert e.value.status == 409 and store.deltas() == [] and listing(tmp_path) == BASE_FILES


def test_uploaded_and_rebuilt_weight_files_are_fsynced(ref_server, tmp_path, monkeypatch):
    """Every file the server makes current is on disk first: the full upload, the delta it keeps
    and the full file it rebuilds from it (os.fsync on each, seen by the inode it syncs)."""
    import os

    def inode(path_or_fd):
        st = os.stat(path_or_fd)
        return st.st_dev, st.st_ino
    synced, real = set(), os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.add(inode(fd)), real(fd))[1])
    t, v = files(2)
    folder = tmp_path / "w"
    srv = ref_server(weights_dir=str(folder), weight_deltas=2)
    client = RefClient(srv.url, retries=0)
    client.publish_weights(v[0], version=1)
    assert inode(folder / "weights.safetensors") in synced
    synced.clear()
    assert client.publish_delta(frame(t[0], t[1], 1, 2), version=2, base=1)["digest"] == digest(v[1])
    assert inode(folder / "delta-1-2.sgwd") in synced, "the kept delta was not fsynced"
    assert requests.get(srv.url + "/weights").content == v[1]  # rebuilt for the download
    assert inode(folder / "weights.safetensors") in synced, "the rebuilt file was not fsynced"


def test_a_rebuild_due_while_one_runs_follows_it_at_once(tmp_path, monkeypatch):
    """keep 1: every link makes the full file due. A link committed while a rebuild runs starts no
    second one (one at a time); when the running one ends, the full file is still behind, so the
    next rebuild starts then, not at the next upload or download (none comes here)."""
    from simple_grpo.server import weight_store

    t, v = files(4)
    store = WeightStore(tmp_path, keep_deltas=1)
    store.publish([v[0]], 1)
    entered, release, real = threading.Event(), threading.Event(), weight_store.rebuild_file
    calls = []

    def held(*a, **kw):
        calls.append(len(a[1]))  # links it applies
        entered.set()
        assert release.wait(10), "never released"
        return real(*a, **kw)

    monkeypatch.setattr(weight_store, "rebuild_file", held)
    store.delta_publish([frame(t[0], t[1], 1, 2)], 2, 1)  # due: the background rebuild to 2 starts
    assert entered.wait(10), "no background rebuild"
    store.delta_publish([frame(t[1], t[2], 2, 3)], 3, 2)  # due again, while the first runs
    store.delta_publish([frame(t[2], t[3], 3, 4)], 4, 3)
    assert store.full_version() == 1
    release.set()
    wait_for(lambda: store.full_version() == 4, "the full file to catch up with no further request")
    assert calls == [1, 2], "the second rebuild applies the two links committed during the first"
    assert (tmp_path / "weights.safetensors").read_bytes() == v[3]
