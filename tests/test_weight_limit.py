"""The server's weight limit follows the model it serves (--max_weights_mb=auto): a 7B-shaped model,
built on the meta device (shapes and dtypes, no 30 GB of weights), is accepted in every publish
dtype; an explicit number still wins; start-up warns when the weights folder lacks room for two
files; the trainer says before step 1 whether its weights fit."""
from __future__ import annotations

import shutil
from collections import namedtuple
from types import SimpleNamespace

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from simple_grpo.errors import UserError
from simple_grpo.server.config import ServerConfig, auto_weights_bytes, resolve_weights_limit
from simple_grpo.server.weight_store import WEIGHTS_FILE, disk_warning
from simple_grpo.train.publish import WeightPublisher, published_state, publish_bytes, publisher_for

MiB = 1 << 20


@pytest.fixture(scope="module")
def meta_7b():
    """Qwen2-7B's shapes (7.6B parameters) in bf16 on the meta device: nothing allocated."""
    cfg = LlamaConfig(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                      num_attention_heads=28, num_key_value_heads=4, tie_word_embeddings=False)
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg).to(torch.bfloat16)
    assert 7.6e9 < sum(p.numel() for p in model.parameters()) < 7.7e9
    return model


class FakeClient:
    def __init__(self, limit):
        self.limit = limit

    def health(self):
        return {"max_weights_bytes": self.limit}


def test_the_default_limit_takes_a_7b_in_every_publish_dtype(meta_7b):
    cfg = resolve_weights_limit(ServerConfig(model="7b"), meta_7b)
    limit = cfg.max_weights_bytes
    bf16 = publish_bytes(published_state(meta_7b), None)
    assert 14_500 * MiB < bf16 < 14_550 * MiB, "a 7B in bf16 is 14,526 MiB: over the old 8192"
    fp32 = publish_bytes(published_state(meta_7b), torch.float32)
    assert fp32 == 2 * bf16 and fp32 < limit < 1.2 * fp32, (fp32 / MiB, limit / MiB)
    assert limit == -(-auto_weights_bytes(meta_7b) // MiB) * MiB, "whole MiB"
    for dtype in (None, torch.bfloat16, torch.float32):  # the trainer's own check passes
        lines = []
        pub = WeightPublisher(FakeClient(limit), dtype=dtype, log=lines.append)
        assert pub._fits(meta_7b, announce=True) and pub.disabled is None
        assert len(lines) == 1 and "publishing ready" in lines[0], lines


def test_an_explicit_limit_wins_and_bad_ones_are_one_line(meta_7b):
    assert resolve_weights_limit(ServerConfig(model="7b", max_weights_mb=100), meta_7b).max_weights_bytes \
        == 100 * MiB
    small = resolve_weights_limit(ServerConfig(model="7b", max_weights_mb="8192"), meta_7b)  # as typed
    lines = []
    pub = WeightPublisher(FakeClient(small.max_weights_bytes), dtype=torch.bfloat16, log=lines.append)
    assert not pub._fits(meta_7b, announce=True) and "--max_weights_mb=14527" in pub.disabled
    assert len(lines) == 1 and "not publishing" in lines[0]
    assert ServerConfig(max_weights_mb=0).max_weights_mb == "auto" == ServerConfig().max_weights_mb
    for bad in (-1, "lots", float("nan")):
        with pytest.raises(UserError, match="--max_weights_mb"):
            ServerConfig(max_weights_mb=bad)


def test_start_up_warns_when_the_weights_folder_lacks_room_for_two_files(monkeypatch, tmp_path):
    usage = namedtuple("usage", "total used free")
    free = {"bytes": 0}
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(1 << 50, 0, free["bytes"]))
    limit = 1000 * MiB
    free["bytes"] = 2 * limit
    assert disk_warning(tmp_path / "not-made-yet", limit) is None
    assert disk_warning("", limit) is None  # the temporary folder's file system
    free["bytes"] = 2 * limit - 1
    line = disk_warning(tmp_path / "w", limit)
    assert line and "2.0 GiB free" in line and "need 2.0 GiB" in line and "--weights_dir" in line, line
    (tmp_path / WEIGHTS_FILE).write_bytes(b"x" * 10)  # a kept file already holds its room
    assert disk_warning(tmp_path, limit) is None


def test_the_trainer_says_before_step_1_whether_its_weights_fit(tiny_model, ref_server, capsys):
    def preflight(srv):
        cfg = SimpleNamespace(ref_url=srv.url, generate_locally=True, publish_every=1,
                              publish_dtype="auto", ref_token=None, ref_timeout=10, weights_full_every=0)
        pub = publisher_for(cfg, SimpleNamespace(rank=0), SimpleNamespace(url=srv.url), 0, tiny_model)
        pub.close()
        return pub, capsys.readouterr().err.strip().splitlines()

    srv = ref_server()  # the default: the tiny model's own size in fp32, plus headroom
    assert srv.state.cfg.max_weights_bytes == -(-auto_weights_bytes(tiny_model) // MiB) * MiB
    pub, lines = preflight(srv)
    assert pub.disabled is None and len(lines) == 1 and "publishing ready" in lines[0], lines
    pub, lines = preflight(ref_server(max_weights_mb=0.01))
    assert pub.disabled and len(lines) == 1 and "not publishing" in lines[0], lines
