"""Options users expect, each wired through: --rewards_file, --trust_remote_code and --revision
(trainer, workers, reference server), --lr_scheduler and --adam_betas (with an exact resume), and
one trainer run that uses all of them with a conversational data file, --eval_task and
--chat_template_kwargs. No hub: custom code lives in a local folder, revisions in a local cache."""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch

import rewards  # noqa: F401  (the built-in rewards, registered before any test's snapshot)
from test_docs import undocumented_metrics  # tests/ is on sys.path
from simple_grpo import models
from simple_grpo.cli import parse_config
from simple_grpo.gen.batch_contract import PROBE_QUESTION
from simple_grpo.errors import UserError
from simple_grpo.common.config import TrainConfig, resolve
from simple_grpo.gen.reward_registry import REWARDS

ROOT = Path(__file__).resolve().parents[1]

MY_REWARDS = """
from simple_grpo.gen.reward_registry import RewardSpec, register

@register("test_user_len")
def user_len(completion, example):
    return len(completion) / 100.0

DEFAULT_REWARDS = [RewardSpec("test_user_len", 2.0)]
"""


@pytest.fixture
def clean_rewards():
    """The reward registry and the loaded user files, restored after the test."""
    saved, mods = dict(REWARDS), set(sys.modules)
    yield
    REWARDS.clear()
    REWARDS.update(saved)
    for name in set(sys.modules) - mods:
        if name.startswith("user_rewards_"):
            del sys.modules[name]


@pytest.mark.parametrize("rewards, want, defaults", [
    (None, [("test_user_len", 2.0)], None),                                  # the file's DEFAULT_REWARDS
    ("test_user_len:1,correct:0.5", [("test_user_len", 1.0), ("correct", 0.5)], None),  # beside the built-ins
    (None, [("test_user_len", 1.0), ("correct", 0.5)], '"test_user_len:1,correct:0.5"'),  # the --rewards form
])
def test_rewards_file(rewards, want, defaults, tmp_path, clean_rewards):
    from simple_grpo.gen.reward_registry import reward_specs

    text = MY_REWARDS if defaults is None else MY_REWARDS.replace('[RewardSpec("test_user_len", 2.0)]', defaults)
    (tmp_path / "mine.py").write_text(text)
    argv = [f"--rewards_file={tmp_path / 'mine.py'}"] + ([f"--rewards={rewards}"] if rewards else [])
    specs = reward_specs(resolve(parse_config(TrainConfig, argv)))
    assert [(s.name, s.weight) for s in specs] == want


@pytest.mark.parametrize("content, match", [
    (None, "does not exist"),                                                  # no such file
    ("def f(:\n", r"failed to load at line 1: SyntaxError"),                   # its own bug, located
    ("x = 1\nraise RuntimeError('boom')\n", r"at line 2: RuntimeError: boom"),
    ("from simple_grpo.gen.reward_registry import register\n"               # a built-in's name
     "@register('format')\ndef f(c, e):\n    return 0.0\n", "registered twice"),
    ("DEFAULT_REWARDS = {'correct': 1.0}\n", "DEFAULT_REWARDS in .*mine.py must be a list of RewardSpec"),
])
def test_rewards_file_errors_are_one_line(content, match, tmp_path, clean_rewards):
    from simple_grpo.gen.reward_registry import reward_specs

    if content is not None:
        (tmp_path / "mine.py").write_text(content)
    with pytest.raises(UserError, match=match):
        reward_specs(resolve(parse_config(TrainConfig, [f"--rewards_file={tmp_path / 'mine.py'}"])))


# ---------------------------------------------------------------------- remote code and revisions

def custom_code_model(folder: Path) -> Path:
    """A tiny model whose config names its own classes in a .py file beside it (auto_map)."""
    models.save_tiny_model(folder)
    (folder / "tiny_custom.py").write_text(
        "from transformers import LlamaConfig, LlamaForCausalLM\n"
        "class TinyCustomConfig(LlamaConfig):\n    model_type = 'tiny_custom'\n"
        "class TinyCustomLM(LlamaForCausalLM):\n    config_class = TinyCustomConfig\n")
    cfg = json.loads((folder / "config.json").read_text())
    cfg.update(model_type="tiny_custom", architectures=["TinyCustomLM"],
               auto_map={"AutoConfig": "tiny_custom.TinyCustomConfig",
                         "AutoModelForCausalLM": "tiny_custom.TinyCustomLM"})
    (folder / "config.json").write_text(json.dumps(cfg))
    return folder


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """An offline hub cache holding 'local/tiny' at two revisions (main: seed 0, v2: seed 1)."""
    import huggingface_hub.constants as hub

    repo = tmp_path / "hub" / "models--local--tiny"
    for rev, seed, sha in (("main", 0, "a" * 40), ("v2", 1, "b" * 40)):
        models.save_tiny_model(repo / "snapshots" / sha, seed=seed)
        (repo / "refs").mkdir(parents=True, exist_ok=True)
        (repo / "refs" / rev).write_text(sha)
    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hub, "HF_HUB_CACHE", str(tmp_path / "hub"))
    return {rev: models.build_tiny_model(seed=seed) for rev, seed in (("main", 0), ("v2", 1))}


def embeddings(model) -> torch.Tensor:
    return model.get_input_embeddings().weight.detach()


@pytest.mark.parametrize("revision", [None, "main", "v2"])  # the default branch, named, another tag
def test_revision_reaches_model_tokenizer_and_server(revision, hub_cache):
    from simple_grpo.server.app import ServerState
    from simple_grpo.server.config import ServerConfig

    want = embeddings(hub_cache[revision or "main"])
    cfg = parse_config(TrainConfig, ["--model=local/tiny"] + ([f"--revision={revision}"] if revision else []))
    model = models.load_model(cfg.model, "float32", "cpu", **models.hub_options(cfg))  # trainer, workers
    assert torch.equal(embeddings(model), want)
    assert models.load_tokenizer(cfg.model, **models.hub_options(cfg)).chat_template
    server = ServerConfig(model="local/tiny", revision=revision, port=0)
    assert torch.equal(embeddings(ServerState.from_config(server).model), want)


@pytest.mark.parametrize("trust", [False, True])
def test_trust_remote_code_for_model_and_server(trust, tmp_path):
    from simple_grpo.server.app import ServerState
    from simple_grpo.server.config import ServerConfig

    folder = custom_code_model(tmp_path / "custom")
    cfg = parse_config(TrainConfig, [f"--model={folder}"] + (["--trust_remote_code"] if trust else []))
    server = ServerConfig(model=str(folder), trust_remote_code=trust, port=0)
    if not trust:  # refused in one line, before any of the model's code runs
        with pytest.raises(UserError, match="comes with its own code: pass --trust_remote_code"):
            models.load_model(cfg.model, "float32", "cpu", **models.hub_options(cfg))
        with pytest.raises(UserError, match="--trust_remote_code"):
            ServerState.from_config(server)
        return
    model = models.load_model(cfg.model, "float32", "cpu", **models.hub_options(cfg))
    assert type(model).__name__ == "TinyCustomLM"
    assert type(ServerState.from_config(server).model).__name__ == "TinyCustomLM"


@pytest.mark.parametrize("argv, want", [
    ([], []),                                                             # nothing to pass
    (["--trust_remote_code", "--revision=v2"], ["--trust_remote_code", "--revision=v2"]),
])
def test_the_started_reference_server_gets_the_model_options(argv, want):
    from simple_grpo.server.config import ServerConfig
    from simple_grpo.train.ref_process import model_args

    args = model_args(parse_config(TrainConfig, argv))
    assert args == want
    server = parse_config(ServerConfig, ["--model=m", *args])  # the child's parser takes them
    assert (server.trust_remote_code, server.revision) == (bool(want), "v2" if want else None)


# ------------------------------------------------------------------------ schedules and betas

def cos(s: int, t: int) -> float:
    return 0.5 * (1 + math.cos(math.pi * s / t))


@pytest.mark.parametrize("name, warmup, total, factors", [
    ("constant", 3, 5, [1 / 3, 2 / 3, 1, 1, 1]),          # the warm-up never starts at lr 0
    ("linear", 0, 4, [4 / 5, 3 / 5, 2 / 5, 1 / 5]),       # decays, never reaching 0 in the run
    ("linear", 2, 4, [1 / 2, 1, 2 / 3, 1 / 3]),           # warm-up, then decay over the rest
    ("cosine", 0, 4, [cos(s, 5) for s in range(1, 5)]),   # half a cosine
])
def test_lr_schedules(name, warmup, total, factors):
    from simple_grpo.train.engine import lr_schedule

    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.5)
    sched = lr_schedule(opt, name, warmup, total)
    used = []
    for _ in range(total):
        used.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert used == pytest.approx([0.5 * f for f in factors])


def test_engine_betas_schedule_and_exact_resume(dist_env, tmp_path):
    from simple_grpo.train import checkpoint as ck
    from simple_grpo.train import engine as eng

    def make(seed):
        cfg = eng.ds_config("ds_config.json", micro_batch=2, grad_accum=1, world_size=1, grad_clip=1.0,
                            bf16=False)
        return eng.build_engine(models.build_tiny_model(seed=seed), lr=1e-2, weight_decay=0.0,
                                warmup_steps=1, config=cfg, lr_scheduler="cosine", total_steps=4,
                                betas=(0.5, 0.6))

    def train(engine, steps):
        lrs = []
        for _ in range(steps):
            lrs.append(engine.get_lr()[0])
            x = torch.randint(3, 300, (2, 12))
            engine.backward(engine(input_ids=x, labels=x).loss)
            engine.step()
        return lrs

    torch.manual_seed(0)
    a = make(0)
    assert a.optimizer.optimizer.param_groups[0]["betas"] == (0.5, 0.6)
    lrs = train(a, 2)
    ck.save_checkpoint(a, tmp_path, 2, {"step": 2, "rng": ck.rng_state()})
    lrs += train(a, 2)
    assert lrs == pytest.approx([1e-2 * f for f in (1, cos(1, 4), cos(2, 4), cos(3, 4))])
    b = make(5)  # other weights: everything comes from the checkpoint
    ck.set_rng_state(ck.load_latest(b, tmp_path)["rng"])
    assert train(b, 2) == pytest.approx(lrs[2:])
    for (k, va), vb in zip(a.module.state_dict().items(), b.module.state_dict().values()):
        assert torch.equal(va, vb), k


# ----------------------------------------------------------------------------- one real run

def test_a_run_with_every_option(tiny_model_dir, tmp_path, monkeypatch, clean_rewards):
    """Custom model code (and the reference server the trainer starts loads it too), a chat data
    file, held-out prompts from another file, the user's rewards, template variables, a cosine
    schedule and betas, through the trainer's own command line."""
    sys.path.insert(0, str(ROOT))
    import grpo_ref_split
    from simple_grpo.train import engine as eng

    from simple_grpo.gen import data

    model = custom_code_model(tmp_path / "model")
    template = model / "chat_template.jinja"  # the saved template, plus a variable of its own
    template.write_text(template.read_text() + "{% if marker is defined %}{{ marker }}{% endif %}")
    chat = [{"messages": [{"role": "system", "content": "Add."}, {"role": "user", "content": f"{i} + 1?"}],
             "answer": str(i + 1)} for i in range(4)]
    (tmp_path / "chat.jsonl").write_text("\n".join(map(json.dumps, chat)))  # no chat.test.jsonl
    (tmp_path / "held.jsonl").write_text("\n".join(map(json.dumps, chat[:2])))
    (tmp_path / "mine.py").write_text(MY_REWARDS)
    built, prompts = {}, []
    real_engine, real_renderer = eng.build_engine, data.prompt_renderer
    monkeypatch.setattr(eng, "build_engine", lambda *a, **kw: built.update(kw) or real_engine(*a, **kw))
    def recording_renderer(*a):
        render = real_renderer(*a)

        def record(ex):
            text = render(ex)
            if ex["question"] != PROBE_QUESTION:  # the batch contract's probe is not a training prompt
                prompts.append(text)
            return text
        return record

    monkeypatch.setattr(data, "prompt_renderer", recording_renderer)
    grpo_ref_split.main([
        f"--model={model}", "--trust_remote_code", f"--task={tmp_path / 'chat.jsonl'}",
        "--eval_task", str(tmp_path / "held.jsonl"), "--eval_every=1", "--eval_prompts=2",
        f"--rewards_file={tmp_path / 'mine.py'}", "--eval_reward=test_user_len",
        '--chat_template_kwargs={"marker": "MARK"}', "--lr_scheduler", "cosine", "--adam_betas=0.8,0.9",
        f"--run_dir={tmp_path / 'run'}", "--steps=2", "--prompts_per_step=2", "--num_generations=2",
        "--micro_batch_size=4", "--max_new_tokens=4", "--beta=0.04", "--save_every=-1",
        "--samples_every=1", "--plot_every=0", "--warmup_steps=0", "--lr=1e-3", "--ref_timeout=60"])
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    checks = [
        # --eval_task: evaluated although chat.jsonl has no .test sibling
        ([r["step"] for r in rows if "eval_accuracy" in r] == [0, 1, 2], "eval_accuracy every step"),
        # --rewards_file: its DEFAULT_REWARDS are the rewards, logged by name
        (all("reward/test_user_len" in r for r in rows if r["step"] > 0), "the user's reward"),
        # conversational rows: the last user turn and the row's own system turn make the prompt
        (prompts and all("<|im_start|>system\nAdd.<|im_end|>" in p and " + 1?" in p for p in prompts),
         "chat rows rendered"),
        # --chat_template_kwargs reach the template
        (prompts and all(p.endswith("MARK") for p in prompts), "template variables"),
        # --lr_scheduler and --adam_betas reach the engine, over steps x num_iterations updates
        ((built["lr_scheduler"], built["betas"], built["total_steps"]) == ("cosine", (0.8, 0.9), 2),
         f"engine options {built}"),
        # every key the run logged is in docs/metrics.md
        (not undocumented_metrics(rows), f"metrics missing from docs/metrics.md: {undocumented_metrics(rows)}"),
    ]
    assert not [why for ok, why in checks if not ok], [why for ok, why in checks if not ok]
