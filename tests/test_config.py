"""The dataclass parser: both option forms, flags, precedence, types and choices, docs in --help
grouped by section, one-line errors with suggestions; the documented command lines parse."""
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Literal

import pytest

from simple_grpo.cli import field_docs, field_sections, help_text, parse_config
from simple_grpo.errors import UserError

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Demo:
    """A demo config."""

    # --- net: where it listens
    port: int = 5
    """The port to bind."""
    name: str | None = None
    """An optional name."""
    flag: bool = False
    """A switch."""
    # --- train
    lr: float = 1e-6
    """Learning rate."""
    mode: Literal["fast", "slow"] = "fast"
    """A fixed choice."""
    scale: Literal["std", "none"] | None = None
    """A choice that may be unset; 'none' is one of its values."""
    resume: Literal["false", "true", "auto"] = "false"
    """A choice that also takes a bare flag."""
    note: str | None = field(default=None, metadata={"keep_empty": True})
    """Empty is a value of its own."""
    betas: tuple[float, float] = (0.9, 0.99)
    """Two numbers."""
    kw: dict = field(default_factory=dict)
    """A JSON object."""

    ALIASES: ClassVar[dict[str, str]] = {"p": "port"}


@pytest.mark.parametrize("argv, env, expected", [
    ([], {}, Demo()),                                                   # defaults
    (["--port=7", "--flag", "--name=x"], {}, Demo(7, "x", True)),       # bare flag means true
    (["--flag=false", "--lr=3e-4"], {}, Demo(flag=False, lr=3e-4)),     # typed conversion
    ([], {"T_PORT": "9"}, Demo(port=9)),                                # environment with prefix
    (["--port=8"], {"T_PORT": "9"}, Demo(port=8)),                      # command line beats environment
    (["--name=none"], {}, Demo(name=None)),                             # optional fields accept none
    (["--port", "7", "--name", "x y"], {}, Demo(7, "x y")),             # --key value
    (["--lr", "-1e-3"], {}, Demo(lr=-1e-3)),                            # a negative value is a value
    (["--flag", "--port", "3"], {}, Demo(3, flag=True)),                # a flag takes no value...
    (["--flag", "false"], {}, Demo(flag=False)),                        # ...unless it is a boolean word
    (["--no-flag"], {"T_FLAG": "true"}, Demo(flag=False)),              # --no-flag
    (["--no_flag", "--flag"], {}, Demo(flag=True)),                     # the last one wins
    (["--mode", "slow"], {}, Demo(mode="slow")),                        # a Literal choice
    (["--scale=none"], {}, Demo(scale="none")),                         # 'none' the choice, not None
    (["--scale=null"], {}, Demo(scale=None)),                           # null unsets it
    (["--resume"], {}, Demo(resume="true")),                            # bare flag of a true/false choice
    (["--resume", "auto"], {}, Demo(resume="auto")),                    # ...which takes its other values
    (["--resume=yes"], {}, Demo(resume="true")),                        # ...and booleans in any spelling
    (["--no-resume"], {"T_RESUME": "auto"}, Demo(resume="false")),      # ...and --no-resume
    (["--name="], {}, Demo(name=None)),                                 # empty: unset...
    (["--note="], {}, Demo(note="")),                                   # ...unless the field keeps it
    (["--betas", "0.5,0.6"], {}, Demo(betas=(0.5, 0.6))),               # a tuple, comma-separated
    ([], {"T_BETAS": "[0.1, 0.2]"}, Demo(betas=(0.1, 0.2))),            # ...or a JSON list
    (['--kw={"a": false}'], {}, Demo(kw={"a": False})),                 # a JSON object
    (["--p", "4"], {}, Demo(port=4)),                                   # an alias
])
def test_parse(argv, env, expected, monkeypatch):
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    assert parse_config(Demo, argv, env_prefix="T_") == expected


def test_precedence_default_file_env_command_line(tmp_path, monkeypatch):
    f = tmp_path / "c.json"
    f.write_text(json.dumps({"port": 3, "lr": 0.5, "name": "file", "_comment": "ignored",
                             "betas": [0.1, 0.2], "p": 4}))
    monkeypatch.setenv("T_PORT", "9")
    monkeypatch.setenv("T_NAME", "env")
    got = parse_config(Demo, ["--config", str(f), "--port=8"], env_prefix="T_")
    # port: file 4 (its alias p, read after port) < env 9 < command line 8; name: env over file;
    # lr and betas: only the file sets them; keys starting with _ are comments
    assert got == Demo(port=8, name="env", lr=0.5, betas=(0.1, 0.2))


@pytest.mark.parametrize("argv, message", [
    (["--zzz=1"], "unknown option --zzz; see --help"),                     # nothing close to it
    (["--prot=1"], r"unknown option --prot \(did you mean --port\?\)"),    # a near miss
    (["--prot", "1", "--flg"], r"options --flg \(did you mean --flag\?\), --prot"),  # every one, sorted
    (["--port=abc"], "--port='abc'"),                                      # value of the wrong type
    (["--flag=maybe"], "true or false"),                                   # not a boolean
    (["positional"], "unexpected argument"),                               # not an option
    (["--config=/does/not/exist.json"], "does not exist"),
    (["--port"], "--port needs a value"),                                  # a value is missing...
    (["--port", "--flag"], "--port needs a value"),                        # ...the next is an option
    (["--no-port"], r"unknown option --no_port \(did you mean --port\?\)"),  # not a flag
    (["--no-flag=1"], "--no-flag takes no value"),
    (["--mode=quick"], r"--mode must be one of: fast, slow \(got 'quick'\)"),  # choices listed
    (["--mode=slwo"], "did you mean slow"),                                # near a choice
    (["--scale=nan"], "--scale must be one of: std, none"),
    (["--betas=0.9"], "expected 2 comma-separated values"),                # tuple length
    (["--kw=[1]"], "expected a JSON object"),                              # a list for a dict
    (["--kw={"], "--kw='{'"),                                              # not JSON
])
def test_errors_are_user_errors(argv, message):
    with pytest.raises(UserError, match=message):
        parse_config(Demo, argv)


@pytest.mark.parametrize("content, message", [
    ('{"prot": 1}', r"unknown option --prot \(did you mean --port\?\) in config file .*c.json"),  # a typo
    ("[1, 2]", "expected a JSON object of options"),                        # not an object
    ("{port: 1}", "is not valid JSON"),                                     # not JSON
    ('{"mode": "quick"}', "--mode must be one of: fast, slow"),             # a choice, checked too
    ('{"port": "x"}', "--port='x'"),                                        # a string that is no int
    ('{"port": 1.5}', "expected int"),                                      # a float for an int
    ('{"lr": true}', r"--lr=True: expected float"),                        # a boolean for a number
    ('{"port": false}', r"--port=False: expected int"),
    ('{"betas": [true, 0.5]}', r"--betas=\[True, 0.5\]: expected numbers"),  # ...also inside a tuple
])
def test_config_file_errors(content, message, tmp_path):
    (tmp_path / "c.json").write_text(content)
    with pytest.raises(UserError, match=message):
        parse_config(Demo, [f"--config={tmp_path / 'c.json'}"])


@pytest.mark.parametrize("option, value, message", [
    ("lr", True, r"--lr=True: expected float"),
    ("steps", False, r"--steps=False: expected int"),
    ("adam_betas", [0.9, True], r"--adam_betas=\[0.9, True\]: expected numbers, got a boolean"),
])
def test_booleans_for_numeric_options_in_a_trainer_config_file_are_refused(option, value, message, tmp_path):
    """A JSON true / false where the trainer wants a number is one error line, not 1 or 0."""
    from simple_grpo.common.config import TrainConfig

    (tmp_path / "run.json").write_text(json.dumps({option: value}))
    with pytest.raises(UserError, match=message):
        parse_config(TrainConfig, [f"--config={tmp_path / 'run.json'}"])


def test_help_lists_fields_with_docstrings_in_sections(capsys):
    assert field_docs(Demo)["port"] == "The port to bind."
    assert field_sections(Demo)["flag"] == ("net", "where it listens")
    assert field_sections(Demo)["kw"] == ("train", "")
    text = help_text(Demo, "T_")
    assert "--port=5" in text and "The port to bind." in text and "T_KEY" in text
    assert "--mode=fast  {fast, slow}" in text and "--betas=0.9,0.99" in text
    assert "--scale=null  {std, none}" in text, "an unset choice field whose choices include none"
    net, train = text.index("\nnet: where it listens\n"), text.index("\ntrain:\n")
    assert net < text.index("--flag=false") < train < text.index("--lr=1e-06"), "fields under their section"
    with pytest.raises(SystemExit) as e:
        parse_config(Demo, ["--port=x", "--help"])  # help wins over errors after it
    assert e.value.code == 0 and "--lr=1e-06" in capsys.readouterr().out


def test_trainer_sections_and_choices():
    from simple_grpo.common.config import TrainConfig

    sections = {name: s for name, (s, _) in field_sections(TrainConfig).items()}
    wanted = ["model", "data", "algorithm", "training", "generation", "logging", "distributed", "workers"]
    assert set(sections.values()) == set(wanted), "every option in one of the documented sections"
    text = help_text(TrainConfig, "GRPO_", "grpo_ref_split.py")
    headers = [h for h in re.findall(r"^(\w+):", text, re.M) if h != "usage"]
    assert sorted(headers) == sorted(wanted), "one block per section"
    assert "--preset=grpo  {grpo, dr_grpo, dapo, gspo, cispo, sapo}" in text
    assert "--lr_scheduler=constant  {constant, linear, cosine}" in text


@pytest.mark.parametrize("argv, field_, want", [
    (["--system_prompt="], "system_prompt", ""),             # empty: no system prompt, not the default
    (["--system_prompt=none"], "system_prompt", None),       # none: the built-in one
    (["--scale=none", "--preset=grpo"], "scale", "none"),    # Dr.GRPO's no-scaling choice survives grpo
    (["--resume"], "resume", "true"),                        # the bare flag the README shows
    (["--adam_betas", "0.9,0.999"], "adam_betas", (0.9, 0.999)),
    (["--prompts-per-step", "4"], "prompts_per_step", 4),    # - and _ are the same
])
def test_trainer_values_after_resolve(argv, field_, want):
    from simple_grpo.common.config import TrainConfig, resolve

    assert getattr(resolve(parse_config(TrainConfig, argv)), field_) == want


def test_empty_system_prompt_renders_no_system_turn():
    from simple_grpo.models import build_tiny_tokenizer
    from simple_grpo.common.config import TrainConfig
    from simple_grpo.gen.data import DEFAULT_SYSTEM_PROMPT, prompt_renderer

    tok = build_tiny_tokenizer()
    for argv, system in ([], DEFAULT_SYSTEM_PROMPT), (["--system_prompt="], None):
        cfg = parse_config(TrainConfig, argv)
        text = prompt_renderer(tok, cfg.system_prompt)({"question": "q"})
        assert (system is not None) == ("<|im_start|>system" in text), argv
        assert system is None or system in text


@pytest.mark.parametrize("cfg_kwargs, message", [
    ({"agg": "mean"}, "--agg must be one of: seq-mean-token-mean"),   # a config built in code
    ({"preset": "ppo"}, "--preset must be one of: grpo"),
    ({"adam_betas": (0.9, 1.0)}, "--adam_betas must be two numbers in"),
    ({"chat_template_kwargs": {"tokenize": True}}, "--chat_template_kwargs: tokenize"),
])
def test_resolve_checks_configs_built_in_code(cfg_kwargs, message):
    from simple_grpo.common.config import TrainConfig, resolve

    with pytest.raises(UserError, match=message):
        resolve(TrainConfig(**cfg_kwargs))


@pytest.mark.parametrize("argv, message", [
    # names other trainers use: what they are called here, not the nearest spelling
    (["--save_steps=10"], r"unknown option --save_steps \(did you mean --save_every\?\)"),  # not --steps
    (["--max_steps=10"], r"unknown option --max_steps \(did you mean --steps\?\)"),  # not --max_staleness
    (["--loss_type=dr_grpo"], r"--loss_type \(did you mean --preset or --agg\?\)"),  # not --publish_dtype
    (["--learning_rate=1e-6"], r"--learning_rate \(did you mean --lr\?\)"),
    # values that used to fail later with a traceback: one line before any slow work
    (["--lr=-1"], "--lr must be > 0"),
    (["--keep_last=-1"], "--keep_last must be >= 0"),
    (["--ref_url=127.0.0.1:59875"], "--ref_url=127.0.0.1:59875: expected http://HOST:PORT"),
])
def test_trainer_mistakes_are_one_line(argv, message):
    from simple_grpo.common.config import TrainConfig, resolve

    with pytest.raises(UserError, match=message):
        resolve(parse_config(TrainConfig, argv))


def test_server_choices_come_from_its_types():
    from simple_grpo.server.config import ServerConfig

    cfg = parse_config(ServerConfig, ["--queue_order", "lifo", "--trust_remote_code", "--revision", "v2"])
    assert (cfg.queue_order, cfg.trust_remote_code, cfg.revision) == ("lifo", True, "v2")
    with pytest.raises(UserError, match=r"--queue_order must be one of: fifo, lifo \(got 'lilo'; did you"):
        parse_config(ServerConfig, ["--queue_order=lilo"])
    with pytest.raises(UserError, match="--when_full must be one of: block, drop_oldest"):
        ServerConfig(when_full="drop")  # built in code


def documented_command_lines() -> list[str]:
    """The ``--option value`` examples the reward docs show (rewards.py, reward_registry.py)."""
    found = []
    for doc in ("rewards.py", "simple_grpo/gen/reward_registry.py"):
        found += re.findall(r"``(--[a-z_-]+[ =][^`\s]+)``", (ROOT / doc).read_text())
    return found


@pytest.mark.parametrize("line", documented_command_lines())
def test_documented_options_parse(line, tmp_path, monkeypatch):
    from simple_grpo.common.config import TrainConfig

    monkeypatch.chdir(tmp_path)  # rewards files named in the docs exist as far as the parser cares
    cfg = parse_config(TrainConfig, line.split())
    assert any(getattr(cfg, f) is not None for f in ("rewards", "rewards_file")), line


def test_documented_options_are_found():
    lines = documented_command_lines()
    assert any(line.startswith("--rewards ") for line in lines) and any("--rewards_file" in x for x in lines)
