"""The overlap sampler's weights handoff (simple_grpo/wire/handoff.py) between two real processes
over gloo: every publish arrives bit-exact in the receiver's model in place (tied tensors, tensors
split across buckets and larger than one), a step that trained nothing sends its step alone, a
dead receiver ends the sender's wait at once, a SIGTERM stops a receiver that waits; and the gate
that names the step whose weights each batch is sampled with."""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from simple_grpo.models import build_tiny_model
from simple_grpo.wire import handoff

ROOT = Path(__file__).resolve().parents[1]

# the receiver: joins, then prints one JSON line per publish (version, step, whether tensors came,
# the sha256 of every tensor of its model's state dict); exits after `count` publishes
RECEIVER = """
import hashlib, json, sys
import torch
from simple_grpo.models import build_tiny_model
from simple_grpo.gen.worker import published_params
from simple_grpo.wire.handoff import Receiver
address, count, dtype = sys.argv[1], int(sys.argv[2]), getattr(torch, sys.argv[3])
model = build_tiny_model(seed=99).to(dtype)
r = Receiver.join(address, "cpu", timeout_s=60)
for _ in range(count):
    version, step, came = r.recv(lambda *a: published_params(model, *a))
    sha = {k: hashlib.sha256(v.float().numpy().tobytes()).hexdigest() for k, v in model.state_dict().items()}
    print(json.dumps({"version": version, "step": step, "came": came, "first": r.first, "sha": sha}), flush=True)
"""


def _sha(model) -> dict[str, str]:
    import hashlib

    return {k: hashlib.sha256(v.float().numpy().tobytes()).hexdigest() for k, v in model.state_dict().items()}


def _send(sender, model, version, step, alive, changed=True) -> dict:
    from simple_grpo.train.publish import unique_tensors

    tensors, aliases = unique_tensors(model)
    return sender.send(version, step, alive, tensors, aliases) if changed else \
        sender.send(version, step, alive)


def _receiver(sender, count: int, dtype: str = "float32") -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", RECEIVER, str(sender.address), str(count), dtype],
                            cwd=ROOT, stdout=subprocess.PIPE, text=True)


@pytest.mark.parametrize("bucket_bytes", [
    256 << 20,  # one bucket for the whole model
    5000,       # many buckets; the embedding (320 x 64 x 4 bytes) is larger than one: its own
])
def test_every_publish_arrives_bit_exact_in_place(bucket_bytes):
    model = build_tiny_model(seed=1)
    sender = handoff.Sender.listen("gloo", "cpu", timeout_s=60, bucket_bytes=bucket_bytes)
    proc = _receiver(sender, 4)
    alive = lambda: proc.poll() is None  # noqa: E731
    try:
        sender.connect(alive)
        plan = [(0, 5), (2, 6), (2, 7), (4, 8)]  # (version, step): step 7 trained nothing
        got = []
        for version, step in plan:
            if step != 7:
                with torch.no_grad():
                    for p in model.parameters():
                        p.add_(torch.randn_like(p) * 0.01)
            sent = _send(sender, model, version, step, alive, changed=step != 7)
            got.append(json.loads(proc.stdout.readline()))
            assert (got[-1]["version"], got[-1]["step"], got[-1]["first"]) == (version, step, 5)
            assert got[-1]["came"] == (step != 7), "a step that trained nothing sends its step alone"
            assert (sent["bytes"] == 0) == (step == 7)
            assert got[-1]["sha"] == _sha(model), f"the receiver's model equals the sender's at step {step}"
        assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()  # tied: sent once
        assert proc.wait(timeout=30) == 0
    finally:
        proc.kill()
        sender.close()


def test_a_receiver_in_another_dtype_gets_the_values_converted():
    model = build_tiny_model(seed=2)
    sender = handoff.Sender.listen("gloo", "cpu", timeout_s=60)
    proc = _receiver(sender, 1, "bfloat16")
    try:
        sender.connect(lambda: proc.poll() is None)
        _send(sender, model, 1, 1, lambda: proc.poll() is None)
        got = json.loads(proc.stdout.readline())
        assert got["sha"] == _sha(build_tiny_model(seed=2).to(torch.bfloat16))
    finally:
        proc.kill()
        sender.close()


def test_a_dead_receiver_ends_the_senders_wait_at_once():
    """The receiver takes one publish and dies; the next send (which waits for it to take the
    header) ends within seconds, not at the group's timeout."""
    model = build_tiny_model(seed=3)
    sender = handoff.Sender.listen("gloo", "cpu", timeout_s=600)
    proc = _receiver(sender, 1)
    alive = lambda: proc.poll() is None  # noqa: E731
    try:
        sender.connect(alive)
        _send(sender, model, 1, 1, alive)
        proc.stdout.readline()
        time.sleep(0.5)
        t = time.monotonic()
        with pytest.raises((handoff.HandoffError, RuntimeError)):
            _send(sender, model, 2, 2, alive)
        assert time.monotonic() - t < 10
    finally:
        proc.kill()
        sender.close()


def test_a_sender_whose_receiver_never_joins_is_told_when_it_dies():
    sender = handoff.Sender.listen("gloo", "cpu", timeout_s=600)
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(1)"])
    t = time.monotonic()
    with pytest.raises(handoff.HandoffError, match="before it joined"):
        sender.connect(lambda: proc.poll() is None)
    assert time.monotonic() - t < 10


def test_a_waiting_receiver_stops_on_sigterm():
    """The trainer never publishes again (its last step): the sampler waits in recv, and the
    trainer's SIGTERM at exit stops it at once (the wait is polled in Python)."""
    code = ("import sys; from simple_grpo.errors import run_entry_point; from simple_grpo.wire.handoff "
            "import Receiver; from simple_grpo.models import build_tiny_model\n"
            "def main(argv):\n    r = Receiver.join(argv[0], 'cpu', timeout_s=600)\n"
            "    print('joined', flush=True)\n    r.recv(lambda *a: build_tiny_model().state_dict())\n"
            "run_entry_point(main, sys.argv[1:], 'receiver')")
    sender = handoff.Sender.listen("gloo", "cpu", timeout_s=600)
    proc = subprocess.Popen([sys.executable, "-c", code, str(sender.address)], cwd=ROOT,
                            stdout=subprocess.PIPE, text=True)
    try:
        sender.connect(lambda: proc.poll() is None)
        assert proc.stdout.readline().strip() == "joined"
        time.sleep(0.5)
        t = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 143
        assert time.monotonic() - t < 5
    finally:
        proc.kill()
        sender.close()


@pytest.mark.parametrize("text, ok", [
    ("gloo://127.0.0.1:4000", True),
    ("nccl://10.0.0.1:29600", True),
    ("tcp://127.0.0.1:4000", False),  # not a backend
    ("gloo://127.0.0.1", False),      # no port
])
def test_address_parse(text, ok):
    from simple_grpo.errors import UserError

    if ok:
        assert str(handoff.Address.parse(text)) == text
    else:
        with pytest.raises(UserError, match="--weights_from must be"):
            handoff.Address.parse(text)


@pytest.mark.parametrize("trainer, sampler, want", [
    ("cuda:0", "cuda:1", "nccl"),  # two GPUs: NCCL, no host copy
    ("cuda:0", "cuda:0", "gloo"),  # NCCL cannot pair a GPU with itself
    ("cuda:0", "cpu", "gloo"),
    ("cpu", "cpu", "gloo"),
])
def test_backend_for(trainer, sampler, want):
    assert handoff.backend_for(trainer, sampler) == want


@pytest.mark.parametrize("first, n, ranks, ahead, want", [
    (0, 1, 1, 1, 0),    # batch 1 (step 1): the first weights
    (0, 2, 1, 1, 0),    # batch 2 (step 2) is sampled while step 1 trains: still step 0's weights
    (0, 3, 1, 1, 1),    # batch 3 (step 3) waits for step 1's weights
    (0, 10, 1, 1, 8),   # batch k waits for step k - 2
    (5, 3, 1, 1, 6),    # a resumed run: counted from the first step published
    (0, 4, 2, 1, 0),    # 2 ranks: batches 3 and 4 are step 2's
    (0, 5, 2, 1, 1),    # ... batch 5 opens step 3: step 1's weights
    (0, 3, 1, 0, 2),    # ahead 0: lockstep, batch k with step k - 1's weights
])
def test_the_sampler_is_at_most_one_step_ahead(first, n, ranks, ahead, want):
    assert handoff.required_step(first, n, ranks, ahead) == want
