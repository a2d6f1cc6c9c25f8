"""The one flag language: `--section.key value` onto any dataclass, typed by its fields.

Every command (run_em.py and its stages, train_policy.py, train_rm.py, python -m mt.sampler,
eval/*.py) parses its flags with `parse(argv, SomeDataclass())` (the experiment's configs through
mt/config.py `parse`, which adds the presets and the checks across fields): `--section.key value`
(or `--key=value`; a bare `--flag` is true for a bool), type-checked against the defaults, unknown
keys rejected with the valid ones, and `--help` lists every key with its type, default and the
comment written beside the field. Allowed values and ranges are declared beside their field with
`opt(...)`.
"""
from __future__ import annotations

import copy
import dataclasses
import inspect
import json
import math
import re
import sys
import types
import typing
from dataclasses import field

from mt.errors import UserError


class ConfigError(UserError):
    pass


def opt(default, *, choices: tuple | None = None, above: float | None = None,
        min: float | None = None, scheduling: bool = False):
    """A field with its allowed values beside it: `choices`,
    a strict lower bound `above`, or `min`.

    scheduling=True marks a setting that only schedules the work (it never changes a result), so a
    resumed run may change it without redoing anything (mt/manifest.py).
    """
    meta = {"choices": choices, "above": above, "min": min, "scheduling": scheduling}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: copy.deepcopy(default), metadata=meta)
    return field(default=default, metadata=meta)


# ---- the flag language: `--section.key value`, typed by the dataclass fields


def _fields(obj, prefix=""):
    """(dotted key, dataclass field, owner object) for every leaf field, sections expanded."""
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        v = getattr(obj, f.name)
        if dataclasses.is_dataclass(v):
            yield from _fields(v, f"{prefix}{f.name}.")
        else:
            yield f"{prefix}{f.name}", f, hints[f.name]


def flat_keys(obj, prefix="") -> dict[str, typing.Any]:
    """{'dpo.beta': type, ...} for every leaf field."""
    return {k: t for k, _, t in _fields(obj, prefix)}


def scheduling_only(obj) -> tuple[str, ...]:
    """The keys marked opt(scheduling=True): they never change a result."""
    return tuple(k for k, f, _ in _fields(obj) if f.metadata.get("scheduling"))


def _parse(key: str, raw, typ):
    """Parse a command-line string (or a JSON value) into the field's declared type."""
    origin = typing.get_origin(typ)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(typ) if a is not type(None)]
        if raw in (None, "none", "None", "null"):
            return None
        return _parse(key, raw, args[0])
    try:
        if typ is bool:
            if isinstance(raw, bool):
                return raw
            if str(raw).lower() in ("1", "true", "yes", "on"):
                return True
            if str(raw).lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError
        if typ is int:
            if isinstance(raw, float) and not raw.is_integer():
                raise ValueError
            if isinstance(raw, bool):
                raise ValueError
            return int(raw)
        if typ is float:
            if isinstance(raw, bool):
                raise ValueError
            return float(raw)
        if typ is str:
            if not isinstance(raw, str):
                raise ValueError
            return raw
        if origin is tuple:
            parts = raw if isinstance(raw, (list, tuple)) else str(raw).split(",")
            inner = typing.get_args(typ)
            if len(parts) != len(inner):
                raise ValueError
            return tuple(_parse(key, p, t) for p, t in zip(parts, inner))
    except ValueError:
        pass
    else:
        raise ConfigError(f"--{key}: unsupported field type {typ}")
    raise ConfigError(f"--{key}: expected {getattr(typ, '__name__', typ)}, got {raw!r}")


def set_key(cfg, key: str, raw):
    keys = flat_keys(cfg)
    if key not in keys:
        raise ConfigError(f"unknown config key --{key}; valid keys: "
                          f"{', '.join('--' + k for k in keys)}")
    *path, leaf = key.split(".")
    obj = cfg
    for p in path:
        obj = getattr(obj, p)
    setattr(obj, leaf, _parse(key, raw, keys[key]))


def _get(cfg, key):
    obj = cfg
    for p in key.split("."):
        obj = getattr(obj, p)
    return obj


def check_fields(cfg):
    """The checks declared beside the fields (opt): finite numbers, ranges, allowed values."""
    for key, f, _ in _fields(cfg):
        v, m = _get(cfg, key), f.metadata
        if isinstance(v, float) and not math.isfinite(v):
            raise ConfigError(f"--{key}={v}: must be a finite number")
        if m.get("above") is not None and not v > m["above"]:
            raise ConfigError(f"--{key}={v}: must be > {m['above']}. Fix: pass --{key} above "
                              f"{m['above']}")
        if m.get("min") is not None and not v >= m["min"]:
            raise ConfigError(f"--{key}={v}: must be >= {m['min']}. Fix: pass --{key} of at least "
                              f"{m['min']}")
        if m.get("choices") is not None and v not in m["choices"]:
            allowed = ", ".join(map(str, m["choices"]))
            raise ConfigError(f"--{key}={v!r}: must be one of {allowed}. Fix: pass one of them")
    return cfg


def _tokens(argv: list[str], cfg) -> list[tuple[str, str]]:
    """(key, raw value) pairs from `--key value`, `--key=value`, and a bare `--flag` for a bool."""
    keys = flat_keys(cfg)
    pairs, i = [], 0
    while i < len(argv):
        tok = argv[i]
        if not tok.startswith("--"):
            raise ConfigError(f"unexpected argument {tok!r}: options are --key value (e.g. "
                              "--dpo.beta 0.05)")
        key, eq, val = tok[2:].partition("=")
        key = key.replace("-", "_")
        i += 1
        if not eq:
            nxt = argv[i] if i < len(argv) else None
            if keys.get(key) is bool and (nxt is None or nxt.startswith("--")):
                val = "true"  # a bare bool flag
            elif nxt is None:
                raise ConfigError(f"--{key}: missing value")
            else:
                val, i = nxt, i + 1
        pairs.append((key, val))
    return pairs


def parse(argv: list[str], base, prog: str | None = None, doc: str = "",
          presets: dict[str, dict] | None = None, check=check_fields):
    """Any command's flags onto a copy of the dataclass `base`: `--preset NAME` first (when `base`
    has a `preset` field; NAME a key of `presets`), then `--a.b value` overrides in order; then
    `check` (by default the checks declared beside the fields). `--help` prints the keys and
    exits."""
    cfg = copy.deepcopy(base)
    if any(a in ("-h", "--help") for a in argv):
        print(help_text(cfg, prog, doc, presets))
        raise SystemExit(0)
    pairs = _tokens(list(argv), cfg)
    names = [v for k, v in pairs if k == "preset"]
    if names and hasattr(cfg, "preset"):
        name, presets = names[-1], presets or {}
        if name not in presets:
            raise ConfigError(f"--preset {name!r}: unknown; presets: {', '.join(presets)}")
        cfg.preset = name
        for k, v in presets[name].items():
            set_key(cfg, k, v)
    for k, v in pairs:
        if not (k == "preset" and hasattr(cfg, "preset")):
            set_key(cfg, k, v)
    return check(cfg)


# ---- --help: every key with its type, default and the comment beside its field

_COMMENT = re.compile(r"^\s+(\w+)\s*:[^#]*?#\s*(.*)$")


def _comments(cls) -> dict[str, str]:
    """{field: its trailing comment (or the comment line above it)} from the class source."""
    out = {}
    for klass in reversed(cls.__mro__[:-1]):
        try:
            lines = inspect.getsource(klass).splitlines()
        except (OSError, TypeError):
            continue
        above = ""
        for line in lines:
            s = line.strip()
            if s.startswith("#"):
                above = (above + " " + s.lstrip("# ")).strip()
                continue
            m = _COMMENT.match(line)
            name = re.match(r"^\s+(\w+)\s*:", line)
            if m:
                out[m.group(1)] = m.group(2)
            elif name and above:
                out[name.group(1)] = above
            above = ""
    return out


def help_text(cfg, prog: str | None = None, doc: str = "",
              presets: dict | None = None) -> str:
    prog = prog or f"python {sys.argv[0]}"
    lines = [f"usage: {prog} [--key value ...]   (also --key=value; a bare --flag sets a bool)",
             ""]
    if doc:
        lines += [doc.strip(), ""]

    def section(obj, prefix):
        notes = _comments(type(obj))
        for f in dataclasses.fields(obj):
            v = getattr(obj, f.name)
            if dataclasses.is_dataclass(v):
                head = (type(v).__doc__ or "").strip().splitlines()[0]
                lines.extend(["", f"--{prefix}{f.name}.*  {head}"])
                section(v, f"{prefix}{f.name}.")
                continue
            typ = typing.get_type_hints(type(obj))[f.name]
            tname = getattr(typ, "__name__", str(typ).replace("typing.", ""))
            m = f.metadata
            extra = f" (one of {'|'.join(map(str, m['choices']))})" if m.get("choices") else ""
            key = (f"  --{prefix}{f.name} {tname} = "
                   f"{json.dumps(v, ensure_ascii=False, default=str)}")
            lines.append(f"{key:<44} {notes.get(f.name, '')}{extra}".rstrip())
    section(cfg, "")
    if presets is not None and hasattr(cfg, "preset"):
        lines += ["", f"presets: {', '.join(presets)} (mt/config.py PRESETS)"]
    return "\n".join(lines)
