"""Dataclass configs from the command line, a JSON config file and the environment.

Each process has one flat dataclass whose fields carry a docstring (a string literal right under
the field): `--help` prints them, grouped by the class's `# --- section[: description]` comments
(a section may be continued further down; fields before any section comment form an unnamed one).
Precedence, lowest to highest: field default < config file (`--config=path.json`; keys starting
with `_` are comments) < environment (`<PREFIX><KEY>` upper-case, when `env_prefix` is given) <
command line. Forms: `--key=value` or `--key value`; booleans `--flag`, `--no-flag`,
`--flag=true|false`; `-` and `_` are the same in names; a class's `ALIASES` map other names.
Values are converted to the field's type (`Literal[...]` fields take only their choices; tuples
are comma-separated or JSON lists; dicts and lists JSON), `none`/`null` set an optional field to
None (`null` only, where `none` is one of its choices), and so does an empty value unless the
field's metadata has `keep_empty`. Every bad key or
value is one UserError line, with "did you mean" for near misses.

Why no library: tyro, jsonargparse and transformers.HfArgumentParser each parse dataclasses, but
none keeps everything here at once (our environment prefix and precedence, docstring help in
sections of a flat class, one-line errors instead of usage dumps, `--token` style aliases);
adapting one would take about as much code as this module, plus a dependency.
"""
from __future__ import annotations

import ast
import dataclasses
import difflib
import inspect
import json
import os
import re
import textwrap
import types
import typing
from pathlib import Path

from simple_grpo.errors import UserError

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}
_NULL = {"none", "null"}
_SECTION = re.compile(r"^\s*# --- ([^:]+?)\s*(?::\s*(.*))?$")


def _class_trees(cls):
    """(class, parsed class body, source lines) of `cls` and its dataclass bases, base first."""
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        try:
            src = textwrap.dedent(inspect.getsource(klass))
        except (OSError, TypeError):  # source not available (frozen app): no docs, still works
            continue
        yield klass, ast.parse(src).body[0].body, src.splitlines()


def field_docs(cls) -> dict[str, str]:
    """{field name: the docstring written under it in the class body}."""
    docs: dict[str, str] = {}
    for _, body, _ in _class_trees(cls):
        for node, nxt in zip(body, body[1:]):
            if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
                    and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant)
                    and isinstance(nxt.value.value, str)):
                docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs


def field_sections(cls) -> dict[str, tuple[str, str]]:
    """{field name: (section, description)} from the `# --- section: description` comment above
    it; a section's description is the one written where it first appears."""
    out: dict[str, tuple[str, str]] = {}
    described: dict[str, str] = {}
    for _, body, lines in _class_trees(cls):
        marks = [(i + 1, m.group(1).strip(), (m.group(2) or "").strip())
                 for i, line in enumerate(lines) if (m := _SECTION.match(line))]
        for node in body:
            if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
                above = [(name, desc) for line, name, desc in marks if line < node.lineno]
                name, desc = above[-1] if above else ("", "")
                out[node.target.id] = (name, described.setdefault(name, desc))
    return out


def _hints(cls) -> dict:
    return typing.get_type_hints(cls)


def _unwrap(tp) -> tuple[object, bool]:
    """(the type without None, whether None is allowed)."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        rest = [a for a in args if a is not type(None)]
        return (rest[0] if len(rest) == 1 else typing.Union[tuple(rest)]), type(None) in args
    return tp, False


def choices(tp) -> tuple | None:
    """The allowed values of a `Literal[...]` (or `Literal[...] | None`) type, else None."""
    base, _ = _unwrap(tp)
    return typing.get_args(base) if typing.get_origin(base) is typing.Literal else None


def _is_flag(tp) -> bool:
    """Fields that accept a bare `--flag` (true) and `--no-flag` (false)."""
    base, _ = _unwrap(tp)
    return base is bool or "true" in (choices(tp) or ())


def _near(word: str, options) -> str:
    close = difflib.get_close_matches(word, list(options), n=1, cutoff=0.6)
    return f"; did you mean {close[0]}?" if close else ""


def _choice(name: str, raw, opts: tuple):
    value = raw
    if {"true", "false"} <= set(opts):  # e.g. --resume: booleans in any spelling
        text = str(raw).lower()
        value = "true" if raw is True or text in _TRUE else "false" if raw is False or text in _FALSE else raw
    if value in opts:
        return value
    shown = ", ".join(map(str, opts))
    raise UserError(f"--{name} must be one of: {shown} (got {raw!r}{_near(str(raw), map(str, opts))})")


def _tuple(name: str, tp, raw):
    args = typing.get_args(tp)
    items = raw if isinstance(raw, (list, tuple)) else [s.strip() for s in str(raw).strip("()[] ").split(",")]
    kind = args[0] if args else str
    if args and args[-1] is not Ellipsis and len(items) != len(args):
        raise UserError(f"--{name}={raw!r}: expected {len(args)} comma-separated values")
    if kind in (int, float) and any(isinstance(x, bool) for x in items):  # float(True) is 1.0
        raise UserError(f"--{name}={raw!r}: expected numbers, got a boolean")
    try:
        return tuple(kind(x) for x in items)
    except ValueError as e:
        raise UserError(f"--{name}={raw!r}: {e}") from None


def convert(cls, name: str, raw):
    """`raw` (a string from the command line or environment, or a JSON value) as field `name`'s
    type; one UserError line when it does not fit."""
    tp = _hints(cls)[name]
    base, optional = _unwrap(tp)
    opts = choices(tp)
    keep_empty = cls.__dataclass_fields__[name].metadata.get("keep_empty", False)
    if optional and (raw is None or (isinstance(raw, str) and (
            (raw.lower() in _NULL and raw.lower() not in (opts or ())) or (raw == "" and not keep_empty)))):
        return None
    if opts is not None:
        return _choice(name, raw, opts)
    origin = typing.get_origin(base) or base
    try:
        if base is bool:
            if isinstance(raw, bool):
                return raw
            if str(raw).lower() in _TRUE | _FALSE:
                return str(raw).lower() in _TRUE
            raise ValueError("expected true or false")
        if origin is tuple:
            return _tuple(name, base, raw)
        if base in (int, float):
            if isinstance(raw, bool) or (base is int and isinstance(raw, float) and not raw.is_integer()):
                raise ValueError(f"expected {base.__name__}")
            return base(raw)
        if base is str:
            if not isinstance(raw, str):
                raise ValueError(f"expected text, got {type(raw).__name__}")
            return raw
        if origin in (list, dict):
            value = json.loads(raw) if isinstance(raw, str) else raw
            if not isinstance(value, origin):
                raise ValueError(f"expected a JSON {'object' if origin is dict else 'list'}")
            return value
    except ValueError as e:
        raise UserError(f"--{name}={raw!r}: {e}") from None
    return raw


def check_choices(cfg) -> dict:
    """Check every `Literal[...]` field of `cfg` holds one of its choices (None where it is
    optional) -> {field: its value, normalised} (a `resume=True` set in code becomes "true")."""
    out = {}
    for name, tp in _hints(type(cfg)).items():
        if name in cfg.__dataclass_fields__ and (opts := choices(tp)) is not None:
            value = getattr(cfg, name)
            out[name] = value if value is None and _unwrap(tp)[1] else _choice(name, value, opts)
    return out


def _read_argv(cls, argv: list[str], env_prefix: str | None, prog: str) -> dict[str, object]:
    """{field or 'config' or an unknown name: its value} from the command line."""
    hints, aliases = _hints(cls), getattr(cls, "ALIASES", {})
    names = set(hints) & set(cls.__dataclass_fields__)
    out: dict[str, object] = {}
    args = list(argv)
    while args:
        arg = args.pop(0)
        if arg in ("-h", "--help"):
            print(help_text(cls, env_prefix, prog))
            raise SystemExit(0)
        if not arg.startswith("--") or arg == "--":
            raise UserError(f"unexpected argument {arg!r}; options look like --key=value or --key value")
        key, eq, value = arg[2:].partition("=")
        key = key.replace("-", "_")
        key = aliases.get(key, key)
        negated = aliases.get(key[3:], key[3:]) if key.startswith("no_") and key not in names else None
        if negated in names and _is_flag(hints[negated]):
            if eq:
                raise UserError(f"{arg.partition('=')[0]} takes no value; it sets --{negated}=false")
            out[negated] = "false"
            continue
        if not eq and key in names and _is_flag(hints[key]):
            optional = _NULL if _unwrap(hints[key])[1] else set()
            words = _TRUE | _FALSE | set(choices(hints[key]) or ()) | optional
            value = args.pop(0) if args and args[0].lower() in words else "true"
        elif not eq:
            if not args or args[0].startswith("--"):
                if key in names or key == "config":
                    raise UserError(f"--{key} needs a value: --{key}=VALUE or --{key} VALUE")
                value = ""  # an unknown option: reported below with a suggestion
            else:
                value = args.pop(0)
        out[key] = value
    return out


def _unknown(keys, known, where: str, hints: dict[str, str] | None = None) -> None:
    """One line naming every unknown option, each with what it is called here (`hints`: names
    other trainers use, which spelling alone would map to the wrong option) or its nearest name."""
    if keys:
        hints = hints or {}
        near = {k: [f"--{m}" for m in difflib.get_close_matches(k, known, 1, 0.6)] for k in keys}
        near.update({k: [hints[k]] for k in keys if k in hints})
        items = [f"--{k}" + (f" (did you mean {near[k][0]}?)" if near[k] else "") for k in sorted(keys)]
        raise UserError(f"unknown option{'s' * (len(items) > 1)} {', '.join(items)}{where}; see --help")


def parse_config(cls, argv: list[str], env_prefix: str | None = None, prog: str = ""):
    """Build `cls` from defaults, an optional `--config=file.json`, the environment and argv."""
    aliases, hints = getattr(cls, "ALIASES", {}), getattr(cls, "HINTS", {})
    names = {f.name for f in dataclasses.fields(cls)}
    known = names | set(aliases)
    cli = _read_argv(cls, argv, env_prefix, prog)
    values: dict[str, object] = {}
    if "config" in cli and "config" not in names:
        path = Path(str(cli.pop("config")))
        if not path.is_file():
            raise UserError(f"config file {path} does not exist")
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise UserError(f"config file {path} is not valid JSON: {e}") from None
        if not isinstance(data, dict):
            raise UserError(f"config file {path}: expected a JSON object of options")
        data = {aliases.get(k.replace("-", "_"), k.replace("-", "_")): v
                for k, v in data.items() if not k.startswith("_")}
        _unknown(set(data) - names, known, f" in config file {path}", hints)
        values.update(data)
    if env_prefix:
        for name in names:
            env = os.environ.get(env_prefix + name.upper())
            if env is not None:
                values[name] = env
    _unknown(set(cli) - names, known, "", hints)
    values.update(cli)
    return cls(**{k: convert(cls, k, v) for k, v in values.items()})


def _shown(value, tp) -> str:
    if value is None:
        return "null" if "none" in (choices(tp) or ()) else "none"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, tuple):
        return ",".join(map(str, value))
    if isinstance(value, (dict, list)):
        return json.dumps(value)
    return str(value)


def help_text(cls, env_prefix: str | None = None, prog: str = "") -> str:
    """--help: the class docstring, then every option with its default, choices and docstring,
    grouped by section."""
    docs, sections, hints = field_docs(cls), field_sections(cls), _hints(cls)
    lines = [f"usage: {prog} [--key=value | --key value | --flag | --no-flag] ...",
             "  Also from a JSON file (--config=FILE.json)"
             + ("" if env_prefix is None else f" and environment variables {env_prefix}KEY") + ";",
             "  the command line wins over the environment, which wins over the file.", ""]
    if cls.__doc__:
        lines += [textwrap.dedent(cls.__doc__).strip()]
    groups: dict[str, list] = {}
    for f in dataclasses.fields(cls):
        groups.setdefault(sections.get(f.name, ("", ""))[0], []).append(f)
    for section, fields in groups.items():
        desc = sections[fields[0].name][1] if section else ""
        lines += ["", f"{section}:" + (f" {desc}" if desc else "")] if section else [""]
        for f in fields:
            default = f.default if f.default is not dataclasses.MISSING else (
                f.default_factory() if f.default_factory is not dataclasses.MISSING else "")
            opts = choices(hints[f.name])
            lines.append(f"  --{f.name}={_shown(default, hints[f.name])}"
                         + (f"  {{{', '.join(map(str, opts))}}}" if opts else ""))
            if f.name in docs:
                lines.append(textwrap.fill(docs[f.name], 96, initial_indent=" " * 6,
                                           subsequent_indent=" " * 6))
    return "\n".join(lines)


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)
