"""Generation workers over real HTTP on 127.0.0.1 with the tiny model: recorded sampling log-probs
equal the trainer's, the trainer's background publisher, staleness and shape checks counted
exactly, an interrupted weight download keeps the old weights, and the whole system (ref server +
trainer + late / killed worker processes) trains every batch at most once."""
from __future__ import annotations

import dataclasses
import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from simple_grpo.algo.logprobs import completion_logprobs
from simple_grpo.cli import parse_config
from simple_grpo.common.config import TrainConfig, resolve
from simple_grpo.train.engine import standalone_env
from simple_grpo.train.publish import WeightPublisher
from simple_grpo.train.rollout_source import RefConnection
from simple_grpo.gen.worker import Worker
from simple_grpo.wire.client import RefClient
from simple_grpo.wire.codec import RolloutBatch
from simple_grpo.wire.contract import BatchContract
from simple_grpo.wire.delta_apply import file_digest
from simple_grpo.wire.weights import load_safetensors_file

ROOT = Path(__file__).resolve().parents[1]
SMALL = dict(prompts_per_step=2, num_generations=4, micro_batch_size=4, max_new_tokens=8)


def digest_of(data: bytes, folder) -> str:
    """The digest of a weights file's bytes (simple_grpo/wire/delta.py), through a file."""
    path = folder / "digest-of.safetensors"
    path.write_bytes(data)
    return file_digest(path)[0]


def worker_cfg(model_dir, url, **kw) -> TrainConfig:
    args = {"model": model_dir, "ref_url": url, "rewards": "overlong", "worker_index": 0,
            "ref_timeout": 20, **SMALL, **kw}
    return resolve(parse_config(TrainConfig, [f"--{k}={v}" for k, v in args.items()]))


def test_token_alias_and_worker_needs_a_url(tiny_model_dir):
    cfg = parse_config(TrainConfig, ["--token=s3cret"])
    assert cfg.ref_token == "s3cret"
    from simple_grpo.errors import UserError
    with pytest.raises(UserError, match="--mode=generate needs --ref_url"):
        resolve(parse_config(TrainConfig, ["--mode=generate"]))


def test_worker_batch_records_the_trainers_logprobs(tiny_model_dir, ref_server):
    """Sampling log-probs recorded during generate() == a fresh forward pass (fp32, atol 1e-4)."""
    srv = ref_server()
    w = Worker(worker_cfg(tiny_model_dir, srv.url, temperature=0.7), RefClient(srv.url))
    [(batch, _)] = w.make_batches()
    assert batch.gen_logprobs is not None and batch.gen_logprobs.shape == batch.completion_ids.shape
    with torch.no_grad():
        want = completion_logprobs(w.model, batch.prompt_ids, batch.prompt_lens, batch.completion_ids,
                                   batch.completion_lens, temperature=0.7)
    torch.testing.assert_close(batch.gen_logprobs, want, atol=1e-4, rtol=0)
    assert batch.meta["producer"] == w.id and batch.weight_version == 0
    assert w.upload(batch) == "queued"
    got = RefClient(srv.url).get(wait_s=30)
    assert got.batch_id == batch.batch_id and torch.equal(got.gen_logprobs, batch.gen_logprobs)


@pytest.mark.parametrize("ranks, dynamic", [
    (1, False),  # one rank: one batch of the step's 4 prompts
    (2, False),  # two ranks: both shares from one sampling call, split by group
    (4, False),  # four ranks: still one call
    (2, True),   # dynamic sampling (refills when groups are flat): calls = 1 + refill rounds, never per rank
])
def test_a_step_of_every_rank_is_sampled_in_one_call(tiny_model_dir, ref_server, monkeypatch, ranks, dynamic):
    """A worker (and the overlap sampler, which is one) samples all the trainer ranks' rows of a
    step in one engine call and splits them into per-rank batches of whole groups; each batch
    says how many calls made its step (`gen_calls`), which the trainer logs."""
    from simple_grpo.train import loop
    from simple_grpo.gen import rollout

    srv = ref_server()
    cfg = worker_cfg(tiny_model_dir, srv.url, trainer_ranks=ranks, prompts_per_step=4, max_new_tokens=4,
                     **({"preset": "dapo", "max_refill_rounds": 2} if dynamic else {}))
    w = Worker(cfg, RefClient(srv.url))
    calls, sample = [], rollout.sample
    monkeypatch.setattr(rollout, "sample", lambda *a, **kw: calls.append(len(a[2])) or sample(*a, **kw))
    got = w.make_batches()
    assert len(got) == ranks and calls[0] == 4, "every rank's prompts in the first call"
    G = cfg.num_generations
    assert len(calls) == 1 + got[0][1]["refill_rounds"] and len(calls) <= (3 if dynamic else 1)
    ids = set()
    for batch, stats in got:
        assert batch.batch_size == 4 // ranks * G and batch.meta["gen_calls"] == len(calls)
        assert batch.gen_logprobs.shape == batch.completion_ids.shape
        assert batch.completion_ids.shape[1] == int(batch.completion_lens.max()), "trimmed to its rows"
        assert len(batch.meta["reward_breakdown"]["overlong"]) == batch.batch_size
        assert loop.batch_stats(batch, 0, "correct")["gen_calls"] == len(calls)
        ids.add(batch.batch_id)
    assert len(ids) == ranks, "each batch its own id"
    assert w.upload(got[-1][0]) == "queued"


def test_the_worker_loop_uploads_a_step_from_one_call(tiny_model_dir, ref_server, monkeypatch):
    """run_worker with 2 trainer ranks: one sampling call, two uploads (one per rank)."""
    from simple_grpo.gen import rollout
    from simple_grpo.gen.worker import run_worker

    srv = ref_server()
    calls, sample = [], rollout.sample
    monkeypatch.setattr(rollout, "sample", lambda *a, **kw: calls.append(len(a[2])) or sample(*a, **kw))
    out = run_worker(worker_cfg(tiny_model_dir, srv.url, mode="generate", trainer_ranks=2, prompts_per_step=4,
                                max_new_tokens=4, worker_batches=2))
    assert out["batches"] == 2 and calls == [4], calls
    assert RefClient(srv.url).stats()["queue_depth"] == 2


def test_publisher_then_worker_sync_and_interrupted_download(tiny_model_dir, tiny_model, ref_server,
                                                             tmp_path):
    """The trainer's publisher puts its exact weights on the server; a worker loads them; a
    download that breaks off keeps the worker's old weights and a later sync succeeds."""
    srv = ref_server(weights_dir=str(tmp_path / "weights"))
    trained = type(tiny_model)(tiny_model.config)
    torch.manual_seed(1)
    for p in trained.parameters():
        torch.nn.init.normal_(p, std=0.05)
    pub = WeightPublisher(RefClient(srv.url))
    pub.publish(trained, version=3, wait=True)
    assert pub.metrics()["published_version"] == 3 and pub.metrics()["publishes"] == 1
    w = Worker(worker_cfg(tiny_model_dir, srv.url), RefClient(srv.url, retries=1, backoff_s=0.01))
    assert w.sync_weights() and w.version == 3
    for k, v in trained.state_dict().items():
        assert torch.equal(w.model.state_dict()[k], v), k
    assert srv.state.stats()["workers"][w.id]["version"] == 3

    before = {k: v.clone() for k, v in w.model.state_dict().items()}
    pub.publish(tiny_model, version=5, wait=True)
    path = tmp_path / "weights" / "weights.safetensors"
    full = path.read_bytes()
    path.write_bytes(full[: len(full) // 2])  # the server's file breaks off mid-body
    assert not w.sync_weights() and w.version == 3 and w.counts["download_failures"] == 1
    for k, v in before.items():
        assert torch.equal(w.model.state_dict()[k], v), k
    path.write_bytes(full)
    assert w.sync_weights() and w.version == 5
    for k, v in load_safetensors_file(path).items():
        assert torch.equal(w.model.state_dict()[k], v), k
    pub.close()


def test_worker_takes_the_version_sent_when_publishes_land_mid_sync(tiny_model_dir, tiny_model,
                                                                     ref_server, tmp_path):
    """publish_every=1 on a fast trainer: version 2 lands between the worker's poll (version 1)
    and its download, version 3 between the download's first and last chunk. The worker loads
    version 2 (the file being sent: its digest), in one GET, reports 2 and tags its batch 2; its
    next sync loads 3. (Checking the download against the polled version refused it and retried.)"""
    srv = ref_server(weights_dir=str(tmp_path / "weights"))
    path = tmp_path / "weights" / "weights.safetensors"
    versions = {}
    for v in (1, 2, 3):
        m = type(tiny_model)(tiny_model.config)
        torch.manual_seed(v)
        for p in m.parameters():
            torch.nn.init.normal_(p, std=0.05)
        versions[v] = m
    pub = WeightPublisher(RefClient(srv.url))
    pub.publish(versions[1], version=1, wait=True)
    w = Worker(worker_cfg(tiny_model_dir, srv.url), RefClient(srv.url, retries=2, backoff_s=0.01))
    real_get, gets, files = w.client.session.get, [], {}

    def racing_get(*a, **kw):
        if not gets:
            pub.publish(versions[2], version=2, wait=True)  # after the worker polled version 1
            files[2] = path.read_bytes()
        resp = real_get(*a, **kw)
        gets.append(resp.headers["X-Weight-Version"])

        def slow(n, _it=resp.iter_content):
            for i, piece in enumerate(_it(4096)):
                if i == 1 and 3 not in files:
                    pub.publish(versions[3], version=3, wait=True)  # mid-download
                    files[3] = path.read_bytes()
                yield piece
        resp.iter_content = slow
        return resp

    w.client.session.get = racing_get
    assert w.sync_weights() and w.version == 2 and 3 in files
    assert gets == ["2"] and w.counts["download_failures"] == 0 and w.counts["weight_updates"] == 1
    assert w.client.last_weights == {"version": 2, "bytes": len(files[2]),
                                     "digest": digest_of(files[2], tmp_path)}
    for k, v in versions[2].state_dict().items():
        assert torch.equal(w.model.state_dict()[k], v), k
    assert srv.state.stats()["workers"][w.id]["version"] == 2
    [(batch, _)] = w.make_batches()
    assert batch.weight_version == 2

    assert w.sync_weights() and w.version == 3 and gets == ["2", "3"]
    for k, v in versions[3].state_dict().items():
        assert torch.equal(w.model.state_dict()[k], v), k
    assert srv.state.stats()["workers"][w.id]["version"] == 3
    assert not w.sync_weights() and gets == ["2", "3"]  # up to date: no download
    pub.close()


# the contract of the batches below (G = 4, temperature 1.0 unless a test says otherwise)
CONTRACT = BatchContract(scale="std", rewards="overlong:1.0", dynamic_sampling=False, filter_metric="off",
                         max_new_tokens=8, min_new_tokens=0, top_p=1.0, temperature=1.0, group_size=4,
                         overlong_cache=2, model="tiny", prompt="0f1e2d3c4b5a6978",
                         task="arithmetic;question_field=question;answer_field=answer",
                         reward_code="89abcdef01234567;failure_value=0.0")


def _batch(version: int, rows: int = 8, G: int = 4, producer: str = "test",
           temperature: float = 1.0) -> RolloutBatch:
    C = 3
    return RolloutBatch(prompt_ids=torch.full((rows, 2), 5), prompt_lens=torch.full((rows,), 2),
                        completion_ids=torch.full((rows, C), 7), completion_lens=torch.full((rows,), C),
                        rewards=torch.zeros(rows), advantages=torch.zeros(rows),
                        weight_version=version, meta={"group_size": G, "producer": producer},
                        temperature=temperature,
                        contract=dataclasses.replace(CONTRACT, group_size=G, temperature=temperature))


def test_stale_and_misshapen_batches_are_dropped_and_counted(ref_server):
    srv = ref_server()
    conn = RefConnection(srv.url, None, timeout=10, batch_rows=8, max_staleness=2, contract=CONTRACT)
    client = RefClient(srv.url)
    sent = [(3, 8, 4), (8, 8, 4), (10, 8, 4), (7, 8, 4), (10, 4, 4), (9, 8, 2), (9, 8, 4)]
    for v, rows, G in sent:  # versions 3 and 7 are older than 10 - 2; two have the wrong shape
        client.upload(_batch(v, rows, G))
    got = [conn.next_batch(weight_version=10).weight_version for _ in range(3)]
    assert got == [8, 10, 9]
    assert conn.counts == {"stale_dropped": 2, "rejected_batches": 2, "duplicates_dropped": 0,
                           "server_restarts": 0, "rollouts_resent": 0, "queue_full_bypass": 0}
    conn.close()


def test_batches_sampled_at_another_temperature_are_dropped_and_counted(ref_server, capsys):
    srv = ref_server()
    conn = RefConnection(srv.url, None, timeout=10, batch_rows=8,
                         contract=dataclasses.replace(CONTRACT, temperature=0.7))
    client = RefClient(srv.url)
    for i, t in enumerate([1.0, 1.0, 0.7]):  # a worker started without --temperature=0.7, twice
        client.upload(_batch(i, producer="w-default" if t == 1.0 else "w-0.7", temperature=t))
    got = conn.next_batch(weight_version=2)
    assert got.meta["producer"] == "w-0.7" and got.temperature == 0.7
    assert conn.counts["rejected_batches"] == 2 and conn.counts["stale_dropped"] == 0
    warnings = [x for x in capsys.readouterr().err.splitlines() if "dropping a batch" in x]
    assert warnings == ["[trainer] dropping a batch from w-default: its temperature is 1.0, this "
                        "trainer's is 0.7 (start workers with the trainer's --temperature)"]
    conn.close()


def _spawn(args: list[str], log: Path, **env: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(ROOT / "grpo_ref_split.py"), *args], cwd=ROOT,
                            env=standalone_env(OMP_NUM_THREADS="1", **env), stdout=open(log, "w"),
                            stderr=subprocess.STDOUT)


def _wait_for(cond, timeout: float, what: str, procs=()):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        for p in procs:
            assert p.poll() is None, f"a process exited (code {p.returncode}) while waiting for {what}"
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def _rows(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()] if path.exists() else []


def test_trainer_with_late_and_killed_workers(tiny_model_dir, ref_server, tmp_path):
    """Worker a uploads at most 4 batches and is killed mid-run; once the trainer has trained them
    all and published (waited for as events, never a sleep), worker b joins. So b starts from
    the version the trainer then holds, and the trainer has >= 4 of its 8 steps left for b: with
    staleness <= 2, the batch of step 8 (trained at version 7) is of version >= 5 > 4 >= b's first."""
    # workers block on a full queue: backlog stays small; the server drops stale batches as the
    # trainer would, so every batch it hands out is trained (batches_out counts the trainer's steps)
    srv = ref_server(queue_size=2, max_staleness=2)
    client = RefClient(srv.url)
    common = [f"--model={tiny_model_dir}", f"--ref_url={srv.url}", "--rewards=overlong"] + \
        [f"--{k}={v}" for k, v in SMALL.items()]
    run = tmp_path / "run"
    trainer = _spawn(common + [f"--run_dir={run}", "--steps=8", "--generate_locally=false",
                               "--eval_every=0", "--save_every=0", "--plot_every=0", "--lr=1e-3",
                               "--warmup_steps=1", "--max_staleness=2"], tmp_path / "trainer.log")
    a = _spawn(common + ["--mode=generate", "--worker_index=1", "--worker_batches=4"], tmp_path / "a.log")
    procs = [trainer]
    try:
        # a has filled the queue: it is generating or waiting to upload its next batch
        _wait_for(lambda: client.stats()["batches_in"] >= 2, 240, "two uploaded batches", [trainer, a])
        a.send_signal(signal.SIGKILL)
        a.wait()

        def idle() -> bool:  # every batch a uploaded trained (or dropped stale), the last step published
            st, done = client.stats(), len(_rows(run / "metrics.jsonl"))
            return st["queue_depth"] == st["in_flight"] == 0 and st["batches_out"] == done and \
                client.weights_version()["version"] == done
        _wait_for(idle, 240, "the trainer to train and publish the killed worker's batches", procs)
        published = client.weights_version()["version"]
        assert 2 <= published <= 4, published
        b_tmp = tmp_path / "b-tmp"
        b_tmp.mkdir()
        b = _spawn(common + ["--mode=generate", "--worker_index=2"], tmp_path / "b.log", TMPDIR=str(b_tmp))
        procs.append(b)
        assert trainer.wait(timeout=300) == 0, (tmp_path / "trainer.log").read_text()[-3000:]
        assert list(b_tmp.glob("simple_grpo-worker-*")), "b holds its folder (downloads, chains)"
        b.send_signal(signal.SIGTERM)  # stopped the usual way, b removes its folder
        assert b.wait(timeout=60) == 143, (tmp_path / "b.log").read_text()[-3000:]
        assert not list(b_tmp.iterdir()), f"b left files behind: {list(b_tmp.rglob('*'))}"
    finally:
        for p in [trainer, a, *procs]:
            if p.poll() is None:
                p.kill()
                p.wait()
    steps = _rows(run / "metrics.jsonl")
    trained = _rows(run / "batches.jsonl")
    assert [r["step"] for r in steps] == list(range(1, 9))
    ids = [t["batch_id"] for t in trained]
    assert len(ids) == 8 and len(set(ids)) == 8, "a batch was trained twice"
    blog = (tmp_path / "b.log").read_text()
    b_id = next(t["producer"] for t in trained[::-1])
    late = [t for t in trained if t["producer"] == b_id]
    assert late and all(t["producer"].startswith("gen-") for t in trained)
    assert {t["producer"] for t in trained} >= {b_id} and len({t["producer"] for t in trained}) == 2
    # the late worker started from the version published when it joined, not from 0 ...
    assert f"loaded weight version {published}\n" in blog
    assert late[0]["weight_version"] == published and len(late) == 8 - published
    # ... and followed the trainer's later publishes
    assert late[-1]["weight_version"] > late[0]["weight_version"]
    fresh = [r["logprob_mismatch"] for r in steps if "logprob_mismatch" in r]
    assert fresh and max(fresh) < 1e-4, fresh
    assert all(r["batch_staleness"] <= 2 for r in steps)
    # no batch is trained as on-policy while it is not: every late one (and only those) is trained
    # against its sampling log-probs, fresh ones against the trainer's (offpolicy_token_frac 0)
    assert all(r["offpolicy_token_frac"] == float(r["batch_staleness"] > 0) for r in steps), steps
    assert steps[-1]["published_version"] >= 7


def test_worker_batch_at_temperature_trains_with_zero_kl(tiny_model_dir, ref_server, tmp_path):
    """A worker process sampling at --temperature=0.7: the server scores its batch at 0.7, so the
    trainer (same weights, same temperature, beta > 0) trains it at step 1 with KL 0."""
    sys.path.insert(0, str(ROOT))
    import grpo_ref_split

    srv = ref_server(queue_size=1)
    common = [f"--model={tiny_model_dir}", f"--ref_url={srv.url}", "--rewards=overlong",
              "--temperature=0.7"] + [f"--{k}={v}" for k, v in SMALL.items()]
    worker = _spawn(common + ["--mode=generate", "--worker_index=3"], tmp_path / "worker.log")
    run = tmp_path / "run"
    try:
        grpo_ref_split.main(common + [f"--run_dir={run}", "--steps=1", "--generate_locally=false",
                                      "--beta=0.04", "--eval_every=0", "--save_every=0",
                                      "--plot_every=0", "--publish_every=0", "--ref_timeout=120"])
    finally:
        worker.kill()
        worker.wait()
    (row,) = _rows(run / "metrics.jsonl")
    (trained,) = _rows(run / "batches.jsonl")
    assert trained["producer"].startswith("gen-") and row["remote_batch"] == 1.0
    assert row["kl"] < 1e-6, f"reference and policy at the same temperature: KL {row['kl']}"
    assert row["logprob_mismatch"] < 1e-4 and row["rejected_batches"] == 0


def test_full_queue_never_blocks_the_trainer(ref_server, tiny_model):
    """Workers filled the (bounded) queue while the trainer generated: its own batch is scored
    through /logprobs instead of waiting for room that only its training would make."""
    srv = ref_server(queue_size=2)
    client = RefClient(srv.url)
    for i in range(2):
        client.upload(_batch(0, producer=f"w{i}"))
    conn = RefConnection(srv.url, None, timeout=10, batch_rows=8, contract=CONTRACT)
    ours = _batch(0, producer="trainer-0", temperature=0.7)
    ours.batch_id = "ours"
    got = conn.exchange(ours, weight_version=0)
    assert got.batch_id == "ours" and conn.counts["queue_full_bypass"] == 1
    with torch.no_grad():  # scored at the batch's sampling temperature
        want = completion_logprobs(tiny_model, ours.prompt_ids, ours.prompt_lens, ours.completion_ids,
                                   ours.completion_lens, temperature=0.7)
    torch.testing.assert_close(got.ref_logprobs, want, atol=1e-5, rtol=0)
    assert conn.ready_batch(weight_version=0).meta["producer"] == "w0"  # the queue is intact
    conn.close()


def test_trainer_refuses_a_server_holding_newer_weights(tiny_model_dir, tiny_model, ref_server, tmp_path):
    """Another run's version 9 on the server: workers would never take this run's 0, 1, 2, ..."""
    from simple_grpo.errors import UserError

    sys.path.insert(0, str(ROOT))
    import grpo_ref_split

    srv = ref_server()
    WeightPublisher(RefClient(srv.url)).publish(tiny_model, version=9, wait=True)
    args = {"model": tiny_model_dir, "ref_url": srv.url, "run_dir": tmp_path, "steps": 1,
            "rewards": "overlong", "eval_every": 0, **SMALL}
    with pytest.raises(UserError, match="holds weight version 9, newer than this run's 0"):
        grpo_ref_split.main([f"--{k}={v}" for k, v in args.items()])


def test_a_worker_and_a_server_outlive_a_run_and_serve_the_next(tiny_model_dir, ref_server, tmp_path,
                                                                 capsys):
    """Runs a then b (a new run id each) against one server and one worker process: at b's start
    the worker drops run a's weights in one line and samples again only with b's, so every batch b
    trains is of one of b's own versions (a batch of a's would carry a version newer than b's and
    be dropped). Then the server restarts on its --weights_dir (holding b's weights and b's run
    id) and run c is accepted after one line, where it was refused for b's 'newer' version."""
    sys.path.insert(0, str(ROOT))
    import grpo_ref_split

    weights = tmp_path / "weights"
    srv = ref_server(queue_size=1, weights_dir=str(weights))
    common = [f"--model={tiny_model_dir}", f"--ref_url={srv.url}", "--rewards=overlong"] + \
        [f"--{k}={v}" for k, v in SMALL.items()]
    train = ["--steps=3", "--generate_locally=false", "--eval_every=0", "--save_every=0",
             "--plot_every=0", "--publish_every=1", "--ref_timeout=120", "--lr=1e-3"]
    log = tmp_path / "worker.log"
    worker = _spawn(common + ["--mode=generate", "--worker_index=5"], log)
    try:
        for name in ("a", "b"):
            grpo_ref_split.main(common + train + [f"--run_dir={tmp_path / name}"])
            assert RefClient(srv.url).weights_version()["version"] == 3, name
        text = log.read_text()
        assert text.count("follows a new run") == 1, text[-3000:]
        after = text.split("follows a new run")[1]
        versions = [int(v) for v in re.findall(r"batch \d+: version (\d+)", after)]
        assert versions and max(versions) <= 3, versions
        rows, trained = _rows(tmp_path / "b" / "metrics.jsonl"), _rows(tmp_path / "b" / "batches.jsonl")
        before = {r["step"] + 1: r["weight_version"] for r in rows} | {1: 0}
        assert [b["producer"].startswith("gen-") for b in trained] == [True] * 3
        assert all(b["weight_version"] <= before[b["step"]] for b in trained), trained
    finally:
        worker.kill()
        worker.wait()
    srv.close()
    capsys.readouterr()
    again = ref_server(weights_dir=str(weights))  # restarted: serves b's version 3 of run b
    assert RefClient(again.url).weights_version()["version"] == 3
    RefClient(again.url).weights_version("gen-x", 0)  # a worker is there: the run publishes
    grpo_ref_split.main([f"--model={tiny_model_dir}", f"--ref_url={again.url}", "--rewards=overlong",
                         f"--run_dir={tmp_path / 'c'}", "--steps=1", "--eval_every=0", "--save_every=0",
                         "--plot_every=0"] + [f"--{k}={v}" for k, v in SMALL.items()])
    out = capsys.readouterr().out
    assert "new run" in out and "dropped the previous run's weights" in out, out[-2000:]
    assert RefClient(again.url).weights_version()["version"] == 1, "run c's own weights"


@pytest.mark.slow
def test_a_worker_that_stops_is_one_line_on_the_trainer(tiny_model_dir, ref_server, tmp_path, monkeypatch, capsys):
    """A live worker reports every HEARTBEAT_S even while it generates; killed, it falls silent
    and the trainer's watch (rank 0, at each step and while it waits for a batch) says so in one
    line within WORKER_SILENCE_S + its 5 s interval, once; a report under that id is 'back'."""
    from simple_grpo.gen import worker as worker_mod

    monkeypatch.setattr(worker_mod, "WORKER_SILENCE_S", 8.0)  # > the worker's 5 s heartbeat
    srv = ref_server(queue_size=1)  # the worker blocks on the full queue: alive, not polling weights
    client = RefClient(srv.url)
    a = _spawn([f"--model={tiny_model_dir}", f"--ref_url={srv.url}", "--rewards=overlong", "--mode=generate",
                "--worker_index=1"] + [f"--{k}={v}" for k, v in SMALL.items()], tmp_path / "a.log")
    conn = RefConnection(srv.url, None, 30.0)
    conn.watch = True
    try:
        _wait_for(lambda: client.stats()["batches_in"] >= 1, 240, "the worker's first batch", [a])
        (wid,) = client.stats()["workers"]
        alive_until = time.monotonic() + 20  # blocked on the full queue, yet reported: not silent
        while time.monotonic() < alive_until:
            conn.watch_workers(every_s=1.0)
            time.sleep(0.5)
        assert "silent" not in capsys.readouterr().err
        a.kill()
        a.wait()
        killed = time.monotonic()
        while "silent" not in capsys.readouterr().err:
            assert time.monotonic() - killed < 8 + 5 + 5, "no line for the stopped worker"
            conn.watch_workers(every_s=1.0)
            time.sleep(0.2)
        with capsys.disabled():
            print(f"\nworker killed: one line after {time.monotonic() - killed:.1f} s")
        conn.watch_workers(every_s=0.0)
        assert "silent" not in capsys.readouterr().err, "said once"
        client.weights_version(wid, 0)  # its id reports again
        conn.watch_workers(every_s=0.0)
        assert f"generation worker {wid} is back" in capsys.readouterr().err
    finally:
        conn.close()
        if a.poll() is None:
            a.kill()
            a.wait()
