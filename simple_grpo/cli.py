"""Dataclass configs overridable as `--key=value`, from a JSON config file, or from the environment.

Each process has one dataclass whose fields carry a docstring (a string literal right under the
field); `--help` prints them. Precedence, lowest to highest: field default < config file
(`--config=path.json`) < environment (`<PREFIX><KEY>` upper-case, when `env_prefix` is given) <
command line. Values are converted to the field's type; a bad key or value is a UserError naming it.
"""
from __future__ import annotations

import ast
import dataclasses
import inspect
import json
import os
import textwrap
import typing
from pathlib import Path

from simple_grpo.errors import UserError

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def field_docs(cls) -> dict[str, str]:
    """{field name: the docstring written under it in the class body}."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        except (OSError, TypeError):  # source not available (frozen app): no docs, still works
            continue
        body = tree.body[0].body
        for node, nxt in zip(body, body[1:]):
            if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
                    and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant)
                    and isinstance(nxt.value.value, str)):
                docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs


def _convert(cls, name: str, raw):
    hints = typing.get_type_hints(cls)
    tp = hints[name]
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        if raw is None or (isinstance(raw, str) and raw.lower() in ("none", "null", "")):
            if type(None) in args:
                return None
        tp = next(a for a in args if a is not type(None))
    if not isinstance(raw, str):
        return raw  # from a JSON config file: already typed
    try:
        if tp is bool:
            if raw.lower() in _TRUE:
                return True
            if raw.lower() in _FALSE:
                return False
            raise ValueError("expected true or false")
        if tp in (int, float, str):
            return tp(raw)
        if typing.get_origin(tp) in (list, dict) or tp in (list, dict):
            return json.loads(raw)
    except ValueError as e:
        raise UserError(f"--{name}={raw!r}: {e}") from None
    return raw


def parse_config(cls, argv: list[str], env_prefix: str | None = None, prog: str = ""):
    """Build `cls` from defaults, an optional `--config=file.json`, the environment and argv."""
    names = {f.name for f in dataclasses.fields(cls)}
    cli: dict[str, str] = {}
    for arg in argv:
        if arg in ("-h", "--help"):
            print(help_text(cls, env_prefix, prog))
            raise SystemExit(0)
        if not arg.startswith("--"):
            raise UserError(f"unexpected argument {arg!r}; options look like --key=value")
        key, eq, value = arg[2:].partition("=")
        key = key.replace("-", "_")
        key = getattr(cls, "ALIASES", {}).get(key, key)  # e.g. --token for --ref_token
        if not eq:  # a bare --flag means true for booleans
            value = "true"
        cli[key] = value
    values: dict[str, object] = {}
    if "config" in cli and "config" not in names:
        path = Path(cli.pop("config"))
        if not path.exists():
            raise UserError(f"config file {path} does not exist")
        try:
            values.update(json.loads(path.read_text()))
        except json.JSONDecodeError as e:
            raise UserError(f"config file {path} is not valid JSON: {e}") from None
    if env_prefix:
        for name in names:
            env = os.environ.get(env_prefix + name.upper())
            if env is not None:
                values[name] = env
    values.update(cli)
    unknown = sorted(set(values) - names)
    if unknown:
        raise UserError(f"unknown option(s) {', '.join('--' + u for u in unknown)}; "
                        f"see --help for the list")
    return cls(**{k: _convert(cls, k, v) for k, v in values.items()})


def help_text(cls, env_prefix: str | None = None, prog: str = "") -> str:
    docs = field_docs(cls)
    lines = [f"usage: {prog} [--key=value ...]" + ("" if env_prefix is None else
             f"   (or environment variables {env_prefix}KEY)"), ""]
    if cls.__doc__:
        lines += [textwrap.dedent(cls.__doc__).strip(), ""]
    if "config" not in {f.name for f in dataclasses.fields(cls)}:
        lines += ["  --config=FILE.json", "      Read options from a JSON object first (the command line wins)."]
    for f in dataclasses.fields(cls):
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else "")
        lines.append(f"  --{f.name}={default}")
        if f.name in docs:
            lines.append(textwrap.fill(docs[f.name], 96, initial_indent=" " * 6,
                                       subsequent_indent=" " * 6))
    return "\n".join(lines)


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)
