"""Weights are published only for someone: a trainer with --ref_url and no generation worker
uploads nothing; once a worker has polled the server, the current weights go out at once, then
every --publish_every steps; weights over the server's --max_weights_mb are one line, not a 413
per step. Real HTTP servers on 127.0.0.1, the real publisher and trainer."""
from __future__ import annotations

import json
import sys
import threading
import time
from pathlib import Path

import torch

from simple_grpo.train.publish import WeightPublisher, publish_bytes
from simple_grpo.wire.client import RefClient
from simple_grpo.wire.weights import load_safetensors_file

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import grpo_ref_split  # noqa: E402


def test_trainer_with_a_server_and_no_worker_uploads_nothing(tiny_model_dir, ref_server, tmp_path):
    srv = ref_server()
    grpo_ref_split.main([f"--model={tiny_model_dir}", f"--ref_url={srv.url}", f"--run_dir={tmp_path}",
                         "--steps=3", "--prompts_per_step=2", "--num_generations=4", "--micro_batch_size=4",
                         "--max_new_tokens=6", "--eval_every=0", "--save_every=0", "--plot_every=0",
                         "--beta=0.04", "--rewards=overlong", "--publish_every=1"])
    assert RefClient(srv.url).weights_version()["version"] is None, "nothing uploaded for nobody"
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["publishes"] for r in rows] == [0, 0, 0] and all(r["workers_seen"] == 0 for r in rows)
    assert RefClient(srv.url).stats()["compute_calls"] >= 3, "the server scored every step's batch"


def test_first_worker_gets_weights_at_once_then_every_k_steps(tiny_model, ref_server):
    srv = ref_server()
    pub = WeightPublisher(RefClient(srv.url))
    client = RefClient(srv.url)
    uploaded = []
    for step in range(1, 8):
        if step == 3:  # a worker starts: its first poll is what the trainer waits for
            client.weights_version("gen-0", 0)
        if pub.step_end(tiny_model, version=step, step=step, every=4, wait=True):
            uploaded.append(step)
    pub.close()
    assert uploaded == [3, 4], "at once when the worker appears (step 3), then at multiples of 4"
    assert client.weights_version()["version"] == 4 and pub.metrics()["workers_seen"] == 1


def test_weights_over_the_server_limit_are_one_line_and_no_upload(tiny_model, ref_server):
    srv = ref_server(max_weights_mb=0.01)  # 10 KiB: the tiny model is larger
    lines = []
    pub = WeightPublisher(RefClient(srv.url), log=lines.append)
    RefClient(srv.url).weights_version("gen-0", 0)
    assert not any(pub.step_end(tiny_model, version=s, step=s, every=1, wait=True) for s in range(1, 5))
    pub.close()
    assert len(lines) == 1 and "--max_weights_mb" in lines[0], lines
    m = pub.metrics()
    assert m["publish_failures"] == 0 and m["publishes"] == 0
    assert RefClient(srv.url).weights_version() == {"version": None, "run_id": None}


def test_publish_bytes_counts_tied_tensors_once_in_the_publish_dtype(tiny_model):
    state = tiny_model.state_dict()
    unique = {t.data_ptr(): t for t in state.values()}  # tied embeddings: one storage, two names
    assert len(unique) < len(state), "the tiny model ties its embeddings"
    fp32 = sum(t.numel() * 4 for t in unique.values())
    assert publish_bytes(state, None) == fp32
    assert publish_bytes(state, torch.bfloat16) == fp32 // 2


def test_a_new_run_resets_the_server_and_a_resumed_run_keeps_it(tiny_model_dir, ref_server, tmp_path,
                                                                  capsys):
    """Tweak and rerun against the same server: the new run (another run id) drops the old run's
    weights and queue instead of being refused for its 'newer' weight version; a resume of a run
    (its run id comes back from the checkpoint) keeps what the server holds."""
    srv = ref_server()
    client = RefClient(srv.url)
    client.weights_version("gen-0", 0)  # a worker exists: runs publish

    def run(run_dir, steps, **kw):
        grpo_ref_split.main([f"--model={tiny_model_dir}", f"--ref_url={srv.url}", f"--run_dir={run_dir}",
                             f"--steps={steps}", "--prompts_per_step=2", "--num_generations=4",
                             "--micro_batch_size=4", "--max_new_tokens=6", "--eval_every=0", "--save_every=2",
                             "--plot_every=0", "--rewards=overlong", "--publish_every=1",
                             *[f"--{k}={v}" for k, v in kw.items()]])
        return capsys.readouterr().out

    out = run(tmp_path / "a", 2)
    assert client.weights_version()["version"] == 2 and "new run" not in out
    out = run(tmp_path / "a", 3, resume="true")  # the same run, resumed
    assert "new run" not in out and client.weights_version()["version"] == 3, out[-2000:]
    out = run(tmp_path / "b", 1)  # another run: was refused ("holds weight version 3, newer than 0")
    assert "new run" in out and "dropped the previous run's weights" in out
    assert client.weights_version()["version"] == 1, "run b's own weights"


def test_the_size_check_uses_the_publish_dtype(tiny_model, ref_server):
    """A server limit between the policy's bf16 and fp32 sizes: --publish_dtype=bfloat16 fits and
    publishes (a BF16 file), the fp32 publisher is refused in one line and uploads nothing."""
    fp32 = publish_bytes(tiny_model.state_dict(), None)
    srv = ref_server(max_weights_mb=0.75 * fp32 / 2**20)
    RefClient(srv.url).weights_version("gen-0", 0)
    lines = []
    full = WeightPublisher(RefClient(srv.url), dtype=None, log=lines.append)
    assert not full.step_end(tiny_model, version=1, step=1, every=1, wait=True)
    full.close()
    assert len(lines) == 1 and "--publish_dtype=bfloat16" in lines[0] and full.disabled, lines
    half = WeightPublisher(RefClient(srv.url), dtype=torch.bfloat16, log=lines.append)
    assert half.step_end(tiny_model, version=1, step=1, every=1, wait=True)
    half.close()
    assert len(lines) == 1 and half.disabled is None
    meta = RefClient(srv.url).weights_version()
    assert meta["version"] == 1 and meta["dtype"] == "BF16" and meta["bytes"] < 0.75 * fp32
    assert half.metrics()["publishes"] == 1 and half.metrics()["publish_failures"] == 0


def _adam_step(model: torch.nn.Module, opt: torch.optim.Optimizer, g: torch.Generator) -> None:
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=g)
    opt.step()


def test_the_optimizer_waits_for_the_read_and_the_server_gets_that_version(tiny_model, ref_server,
                                                                          tmp_path, monkeypatch):
    """A publish returns at once and reads the live weights in the background; the next optimizer
    step waits for that read (the hook), so the version on the server is exactly the weights of
    the step that published it, not a mix with the next one. Version 2 goes up as a delta."""
    from simple_grpo.wire import delta

    srv = ref_server(weights_dir=str(tmp_path / "w"))
    model = type(tiny_model)(tiny_model.config)
    model.load_state_dict(tiny_model.state_dict())
    opt, g = torch.optim.AdamW(model.parameters(), lr=1e-5), torch.Generator().manual_seed(0)
    pub = WeightPublisher(RefClient(srv.url), dtype=torch.bfloat16)
    pub.hook(opt)
    pub.publish(model, version=1, wait=True)
    _adam_step(model, opt, g)
    want = {k: v.detach().to(torch.bfloat16) for k, v in model.state_dict().items()}
    real, reading = delta.read_changes, threading.Event()

    def slow_read(*args, **kw):
        reading.set()
        time.sleep(1.5)  # a read pass longer than what the next step does before its update
        return real(*args, **kw)
    monkeypatch.setattr(delta, "read_changes", slow_read)
    t0 = time.perf_counter()
    assert pub.publish(model, version=2)
    assert time.perf_counter() - t0 < 0.5, "the publish itself does not wait for the read"
    assert reading.wait(10)
    _adam_step(model, opt, g)  # must wait for the read of version 2
    pub.close()
    m = pub.metrics()
    assert m["publish_blocked_seconds"] > 0.5 and m["publish_delta"] == 1 and m["published_version"] == 2
    path = RefClient(srv.url).download_weights(tmp_path / "v2.safetensors")
    got = load_safetensors_file(path)
    for k, v in got.items():
        assert torch.equal(v.view(torch.int16), want[k].view(torch.int16)), k
    assert not all(torch.equal(p.detach().to(torch.bfloat16), want[k])  # the step did change them
                   for k, p in model.state_dict().items())
