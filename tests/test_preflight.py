"""`--check`: the launch's needs against what it has, through the real entry point, loading no
weights: the memory arithmetic against a hand count of a 7B's parameters, blockers each one line
(exit 2), a real reference server's token and publish limit."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from simple_grpo.cli import parse_config
from simple_grpo.common.config import TrainConfig, resolve
from simple_grpo.errors import UserError
from simple_grpo.train import preflight

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import grpo_ref_split  # noqa: E402

# Qwen2-7B's shape (config only, no weights)
QWEN2_7B = {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "vocab_size": 152064,
            "hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28,
            "num_attention_heads": 28, "num_key_value_heads": 4, "max_position_embeddings": 32768,
            "tie_word_embeddings": False, "rms_norm_eps": 1e-6}


def qwen2_params(c: dict) -> int:
    """By hand: embeddings and head, per layer q/k/v (with biases), o, the MLP's three matrices and
    two norms, and the final norm."""
    H, I, L, V = c["hidden_size"], c["intermediate_size"], c["num_hidden_layers"], c["vocab_size"]
    kv = c["num_key_value_heads"] * H // c["num_attention_heads"]
    layer = (H * H + H) + 2 * (H * kv + kv) + H * H + 3 * H * I + 2 * H
    return 2 * V * H + L * layer + H


@pytest.fixture
def no_loading(monkeypatch):
    """--check must not load weights nor start a server."""
    from simple_grpo import models
    from simple_grpo.train import ref_process

    def refuse(*a, **kw):
        raise AssertionError("--check loaded a model or started a server")

    monkeypatch.setattr(models, "load_model", refuse)
    monkeypatch.setattr(ref_process.RefProcess, "__init__", refuse)


def check(*args: str) -> dict:
    return grpo_ref_split.main(["--check", *args])


def test_the_tiny_run_has_what_it_needs(tiny_model_dir, tmp_path, no_loading, capsys):
    assert check(f"--model={tiny_model_dir}", f"--run_dir={tmp_path / 'run'}", "--beta=0.04")["check"] == "ok"
    out = capsys.readouterr().out
    for row in ("ranks and devices", "memory per training cpu", "reference server (started by the trainer)",
                "flash-attn", "disk for checkpoints"):
        assert row in out, out
    assert not (tmp_path / "run").exists(), "--check writes nothing"


def test_a_7b_on_this_machine_is_a_memory_blocker_with_the_arithmetic(tmp_path, no_loading):
    folder = tmp_path / "qwen2-7b"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(QWEN2_7B))
    cfg = resolve(parse_config(TrainConfig, [f"--model={folder}", "--micro_batch_size=2",
                                             "--max_new_tokens=256"]))
    shape = preflight.model_shape(cfg)
    assert shape["params"] == qwen2_params(QWEN2_7B) == 7_615_616_512
    prompt, why = preflight.prompt_tokens(cfg)  # a folder holding only its config: no chat template
    assert prompt is None and "has no chat template" in why, why
    (row,) = [r for r in preflight.device_rows(cfg, shape, world=1, local=1) if r.what.startswith("prompt tokens")]
    assert row.status == "WARN" and row.need.startswith("256 assumed (") and row.have.startswith("256 + ")
    need = preflight.memory_need(cfg, shape, world=4, bytes_per_weight=2)
    P = shape["params"]
    assert need["weights"] == 2 * P and need["optimizer"] == 12 * P / 4  # ZeRO-2: AdamW over 4 ranks
    assert need["gradients"] == 4 * P / 4 + 5e7 * 2
    S, m, H, L = 256 + 256, 2, 3584, 28
    assert need["activations"] == 34 * S * m * H * L + (1024 << 20)
    with pytest.raises(UserError, match=r"^memory per training cpu: .* --gradient_checkpointing"):
        check(f"--model={folder}", f"--run_dir={tmp_path / 'run'}", "--beta=0")


@pytest.mark.parametrize("args, blocker", [
    # nothing listens there
    (["--ref_url=http://127.0.0.1:9"], "reference server: unreachable"),
    # flash-attn asked for, not installed here
    (["--attn_implementation=flash_attention_2", "--beta=0"], "flash-attn: not installed"),
])
def test_blockers_are_one_line_each(tiny_model_dir, tmp_path, no_loading, args, blocker):
    pytest.importorskip("bottle")
    if "flash" in blocker and preflight.importlib.util.find_spec("flash_attn") is not None:
        pytest.skip("flash-attn is installed here")
    with pytest.raises(UserError, match=blocker):
        check(f"--model={tiny_model_dir}", f"--run_dir={tmp_path}", *args)


def test_a_real_servers_token_and_publish_limit(tiny_model_dir, tmp_path, ref_server, no_loading, capsys):
    srv = ref_server(token="s3cret")
    common = [f"--model={tiny_model_dir}", f"--run_dir={tmp_path}", f"--ref_url={srv.url}", "--beta=0.04"]
    with pytest.raises(UserError, match="token: refused"):
        check(*common, "--ref_token=wrong")
    assert check(*common, "--ref_token=s3cret")["check"] == "ok"
    out = capsys.readouterr().out
    assert "publish size (workers' weights)" in out and "server limit" in out, out
    small = ref_server(max_weights_mb=0.01)
    with pytest.raises(UserError, match=r"publish size \(workers' weights\): server limit 0 MiB"):
        check(f"--model={tiny_model_dir}", f"--run_dir={tmp_path}", f"--ref_url={small.url}",
              "--generate_locally=false")


def test_under_a_launcher_only_rank_0_prints(tiny_model_dir, tmp_path, no_loading, monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    with pytest.raises(SystemExit) as e:
        check(f"--model={tiny_model_dir}", f"--run_dir={tmp_path}", "--beta=0", "--prompts_per_step=2")
    assert e.value.code == 0 and capsys.readouterr().out == ""


def test_the_estimate_takes_the_longest_of_the_tasks_prompts(tiny_model_dir, tmp_path, no_loading, capsys,
                                                             monkeypatch):
    """The memory estimate's prompt length is the task's longest prompt, rendered with the chat
    template and tokenized: a task of short questions, then the same with one question of 1,000
    letters (the tiny tokenizer is byte-level: one token a letter, the template around it the same)."""
    rows = [{"question": "What is 1+1?", "answer": "2"}] * 5
    for name, extra in (("short", []), ("long", [{"question": "x" * 1000, "answer": "0"}])):
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows + extra))
    got = {}
    for name in ("short", "long"):
        cfg = resolve(parse_config(TrainConfig, [f"--model={tiny_model_dir}", f"--task={tmp_path / name}.jsonl"]))
        got[name] = preflight.prompt_tokens(cfg)
    assert got["short"][1] == "the longest of 5 of the task's prompts" and got["short"][0] < 256
    assert got["long"][0] - got["short"][0] == 1000 - len("What is 1+1?")
    # 400 rows, the long one in the middle, one rendered: the questions' own lengths find it
    many = rows * 40 + [{"question": "x" * 1000, "answer": "0"}] + rows * 40
    (tmp_path / "many.jsonl").write_text("".join(json.dumps(r) + "\n" for r in many))
    monkeypatch.setattr(preflight, "PROMPT_RENDERED", 1)
    cfg = resolve(parse_config(TrainConfig, [f"--model={tiny_model_dir}", f"--task={tmp_path / 'many'}.jsonl"]))
    assert preflight.prompt_tokens(cfg) == (got["long"][0], "the longest of 401 of the task's prompts")
    asked, need = [], preflight.memory_need
    monkeypatch.setattr(preflight, "memory_need", lambda *a, **kw: (asked.append(a[4:] + tuple(kw.values())),
                                                                    need(*a, **kw))[1])
    check(f"--model={tiny_model_dir}", f"--task={tmp_path / 'long'}.jsonl", f"--run_dir={tmp_path / 'run'}",
          "--max_new_tokens=64", "--beta=0")
    assert asked == [(got["long"][0],)], "the memory rows are estimated for the measured prompt"
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("prompt tokens"))
    assert "the longest of 6 of the task's prompts" in line and f"{got['long'][0]:,} + --max_new_tokens 64" in line
