"""Weight deltas end to end over real HTTP on 127.0.0.1: the real publisher, server and Worker
objects (tiny model). 20 published versions with workers that drop out and join (seeded), each
bit-identical to the trainer's published file at every sync, through multi-link chains, chains
too long (full file) and fresh joins (full file); the server's folder stays bounded; the server's
egress with deltas is a small fraction of full files; a corrupted or truncated delta falls back
to the full file; a new run sends workers back to the full file."""
from __future__ import annotations

import random

import pytest
import torch

from simple_grpo.cli import parse_config
from simple_grpo.common import lora
from simple_grpo.train import publish
from simple_grpo.common.config import TrainConfig, resolve
from simple_grpo.train.publish import WeightPublisher, cpu_snapshot
from simple_grpo.gen.worker import NO_WEIGHTS, Worker
from simple_grpo.wire import delta
from simple_grpo.wire.client import RefClient
from simple_grpo.wire.weights import iter_state_dict_safetensors

K, FULL_EVERY, VERSIONS = 4, 8, 20  # the server keeps 4 deltas; the trainer sends full files at 1, 9, 17
FULLS = {1, 9, 17}


def worker(model_dir, url, index: int, **more) -> Worker:
    args = {"model": model_dir, "ref_url": url, "rewards": "overlong", "worker_index": index,
            "ref_timeout": 20, "prompts_per_step": 2, "num_generations": 4, "micro_batch_size": 4,
            "max_new_tokens": 8, **more}
    cfg = resolve(parse_config(TrainConfig, [f"--{k}={v}" for k, v in args.items()]))
    return Worker(cfg, RefClient(url, retries=1, backoff_s=0.01))


def trainer_copy(tiny_model):
    m = type(tiny_model)(tiny_model.config)
    m.load_state_dict(tiny_model.state_dict())
    return m


def optimizer_step(model, g: torch.Generator, lr: float, frac: float) -> None:
    """An AdamW-like step: every (or a `frac` of every) weight moves by +-lr."""
    with torch.no_grad():
        for p in model.parameters():
            step = torch.randn(p.shape, generator=g).sign() * lr
            if frac < 1:
                step *= torch.rand(p.shape, generator=g) < frac
            p.add_(step)


def published(model, dtype, version: int) -> tuple[str, dict, dict]:
    """What the trainer publishes as `version`: (the file's digest, its tensors, aliases)."""
    tensors, aliases = cpu_snapshot(model, dtype)
    meta = publish.file_metadata(version, aliases, lora.publish_metadata(model))
    head = next(iter_state_dict_safetensors(tensors, metadata=meta))
    return delta.version_digest(head, [delta.tensor_digest(t) for t in tensors.values()]), tensors, aliases


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view({2: torch.int16, 4: torch.int32}[t.element_size()])


def assert_bit_identical(w: Worker, version: int, pub: tuple[str, dict, dict]) -> None:
    digest, tensors, aliases = pub
    assert w.version == version and w.weights_digest == digest
    params = w.model.state_dict()
    for name in [*tensors, *aliases]:
        want = tensors[aliases.get(name, name)]
        assert torch.equal(bits(params[name].to(want.dtype)), bits(want)), name


def folder(srv_dir) -> dict[str, int]:
    return {p.name: p.stat().st_size for p in srv_dir.iterdir()}


@pytest.mark.parametrize("dtype, lr, frac", [(torch.bfloat16, 5e-6, 1.0), (None, 1e-4, 0.03)],
                         ids=["bf16", "fp32"])
def test_twenty_versions_with_workers_dropping_out_and_joining(tiny_model_dir, tiny_model, ref_server,
                                                                 tmp_path, dtype, lr, frac):
    srv = ref_server(weights_dir=str(tmp_path / "w"), weight_deltas=K)
    client = RefClient(srv.url)
    trainer, g, rng = trainer_copy(tiny_model), torch.Generator().manual_seed(0), random.Random(7)
    pub = WeightPublisher(RefClient(srv.url), dtype=dtype, full_every=FULL_EVERY)
    slots: list[Worker | None] = [None, None, None]
    gone, syncs, joined, full_size, last_full = [], [], 0, None, 0
    for v in range(1, VERSIONS + 1):
        optimizer_step(trainer, g, lr, frac)
        pub.publish(trainer, version=v, wait=True)
        want = published(trainer, dtype, v)
        m = pub.metrics()
        assert m["published_version"] == v and m["publish_delta"] == float(v not in FULLS), (v, m)
        last_full = v if v in FULLS else last_full
        files = folder(tmp_path / "w")  # bounded: the full file (rebuilt in the background every
        full_size = files["weights.safetensors"]  # K links), the links since it and K before it
        deltas = sorted((f for f in files if f.startswith("delta-")), key=lambda f: int(f.split("-")[1]))
        assert deltas == [f"delta-{u}-{u + 1}.sgwd" for u in range(v - len(deltas), v)], (v, files)
        assert len(deltas) >= min(K, v - last_full) and (v - len(deltas) >= last_full), (v, files)
        assert len(deltas) <= 2 * K + 1, (v, files)  # a rebuild may be under way
        assert sorted(set(files) - set(deltas)) == ["full.json", "weights.json", "weights.safetensors"]
        listed = {f"delta-{d['from_version']}-{d['to_version']}.sgwd": d["bytes"]
                  for d in client.stats()["weight_deltas"]}
        assert all(files[d] == n for d, n in listed.items() if d in files) and deltas[-K:] == \
            [d for d in listed if d in deltas][-K:]
        for i, w in enumerate(slots):
            roll = rng.random()
            if w is None:
                if roll < 0.5:  # a fresh worker joins: the full file
                    slots[i] = w = worker(tiny_model_dir, srv.url, index=10 * v + i)
                    joined += 1
                else:
                    continue
            elif roll < 0.12:  # it leaves for good
                gone.append(w)
                slots[i] = None
                continue
            elif roll < 0.45:  # it is busy generating: it falls behind
                continue
            before, u = dict(w.counts), w.version
            assert w.sync_weights()
            assert_bit_identical(w, v, want)
            kind = "delta" if w.counts["delta_syncs"] > before["delta_syncs"] else "full"
            assert w.counts["full_syncs"] + w.counts["delta_syncs"] == before["full_syncs"] + \
                before["delta_syncs"] + 1 and w.counts["delta_fallbacks"] == 0
            if u > 0 and v - u <= K and u >= last_full:  # the newest K links are always kept
                assert kind == "delta", (u, v, kind)
            elif u <= 0 or u < last_full:  # nothing leads from there
                assert kind == "full", (u, v, kind)
            if kind == "delta":
                assert w.counts["delta_links"] - before["delta_links"] == v - u
            syncs.append((u, v, kind))
    pub.close()
    assert [d for d in syncs if d[2] == "delta" and d[1] - d[0] >= 2], "no sync over a multi-link chain"
    assert [d for d in syncs if d[2] == "full" and d[0] > 0 and d[0] >= 9], \
        "no full sync after the trainer's periodic full upload"
    assert [d for d in syncs if d[0] == 0] and joined >= 4, "no fresh worker joined"

    # egress: the server's counters are what the workers received, and with deltas a version
    # costs each worker a small fraction of the full file
    workers = gone + [w for w in slots if w is not None]
    st = client.stats()["weights_egress"]
    assert st["full_downloads"] == sum(w.counts["full_syncs"] for w in workers) == \
        len([d for d in syncs if d[2] == "full"])
    assert st["full_bytes"] == st["full_downloads"] * full_size
    assert st["delta_downloads"] == sum(w.counts["delta_syncs"] for w in workers)
    assert st["full_bytes"] + st["delta_bytes"] == sum(w.counts["bytes_downloaded"] for w in workers)
    assert st["delta_links"] == sum(v - u for u, v, kind in syncs if kind == "delta")
    per_version = st["delta_bytes"] / st["delta_links"]
    limit = 0.2 if dtype is torch.bfloat16 else 0.1  # measured: 0.135 (4% of bf16 values move), 0.04
    assert per_version < limit * full_size, (per_version, full_size)
    all_full = len(syncs) * full_size  # what the same syncs cost before deltas
    assert st["full_bytes"] + st["delta_bytes"] < 0.7 * all_full, (st, all_full)  # 0.58, 0.51: joins


def test_a_corrupted_or_truncated_delta_falls_back_to_the_full_file(tiny_model_dir, tiny_model,
                                                                    ref_server, tmp_path, capsys):
    srv = ref_server(weights_dir=str(tmp_path / "w"), weight_deltas=K)
    trainer, g = trainer_copy(tiny_model), torch.Generator().manual_seed(1)
    pub = WeightPublisher(RefClient(srv.url), dtype=torch.bfloat16, full_every=0)
    pub.publish(trainer, version=1, wait=True)
    w = worker(tiny_model_dir, srv.url, index=0)
    assert w.sync_weights() and w.counts["full_syncs"] == 1
    capsys.readouterr()

    # 1. a corrupted byte in the delta the server holds (a bad disk)
    optimizer_step(trainer, g, 5e-6, 1.0)
    pub.publish(trainer, version=2, wait=True)
    stored = tmp_path / "w" / "delta-1-2.sgwd"
    raw = bytearray(stored.read_bytes())
    raw[len(raw) - 40] ^= 0x10
    stored.write_bytes(bytes(raw))
    full = tmp_path / "w" / "weights.safetensors"  # and the full file breaks once too
    good = full.read_bytes()
    full.write_bytes(good[:100] + bytes([good[100] ^ 1]) + good[101:])
    assert not w.sync_weights() and w.version == NO_WEIGHTS  # the delta changed its model, then it
    assert (w.counts["delta_fallbacks"], w.counts["download_failures"]) == (1, 1)  # failed, and the
    # full file is broken too: on no version, the worker's loop samples nothing meanwhile
    lines = [x for x in capsys.readouterr().err.splitlines() if "weight delta" in x]
    assert len(lines) == 2 and "from version 1 failed, downloading the full file" in lines[0], lines
    assert "do not rebuild, dropped" in lines[1], lines  # the server's line: it serves version 1
    assert RefClient(srv.url).weights_version()["version"] == 1
    full.write_bytes(good)
    optimizer_step(trainer, g, 5e-6, 1.0)
    pub.publish(trainer, version=3, wait=True)  # its delta from 2 is refused (412): the full file
    assert pub.metrics()["publish_delta"] == 0.0
    chains = RefClient(srv.url).stats()["weights_egress"]["delta_downloads"]
    assert w.sync_weights()  # its model is no longer version 1's: no chain asked for, the full file
    assert RefClient(srv.url).stats()["weights_egress"]["delta_downloads"] == chains
    assert_bit_identical(w, 3, published(trainer, torch.bfloat16, 3))
    assert (w.counts["delta_fallbacks"], w.counts["full_syncs"], w.counts["delta_syncs"]) == (1, 2, 0)

    # 2. a chain cut short on the way (a broken connection, every retry)
    optimizer_step(trainer, g, 5e-6, 1.0)
    pub.publish(trainer, version=4, wait=True)
    real = w.client.session.request

    def cut(method, url, **kw):
        r = real(method, url, **kw)
        if url.endswith("/weights/delta") and r.status_code == 200:
            whole = r.content
            r.iter_content = lambda n: iter([whole[:len(whole) - 7]])
        return r
    w.client.session.request = cut
    assert w.sync_weights()
    v4 = published(trainer, torch.bfloat16, 4)  # and the server's full file is now version 4's
    assert_bit_identical(w, 4, v4)
    assert (w.counts["delta_fallbacks"], w.counts["full_syncs"], w.counts["delta_syncs"]) == (2, 3, 0)

    # 3. the server's delta file lost its tail (the server sends fewer bytes than it announced):
    # the worker's chain fails, and the server cannot rebuild version 5 for the full download
    # either, so it serves its full file's version (4, rebuilt for the last full download) and
    # drops the links after it
    w.client.session.request = real
    optimizer_step(trainer, g, 5e-6, 1.0)
    pub.publish(trainer, version=5, wait=True)
    stored = tmp_path / "w" / "delta-4-5.sgwd"
    stored.write_bytes(stored.read_bytes()[:-5])
    assert w.sync_weights()
    assert_bit_identical(w, 4, v4)
    assert (w.counts["delta_fallbacks"], w.counts["full_syncs"], w.counts["delta_syncs"]) == (3, 4, 0)

    # 4. the trainer's next publish goes up in full (the server no longer holds its base), and
    # an intact delta after it goes through
    optimizer_step(trainer, g, 5e-6, 1.0)
    pub.publish(trainer, version=6, wait=True)
    assert pub.metrics()["publish_delta"] == 0.0
    assert w.sync_weights()
    assert_bit_identical(w, 6, published(trainer, torch.bfloat16, 6))
    optimizer_step(trainer, g, 5e-6, 1.0)
    pub.publish(trainer, version=7, wait=True)
    assert pub.metrics()["publish_delta"] == 1.0
    assert w.sync_weights()
    assert_bit_identical(w, 7, published(trainer, torch.bfloat16, 7))
    assert (w.counts["delta_fallbacks"], w.counts["full_syncs"], w.counts["delta_syncs"]) == (3, 5, 1)
    pub.close()


def test_a_model_that_cannot_hold_the_published_values_takes_full_files(tiny_model_dir, tiny_model,
                                                                        ref_server, tmp_path, capsys):
    """fp32 publishing into a bf16 box: a delta would need values the box cannot hold, so every
    update is a full download (one line says why), and the box holds the rounded values."""
    srv = ref_server(weights_dir=str(tmp_path / "w"), weight_deltas=K)
    trainer, g = trainer_copy(tiny_model), torch.Generator().manual_seed(3)
    pub = WeightPublisher(RefClient(srv.url), dtype=torch.float32)
    w = worker(tiny_model_dir, srv.url, index=0, dtype="bfloat16")
    for v in (1, 2, 3):
        optimizer_step(trainer, g, 1e-4, 0.03)
        pub.publish(trainer, version=v, wait=True)
        assert w.sync_weights() and w.version == v and w.weights_digest is None
        for name, t in published(trainer, torch.float32, v)[1].items():
            assert torch.equal(w.model.state_dict()[name], t.to(torch.bfloat16)), name
    pub.close()
    assert pub.metrics()["publish_deltas"] == 2  # the trainer still sends deltas (for other boxes)
    assert (w.counts["full_syncs"], w.counts["delta_syncs"], w.counts["inexact_model"]) == (3, 0, 1)
    lines = [x for x in capsys.readouterr().err.splitlines() if "cannot hold" in x]
    assert len(lines) == 1, lines


def test_a_new_run_sends_workers_back_to_the_full_file(tiny_model_dir, tiny_model, ref_server, tmp_path):
    """Run b's versions count from 1 again: a worker of run a is 'newer' than the server, or holds
    another file for the same version number; either way the full file, never a wrong delta. The
    worker sees the new run id in the server's answer and goes straight to the full file (the
    server's own refusal of a delta from another run's file is tests/test_delta_store.py's)."""
    srv = ref_server(weights_dir=str(tmp_path / "w"), weight_deltas=K)
    client = RefClient(srv.url)
    client.start_run("a")
    a, g = trainer_copy(tiny_model), torch.Generator().manual_seed(2)
    pub = WeightPublisher(RefClient(srv.url), dtype=torch.bfloat16, full_every=0)
    w1, w2 = worker(tiny_model_dir, srv.url, 1), worker(tiny_model_dir, srv.url, 2)
    for v in (1, 2, 3):
        optimizer_step(a, g, 5e-6, 1.0)
        pub.publish(a, version=v, wait=True)
        assert w1.sync_weights() and w2.sync_weights()
    assert w1.counts["delta_syncs"] == 2 and w2.version == 3

    pub.close()
    assert client.start_run("b")["reset"]
    b = trainer_copy(tiny_model)
    optimizer_step(b, g, 5e-6, 1.0)
    pub = WeightPublisher(RefClient(srv.url), dtype=torch.bfloat16, full_every=0)  # run b's trainer
    pub.publish(b, version=1, wait=True)
    assert pub.metrics()["publish_delta"] == 0 and pub.metrics()["publish_failures"] == 0
    assert w1.sync_weights()  # version 3 is newer than the server's 1
    assert_bit_identical(w1, 1, published(b, torch.bfloat16, 1))
    assert w1.counts["delta_unavailable"] == 0 and w1.counts["full_syncs"] == 2 and w1.run_id == "b"
    for v in (2, 3, 4):
        optimizer_step(b, g, 5e-6, 1.0)
        pub.publish(b, version=v, wait=True)
        assert pub.metrics()["publish_delta"] == 1
    assert w2.sync_weights()  # run b has deltas 1->2->3->4, but w2's version 3 is run a's file
    assert_bit_identical(w2, 4, published(b, torch.bfloat16, 4))
    assert w2.counts["delta_unavailable"] == 0 and w2.counts["full_syncs"] == 2 and w2.run_id == "b"
    assert w1.sync_weights() and w1.counts["delta_syncs"] == 3  # run b's version 1 -> 4: a chain
    assert_bit_identical(w1, 4, published(b, torch.bfloat16, 4))
    pub.close()


def test_versions_two_apart_go_up_as_deltas_and_workers_sync_across_the_gaps(tiny_model_dir, tiny_model,
                                                                           ref_server, tmp_path):
    """--publish_every=2: the trainer publishes its step numbers 2, 4, 6, 8, each as a delta
    against the one before; the server keeps the links 2->4, 4->6, 6->8 (a restart too), a worker
    that syncs at every publish takes one link at a time, one that was away takes the whole chain."""
    srv = ref_server(weights_dir=str(tmp_path / "w"), weight_deltas=K)
    client = RefClient(srv.url)
    trainer, g = trainer_copy(tiny_model), torch.Generator().manual_seed(3)
    pub = WeightPublisher(RefClient(srv.url), dtype=torch.bfloat16, full_every=0)
    each, away = worker(tiny_model_dir, srv.url, 0), worker(tiny_model_dir, srv.url, 1)
    steps, want = [], None
    for step in range(1, 9):
        optimizer_step(trainer, g, 5e-6, 1.0)
        if step == 2:  # the workers' first polls: nothing published yet
            assert not each.sync_weights() and not away.sync_weights()
        if not pub.step_end(trainer, version=step, step=step, every=2, wait=True):
            continue
        steps.append(step)
        want = published(trainer, torch.bfloat16, step)
        assert pub.metrics()["publish_delta"] == float(step > 2) and pub.metrics()["publish_failures"] == 0
        assert each.sync_weights()
        assert_bit_identical(each, step, want)
        if step == 2:
            assert away.sync_weights()
    pub.close()
    assert steps == [2, 4, 6, 8]
    links = [(d["from_version"], d["to_version"]) for d in client.stats()["weight_deltas"]]
    assert links == [(2, 4), (4, 6), (6, 8)]
    assert (each.counts["full_syncs"], each.counts["delta_syncs"], each.counts["delta_links"]) == (1, 3, 3)
    assert away.sync_weights()  # version 2 -> 8: one chain of three links
    assert_bit_identical(away, 8, want)
    assert (away.counts["full_syncs"], away.counts["delta_syncs"], away.counts["delta_links"]) == (1, 1, 3)
    assert each.counts["delta_fallbacks"] == away.counts["delta_fallbacks"] == 0
    from simple_grpo.server.weight_store import WeightStore

    assert WeightStore(tmp_path / "w", keep_deltas=K).deltas() == client.stats()["weight_deltas"]
