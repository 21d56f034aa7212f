"""--overlap end to end on the tiny model (a real reference server, a real sampler process, weights
handed over a gloo group): every step trains the sampler's batch at most one step stale with TIS,
a sampler that dies (between steps, while a rank waits for its batch, while the trainer hands it
weights) gives one warning line and the trainer generates again, and no process is left behind."""
from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path

import pytest
import torch
from test_docs import undocumented_metrics  # tests/ is on sys.path

from simple_grpo.train import rollout_source, sampler
from simple_grpo.wire import handoff

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import grpo_ref_split  # noqa: E402

SMALL = dict(prompts_per_step=2, num_generations=4, micro_batch_size=4, max_new_tokens=8, beta=0.04,
             lr=1e-3, warmup_steps=1, eval_every=0, save_every=-1, plot_every=0, rewards="overlong",
             ref_timeout=120)


def _args(model_dir, run_dir, **kw) -> list[str]:
    return [f"--{k}={v}" for k, v in {"model": model_dir, "run_dir": run_dir, **SMALL, **kw}.items()]


def _rows(run_dir) -> list[dict]:
    return [json.loads(x) for x in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def _pause_after_publish(monkeypatch, seconds: float) -> None:
    """The trainer pauses after each publish: the sampler runs as far ahead as its gate lets it."""
    publish = sampler.Overlap.publish

    def slow(self, *a, **kw):
        got = publish(self, *a, **kw)
        time.sleep(seconds)
        return got

    monkeypatch.setattr(sampler.Overlap, "publish", slow)


def _spy_samplers(monkeypatch) -> list:
    started = []
    start = sampler.Sampler.start

    def spy(*a, **kw):
        s = start(*a, **kw)
        started.append(s)
        return s

    monkeypatch.setattr(sampler.Sampler, "start", spy)
    return started


def _spy_trained_prompts(monkeypatch) -> list:
    """Every trained batch's prompts (token tuples, one per group), a set per step."""
    from simple_grpo.train import policy_step

    seen, train = [], policy_step.train_on_batch

    def spy(*a, **kw):
        m, batch = train(*a, **kw)
        ids, lens = batch.prompt_ids.tolist(), batch.prompt_lens.tolist()
        seen.append({tuple(row[len(row) - n:]) for row, n in zip(ids, lens)})
        return m, batch

    monkeypatch.setattr(policy_step, "train_on_batch", spy)
    return seen


def test_overlap_trains_the_samplers_batches_one_step_stale(tiny_model_dir, tmp_path, monkeypatch):
    started = _spy_samplers(monkeypatch)
    grpo_ref_split.main(_args(tiny_model_dir, tmp_path, steps=6, overlap="true"))
    rows = _rows(tmp_path)
    assert [r["step"] for r in rows] == list(range(1, 7))
    assert all(r["overlap_batch"] == 1.0 and r["local_generation"] == 0.0 for r in rows), rows
    staleness = [r["batch_staleness"] for r in rows]
    assert max(staleness) <= 1 and staleness[0] == 0 and staleness.count(1) >= 4, staleness
    # --tis=auto is token with overlap: every step reports it
    assert all("tis_weight_mean" in r and "tis_ratio_max" in r for r in rows)
    assert not undocumented_metrics(rows), "metrics missing from docs/metrics.md"  # the sampler's
    (s,) = started
    assert s.proc.poll() is not None, "the sampler is stopped at the end"
    assert not list(Path("/dev/shm").glob("simple_grpo-*")), "no file in shared memory"
    # every step but the last handed its weights to the sampler; the sampler took every one
    assert all(r["sampler_send_seconds"] > 0 for r in rows[:-1]) and rows[-1]["sampler_send_seconds"] == 0
    assert "loaded weight version 5 (trainer step 5)" in s.log.read_text()
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["overlap"] == "true" and saved["tis"] == "token"


@pytest.mark.slow
def test_overlap_with_two_iterations_is_one_step_stale(tiny_model_dir, tmp_path, monkeypatch):
    """--num_iterations=2: a step advances the weights 2 versions, and the sampler's gate waits
    for the weights of the step before last, counted in steps: every trained batch is exactly one
    step (2 versions) old. The trainer pauses after each publish so that the sampler runs as far
    ahead as its gate lets it (a gate counting versions as steps would let it run further)."""
    _pause_after_publish(monkeypatch, 1.5)
    grpo_ref_split.main(_args(tiny_model_dir, tmp_path, steps=6, overlap="true", num_iterations=2))
    rows = _rows(tmp_path)
    assert [r["step"] for r in rows] == list(range(1, 7))
    assert all(r["overlap_batch"] == 1.0 for r in rows), [r["overlap_batch"] for r in rows]
    assert [r["batch_staleness"] for r in rows] == [0, 2, 2, 2, 2, 2], [r["batch_staleness"] for r in rows]
    assert all(r["stale_dropped"] == 0 for r in rows), [r["stale_dropped"] for r in rows]
    # batches.jsonl: the version each trained batch was sampled with, against the trainer's
    # version when the step began (the previous row's, 0 for the first step)
    trained = [json.loads(x) for x in (tmp_path / "batches.jsonl").read_text().splitlines()]
    before = {r["step"] + 1: r["weight_version"] for r in rows} | {1: 0}
    assert [before[b["step"]] - b["weight_version"] for b in trained] == [0, 2, 2, 2, 2, 2], trained


@pytest.mark.parametrize("when", [
    pytest.param("between_steps", marks=pytest.mark.slow),  # found dead when step 3 begins
    "while_waiting",  # killed while the trainer waits for step 3's batch: the wait ends at once
    "while_handing",  # killed as step 2's weights go to it: the send ends at once
])
def test_a_dead_sampler_falls_back_to_local_generation(tiny_model_dir, tmp_path, monkeypatch, capsys, when):
    started = _spy_samplers(monkeypatch)
    conns = []
    init = rollout_source.RefConnection.__init__
    monkeypatch.setattr(rollout_source.RefConnection, "__init__",
                        lambda self, *a, **kw: (conns.append(self), init(self, *a, **kw))[1])

    def kill():  # the sampler dies, and the batches it had queued are lost with it
        os.kill(started[0].proc.pid, signal.SIGKILL)
        started[0].proc.wait()
        while conns[0].client.get(wait_s=0.0) is not None:
            pass

    if when == "between_steps":
        begin = sampler.Overlap.begin_step
        monkeypatch.setattr(sampler.Overlap, "begin_step",
                            lambda self, step: (kill() if step == 3 else None, begin(self, step))[1])
    elif when == "while_handing":
        send = handoff.Sender.send
        monkeypatch.setattr(handoff.Sender, "send", lambda self, version, step, *a, **kw: (
            kill() if step == 2 else None, send(self, version, step, *a, **kw))[1])
    else:
        wait = rollout_source.RefConnection.next_batch
        calls = []

        def next_batch(self, version, stop=None):
            calls.append(version)
            if len(calls) == 3:
                kill()
            return wait(self, version, stop=stop)

        monkeypatch.setattr(rollout_source.RefConnection, "next_batch", next_batch)
    prompts = _spy_trained_prompts(monkeypatch)
    grpo_ref_split.main(_args(tiny_model_dir, tmp_path, steps=5, overlap="true"))
    rows = _rows(tmp_path)
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5]
    assert [r["overlap_batch"] for r in rows[:2]] == [1.0, 1.0]
    # the trainer's own batches continue the prompt stream after the sampler's: no prompt of
    # steps 1-2 is drawn again (the stream has thousands; it stood at its start while the sampler ran)
    assert len(prompts) == 5 and all(len(p) == 2 for p in prompts), prompts
    assert len(set().union(*prompts)) == 10, "a prompt the sampler drew was drawn again"
    # step 3 on: the trainer's own batches (while waiting: the wait for step 3's batch ends at once)
    assert all(r["local_generation"] == 1.0 for r in rows[2:]), [r["local_generation"] for r in rows]
    warnings = [line for line in capsys.readouterr().err.splitlines() if "overlap sampler stopped" in line]
    assert len(warnings) == 1 and "exit code -9" in warnings[0], warnings


@pytest.mark.parametrize("overrides, want", [
    ({"overlap": "false"}, "false"),                        # asked off
    ({"overlap": "auto", "beta": 0.0}, "false"),            # auto: no reference server to sit beside
    ({"overlap": "auto", "lora_r": 4}, "false"),            # auto: LoRA's reference is in-process
    ({"overlap": "auto", "ref_url": "http://x:1"}, "false"),  # auto: a server of the user's
    ({"overlap": "true", "beta": 0.0}, "true"),             # asked on: a server is started for it
    ({"overlap": "auto", "num_iterations": 5}, "false"),    # auto: 5 versions a step > --max_staleness
    ({"overlap": "true", "num_iterations": 5, "max_staleness": -1}, "true"),  # nothing dropped
    ({"overlap": "true", "max_ahead": 0, "max_staleness": 0}, "true"),  # on-policy: nothing stale
])
def test_overlap_auto_and_its_tis(overrides, want):
    from types import SimpleNamespace

    from simple_grpo.cli import parse_config
    from simple_grpo.common.config import TrainConfig, resolve

    cfg = resolve(parse_config(TrainConfig, [f"--{k}={v}" for k, v in overrides.items()]))
    dist = SimpleNamespace(device=SimpleNamespace(type="cpu"), local_world_size=1, world_size=1, rank=0)
    got = sampler.finalize(cfg, dist)
    late = want == "true" and overrides.get("max_ahead") != 0  # --max_ahead=0: on-policy, no TIS
    assert got.overlap == want and got.tis == ("token" if late else "off")


def test_overlap_true_with_a_users_server_is_one_line():
    from types import SimpleNamespace

    from simple_grpo.cli import parse_config
    from simple_grpo.errors import UserError
    from simple_grpo.common.config import TrainConfig, resolve

    cfg = resolve(parse_config(TrainConfig, ["--overlap=true", "--ref_url=http://x:1"]))
    dist = SimpleNamespace(device=SimpleNamespace(type="cpu"), local_world_size=1, world_size=1, rank=0)
    with pytest.raises(UserError, match="--overlap=true starts a sampler"):
        sampler.finalize(cfg, dist)


def test_overlap_true_whose_batches_max_staleness_drops_is_one_line():
    from types import SimpleNamespace

    from simple_grpo.cli import parse_config
    from simple_grpo.errors import UserError
    from simple_grpo.common.config import TrainConfig, resolve

    cfg = resolve(parse_config(TrainConfig, ["--overlap=true", "--num_iterations=3", "--max_staleness=2"]))
    dist = SimpleNamespace(device=SimpleNamespace(type="cpu"), local_world_size=1, world_size=1, rank=0)
    with pytest.raises(UserError, match="raise --max_staleness to 3 or -1"):
        sampler.finalize(cfg, dist)


@pytest.mark.slow
def test_a_killed_trainer_leaves_no_sampler(tiny_model_dir, tmp_path):
    """kill -9 of the trainer: its sampler gets SIGTERM (PDEATHSIG) and exits (the trainer had no
    chance to stop it), even while it waits for weights that will never come."""
    import subprocess

    from simple_grpo.train.engine import standalone_env

    log = tmp_path / "trainer.log"
    p = subprocess.Popen([sys.executable, str(ROOT / "grpo_ref_split.py"),
                          *_args(tiny_model_dir, tmp_path / "run", steps=1000, overlap="true")],
                         cwd=ROOT, env=standalone_env(OMP_NUM_THREADS="1"), stdout=open(log, "w"),
                         stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        while "overlap: a sampler on" not in log.read_text() or not (tmp_path / "run" / "metrics.jsonl").exists():
            assert p.poll() is None and time.monotonic() < deadline, log.read_text()[-2000:]
            time.sleep(0.2)
        pid = int(log.read_text().split("(pid ")[1].split(",")[0])
        os.kill(pid, 0)  # running
        p.kill()
        p.wait()
        deadline = time.monotonic() + 30
        while _running(pid) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not _running(pid), "the sampler exits when its trainer dies"
    finally:
        if p.poll() is None:
            p.kill()


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    status = Path(f"/proc/{pid}/status")
    return not (status.exists() and "State:\tZ" in status.read_text())  # a zombie has exited


@pytest.mark.slow
def test_two_seeded_overlap_runs_end_bitwise_equal(tiny_model_dir, tmp_path, monkeypatch):
    """The sampler receives every step's weights in order, so each batch is sampled with exactly
    the weights its schedule names, whatever the timing: two runs with one seed end with bitwise
    equal weights, the second with a trainer that pauses 1 s after each publish (the sampler then
    waits at its gate) and the first without (the trainer waits for the sampler)."""
    from safetensors.torch import load_file

    def final(run_dir):
        return load_file(str(Path(run_dir) / "final" / "model.safetensors"))

    grpo_ref_split.main(_args(tiny_model_dir, tmp_path / "a", steps=5, overlap="true"))
    _pause_after_publish(monkeypatch, 1.0)
    grpo_ref_split.main(_args(tiny_model_dir, tmp_path / "b", steps=5, overlap="true"))
    a, b = final(tmp_path / "a"), final(tmp_path / "b")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])][:3]
    assert [r["reward_mean"] for r in _rows(tmp_path / "a")] == [r["reward_mean"] for r in _rows(tmp_path / "b")]


@pytest.mark.slow
def test_overlap_zero_steps_ahead_is_the_synchronous_run(tiny_model_dir, tmp_path):
    """--max_ahead=0: the sampler samples each batch with the current weights, the trainer rank's
    own prompts under the same seeds, and its batch is the trainer's (on-policy): the run is
    bitwise the synchronous one, weights and every step's reward."""
    from safetensors.torch import load_file

    grpo_ref_split.main(_args(tiny_model_dir, tmp_path / "sync", steps=4, overlap="false"))
    grpo_ref_split.main(_args(tiny_model_dir, tmp_path / "zero", steps=4, overlap="true", max_ahead=0))
    rows = _rows(tmp_path / "zero")
    assert all(r["overlap_batch"] == 1.0 and r["local_generation"] == 0.0 for r in rows), rows
    assert [r["batch_staleness"] for r in rows] == [0] * 4
    trained = [json.loads(x) for x in (tmp_path / "zero" / "batches.jsonl").read_text().splitlines()]
    assert {t["producer"] for t in trained} == {"trainer-sampler"}, trained  # on-policy, as ours
    a = load_file(str(tmp_path / "sync" / "final" / "model.safetensors"))
    b = load_file(str(tmp_path / "zero" / "final" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])][:3]
    for key in ("reward_mean", "loss", "completion_len_mean"):
        assert [r[key] for r in rows] == [r[key] for r in _rows(tmp_path / "sync")], key


@pytest.mark.slow
def test_a_killed_overlapped_run_resumes_exactly(tiny_model_dir, tmp_path):
    """kill -9 of an overlapped trainer after a checkpoint, then --resume=auto: the final weights
    equal the uninterrupted run's. The checkpoint holds the next step's batch (sampled with the
    weights of the step before, which no checkpoint has) and the sampler's position after it."""
    import subprocess

    from safetensors.torch import load_file

    from simple_grpo.train.checkpoint import latest_checkpoint
    from simple_grpo.train.engine import standalone_env

    kw = dict(steps=10, overlap="true", save_every=2)
    grpo_ref_split.main(_args(tiny_model_dir, tmp_path / "straight", **kw))
    run, log = tmp_path / "killed", tmp_path / "killed.log"
    p = subprocess.Popen([sys.executable, str(ROOT / "grpo_ref_split.py"), *_args(tiny_model_dir, run, **kw)],
                         cwd=ROOT, env=standalone_env(OMP_NUM_THREADS="1"), stdout=open(log, "w"),
                         stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 180
        while latest_checkpoint(run / "checkpoints") is None:
            assert p.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.05)
        p.kill()
        p.wait()
    finally:
        if p.poll() is None:
            p.kill()
    held = latest_checkpoint(run / "checkpoints").name
    assert not (run / "final").exists() and held != "step-000010", "killed too late to test a resume"
    grpo_ref_split.main(_args(tiny_model_dir, run, resume="auto", **kw))
    a = load_file(str(tmp_path / "straight" / "final" / "model.safetensors"))
    b = load_file(str(run / "final" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a), f"resumed from {held}: " + \
        str([k for k in a if not torch.equal(a[k], b[k])][:3])
    rows = _rows(run)
    assert [r["step"] for r in rows] == list(range(1, 11))
    assert [r["reward_mean"] for r in rows] == [r["reward_mean"] for r in _rows(tmp_path / "straight")]
