"""The README's multi-host recipes on separate network hosts (namespaces joined by a bridge: each
host has its own loopback, so 127.0.0.1 on one is not the other): two training nodes with the
reference started for them, and generation workers on a third host that join late and leave."""
from __future__ import annotations

import re
import time

import pytest

from deploy_fixtures import assert_every_rank_trained_every_step, hosts, procs, rows  # noqa: F401 (fixtures)
from recipes import option, recipe, scale

from simple_grpo.wire.client import RefClient


def wait_for(cond, timeout: float, what: str, procs=()) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        for p in procs:
            assert p.poll() is None, f"a process ended while waiting for {what}"
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def test_two_nodes_one_rank_each_with_the_reference_started_for_them(tiny_model_dir, hosts, procs,
                                                                       tmp_path):
    (cmd,) = recipe("two_nodes")
    assert cmd.argv[0] == "torchrun" and "--nnodes=2" in cmd.argv and option(cmd, "beta") == "0.04"
    h = hosts(2)
    run = tmp_path / "run"  # both hosts see this filesystem, as /shared would be
    nodes = []
    for i in range(2):
        argv = scale(cmd, model=tiny_model_dir, run_dir=run, ranks=1, extra={"ref_timeout": "60"},
                     subs={"$NODE_RANK": str(i), "10.0.0.1": h.addr[0]})
        nodes.append(procs(argv, tmp_path / f"node{i}.log", env={"GLOO_SOCKET_IFNAME": h.ifname[i]},
                           prefix=h.prefix(i)))
    for i, p in enumerate(nodes):
        assert p.wait(timeout=300) == 0, (tmp_path / f"node{i}.log").read_text()[-4000:]
    out = (tmp_path / "node0.log").read_text()
    started = re.findall(r"started a reference server at http://([\d.]+):\d+ on (\S+)", out)
    assert started == [(h.addr[0], "cpu")], f"reachable from node 1, not 127.0.0.1: {started}"
    assert re.search(r"\[ref_server\] .* auth on,", out), "a server off loopback requires its token"
    metrics = assert_every_rank_trained_every_step(run, steps=3, ranks=2)
    assert metrics[0]["kl"] == 0.0, "node 1 got the reference log-probs of its own batches"


@pytest.mark.slow
def test_workers_on_a_third_host_join_late_and_leave(tiny_model_dir, hosts, procs, tmp_path):
    server_cmd, trainer_cmd, worker_cmd = recipe("workers")
    assert server_cmd.background and option(server_cmd, "host") == "0.0.0.0"
    assert option(worker_cmd, "mode") == "generate" and option(worker_cmd, "trainer_ranks") == "$RANKS"
    h = hosts(3)  # 0: reference server, 1: trainer, 2: generation box
    token, port = "recipe-token", option(server_cmd, "port")
    subs = {"$TOKEN": token, "HOST": h.addr[0], "$RANKS": "1"}
    procs(scale(server_cmd, model=tiny_model_dir, subs=subs, port=int(port), extra={"torch_threads": "1"}),
          tmp_path / "server.log", prefix=h.prefix(0))
    client = RefClient(f"http://{h.addr[0]}:{port}", token=token)
    client.wait_ready(120)
    run = tmp_path / "run"
    sizes = {"steps": "5", "generate_locally": "false"}  # trains only what the workers send
    trainer = procs(scale(trainer_cmd, model=tiny_model_dir, run_dir=run, ranks=1, subs=subs,
                          master_port=29500, extra=sizes), tmp_path / "trainer.log", prefix=h.prefix(1))
    wait_for(lambda: "[trainer] run dir" in (tmp_path / "trainer.log").read_text(), 120, "the trainer",
             [trainer])
    time.sleep(1.0)  # the trainer waits for a batch; with no worker it must upload nothing
    assert client.weights_version()["version"] is None, "weights uploaded while no worker exists"

    worker = scale(worker_cmd, model=tiny_model_dir, subs=subs, ranks=1,
                   extra={k: v for k, v in (("num_generations", "4"), ("max_new_tokens", "8"),
                                            ("prompts_per_step", "2"), ("micro_batch_size", "4"))})
    a = procs(worker + ["--worker_batches=2"], tmp_path / "a.log", prefix=h.prefix(2))
    assert a.wait(timeout=180) == 0, (tmp_path / "a.log").read_text()[-3000:]  # joined, then left
    wait_for(lambda: (client.weights_version().get("version") or 0) >= 1, 120, "a publish", [trainer])
    procs(worker + ["--worker_index=1"], tmp_path / "b.log", prefix=h.prefix(2))  # joins late
    assert trainer.wait(timeout=300) == 0, (tmp_path / "trainer.log").read_text()[-4000:]

    assert_every_rank_trained_every_step(run, steps=5, ranks=1)
    trained = rows(run / "batches.jsonl")
    producers = [t["producer"] for t in trained]
    assert all(p.startswith("gen-") for p in producers) and len(set(producers)) == 2, producers
    late = [t for t in trained if t["producer"] == producers[-1]]
    assert late and all(t["weight_version"] >= 1 for t in late), f"b trained on fresh weights: {late}"
    assert re.search(r"loaded weight version [1-9]", (tmp_path / "b.log").read_text())
