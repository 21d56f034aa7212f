"""The --key=value dataclass parser: precedence, types, docs in --help, clear errors."""
import json
from dataclasses import dataclass

import pytest

from simple_grpo.cli import field_docs, help_text, parse_config
from simple_grpo.errors import UserError


@dataclass
class Demo:
    """A demo config."""

    port: int = 5
    """The port to bind."""
    name: str | None = None
    """An optional name."""
    flag: bool = False
    """A switch."""
    lr: float = 1e-6
    """Learning rate."""


@pytest.mark.parametrize("argv, env, expected", [
    ([], {}, Demo()),                                          # defaults
    (["--port=7", "--flag", "--name=x"], {}, Demo(7, "x", True)),  # bare flag means true
    (["--flag=false", "--lr=3e-4"], {}, Demo(flag=False, lr=3e-4)),  # typed conversion
    ([], {"T_PORT": "9"}, Demo(port=9)),                       # environment with prefix
    (["--port=8"], {"T_PORT": "9"}, Demo(port=8)),             # command line beats environment
    (["--name=none"], {}, Demo(name=None)),                    # optional fields accept none
])
def test_parse(argv, env, expected, monkeypatch):
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    assert parse_config(Demo, argv, env_prefix="T_") == expected


def test_config_file_then_cli(tmp_path):
    f = tmp_path / "c.json"
    f.write_text(json.dumps({"port": 3, "lr": 0.5}))
    assert parse_config(Demo, [f"--config={f}", "--lr=0.25"]) == Demo(port=3, lr=0.25)


@pytest.mark.parametrize("argv, message", [
    (["--nope=1"], "unknown option"),        # typo in a key
    (["--port=abc"], "--port='abc'"),        # value of the wrong type
    (["--flag=maybe"], "true or false"),     # not a boolean
    (["positional"], "unexpected argument"),  # not --key=value
    (["--config=/does/not/exist.json"], "does not exist"),
])
def test_errors_are_user_errors(argv, message):
    with pytest.raises(UserError, match=message):
        parse_config(Demo, argv)


def test_help_lists_fields_with_docstrings(capsys):
    assert field_docs(Demo)["port"] == "The port to bind."
    text = help_text(Demo, "T_")
    assert "--port=5" in text and "The port to bind." in text and "T_KEY" in text
    with pytest.raises(SystemExit) as e:
        parse_config(Demo, ["--help"])
    assert e.value.code == 0 and "--lr=1e-06" in capsys.readouterr().out
