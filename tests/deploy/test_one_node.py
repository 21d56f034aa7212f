"""The README's one-node recipes, run with their own command lines on 2 CPU ranks and the tiny
model (tests/deploy/recipes.py says what is scaled down): the split reference server beside a
DeepSpeed trainer, the reference started for you, and LoRA in one process."""
from __future__ import annotations

import json
import re
import time

import pytest

from deploy_fixtures import assert_every_rank_trained_every_step, gsm8k_jsonl, procs  # noqa: F401 (fixtures)
from recipes import option, recipe, scale

from simple_grpo.train.engine import free_port
from simple_grpo.wire.client import RefClient


def wait_finished(p, log, timeout=300) -> str:
    rc = p.wait(timeout=timeout)
    out = log.read_text()
    assert rc == 0, out[-4000:]
    return out


@pytest.mark.slow
def test_split_reference_server_beside_a_deepspeed_trainer(tiny_model_dir, gsm8k_jsonl, procs, tmp_path):
    server_cmd, trainer_cmd = recipe("split")
    assert server_cmd.script == "ref_server.py" and server_cmd.background
    assert trainer_cmd.argv[0] == "deepspeed" and trainer_cmd.script == "grpo_ref_split.py"
    port, readme_port = free_port(), option(server_cmd, "port")
    srv = procs(scale(server_cmd, model=tiny_model_dir, port=port, extra={"torch_threads": "1"}),
                tmp_path / "server.log")
    url = f"http://127.0.0.1:{port}"
    RefClient(url).wait_ready(120)
    run = tmp_path / "run"
    argv = scale(trainer_cmd, model=tiny_model_dir, run_dir=run, data=gsm8k_jsonl, master_port=free_port(),
                 subs={f":{readme_port}": f":{port}"})
    assert f"--ref_url={url}" in argv
    wait_finished(procs(argv, tmp_path / "trainer.log"), tmp_path / "trainer.log")
    metrics = assert_every_rank_trained_every_step(run, steps=3, ranks=2)
    client = RefClient(url)
    assert all(r["kl"] == 0.0 for r in metrics), "step 1 is exact; no reward signal yet on this model"
    assert client.stats()["compute_calls"] >= 3 * 2, "the server scored every rank's batch every step"
    assert client.weights_version()["version"] is None, "no weights uploaded: no worker exists"
    assert client.stats()["workers"] == {} and srv.poll() is None


def test_reference_started_for_you(tiny_model_dir, procs, tmp_path):
    (cmd,) = recipe("auto")
    assert cmd.argv[0] == "torchrun" and option(cmd, "beta") == "0.04" and not option(cmd, "ref_url")
    run = tmp_path / "run"
    log = tmp_path / "trainer.log"
    out = wait_finished(procs(scale(cmd, model=tiny_model_dir, run_dir=run, master_port=free_port()), log),
                        log)
    started = re.findall(r"started a reference server at (http://\S+) on (\S+)", out)
    assert started == [(started[0][0], "cpu")] and started[0][0].startswith("http://127.0.0.1:"), started
    metrics = assert_every_rank_trained_every_step(run, steps=3, ranks=2)
    assert metrics[0]["kl"] == 0.0 and all("kl" in r for r in metrics)
    assert "published_version" not in metrics[-1], "no publisher: no worker can exist"


@pytest.mark.slow
def test_lora_in_one_process(tiny_model_dir, procs, tmp_path):
    (cmd,) = recipe("lora")
    assert cmd.argv[0] == "python" and option(cmd, "lora_r") == "16"
    run, log = tmp_path / "run", tmp_path / "trainer.log"
    t0 = time.monotonic()
    out = wait_finished(procs(scale(cmd, model=tiny_model_dir, run_dir=run, ranks=1), log), log)
    assert "started a reference server" not in out, "LoRA's reference is the adapter-disabled model"
    metrics = assert_every_rank_trained_every_step(run, steps=3, ranks=1)
    assert metrics[0]["kl"] == 0.0 and all("kl" in r for r in metrics)
    assert (run / "final" / "adapter").is_dir() and (run / "final" / "model.safetensors").exists()
    print(f"lora recipe: {time.monotonic() - t0:.1f} s")


@pytest.mark.slow
def test_overlap_feeds_two_ranks(tiny_model_dir, procs, tmp_path):
    """The N-GPU overlap recipe on 2 CPU ranks: the one sampler's batches reach both ranks every
    step, at most one step stale; the 1+1 recipe is the same command with one rank."""
    (one,) = recipe("overlap")
    assert option(one, "overlap") == "true" and one.argv[0].endswith("python")
    (cmd,) = recipe("overlap_ranks")
    assert cmd.argv[0] == "torchrun" and option(cmd, "overlap") == "true"
    run, log = tmp_path / "run", tmp_path / "trainer.log"
    out = wait_finished(procs(scale(cmd, model=tiny_model_dir, run_dir=run, master_port=free_port(),
                                    extra={"steps": "4", "rewards": "overlong"}), log), log)
    assert "overlap: a sampler on cpu" in out
    metrics = assert_every_rank_trained_every_step(run, steps=4, ranks=2)
    assert all(r["overlap_batch"] == 1.0 and r["batch_staleness"] <= 1 for r in metrics), metrics
    assert any(r["batch_staleness"] == 1 for r in metrics)
    trained = [json.loads(x) for x in (run / "batches.jsonl").read_text().splitlines()]
    assert [t["part"] for t in trained] == [t["rank"] for t in trained], "each rank trains its own part"
