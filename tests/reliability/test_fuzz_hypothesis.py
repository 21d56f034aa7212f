"""Property-based fuzzing (hypothesis, shrinking on failure) of the ref server's body-taking
endpoints and its codec: for any bytes - arbitrary, or a valid encoding edited at any position -
the codec raises only CodecError and a real server process answers 2xx/4xx, never 5xx.
Complements test_fuzz.py's 10,000 seeded cases."""
from __future__ import annotations

import random

import pytest
import requests
import torch
from hypothesis import HealthCheck, given, settings, strategies as st

from simple_grpo.algo.logprobs import completion_logprobs
from simple_grpo.wire import codec
from simple_grpo.wire.client import RefClient

from fuzz_bodies import tiny_batch, tiny_ids
from test_fuzz import ServerProcess

SEEDS = {"rollout": codec.encode(tiny_batch(random.Random(1), 4, 6, 5)),
         "logprobs": codec.encode(tiny_ids(random.Random(2), 3, 6, 5))}


@st.composite
def edited(draw, data: bytes) -> bytes:
    """`data` with a slice replaced by drawn bytes (covers truncation, insertion, bit flips)."""
    i = draw(st.integers(0, len(data)))
    j = draw(st.integers(i, min(len(data), i + 64)))
    return data[:i] + draw(st.binary(max_size=64)) + data[j:]


BODIES = st.one_of(st.binary(max_size=2048), edited(SEEDS["rollout"]), edited(SEEDS["logprobs"]))


@settings(max_examples=1500, deadline=None, database=None, derandomize=True)
@given(data=BODIES)
def test_codec_raises_only_codec_error(data):
    for cls in (codec.RolloutBatch, codec.LogprobRequest):
        try:
            codec.decode(data, cls)
        except codec.CodecError:
            pass


@pytest.fixture(scope="module")
def server(tiny_model_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("hyp")
    srv = ServerProcess(tiny_model_dir, tmp / "server.log", "--queue_size=4", "--when_full=drop_oldest",
                        "--max_body_mb=1", "--max_weights_mb=1", f"--weights_dir={tmp / 'w'}")
    yield srv
    srv.stop()


@settings(max_examples=1500, deadline=None, database=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(path=st.sampled_from(["/upload", "/logprobs", "/weights?version=7"]), data=BODIES,
       ctype=st.sampled_from(["application/octet-stream", "application/json", "text/plain"]))
def test_server_never_answers_5xx(server, path, data, ctype):
    r = requests.post(server.url + path, data=data, headers={"Content-Type": ctype}, timeout=30)
    assert r.status_code < 500, (path, r.status_code, r.text[:300])
    assert server.alive()


def test_server_still_exact_after_hypothesis(server, tiny_model):
    """Runs after the property test (file order): the server still scores exactly."""
    req = tiny_ids(random.Random(3), 3, 6, 5)
    ids = (req.prompt_ids, req.prompt_lens, req.completion_ids, req.completion_lens)
    with torch.inference_mode():
        want = completion_logprobs(tiny_model, *ids)
    torch.testing.assert_close(RefClient(server.url).logprobs(*ids), want, atol=1e-5, rtol=0)
