"""Resolving a RunConfig from its sources: a preset, then a TOML file, then dotted CLI overrides.

    cfg = load_config(preset="debug", config_file="my.toml", overrides=["--model.d_model=256"])

Each later source wins. ``lumina.config`` holds the dataclasses and the dict <-> dataclass checks;
``lumina.presets`` builds named configs from them; this module reads the file and the flags and
merges them over a preset, so it imports both (neither imports it).

Every problem with user input raises ``ConfigError`` whose message is one line naming the source
(file and line, or the CLI flag) and the field; ``lumina.run`` prints it and exits with status 2.
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from lumina import presets
from lumina.config import ConfigError, RunConfig, from_dict, to_dict

__all__ = ["load_config", "parse_override", "read_toml"]


def _toml_line(text: str, section: str, key: str) -> int | None:
    """1-based line of ``key = ...`` inside ``[section]`` (or a dotted ``a.b = ...``), best effort."""
    current = ""
    key_re = re.compile(rf"^\s*(?:[\"']?{re.escape(key)}[\"']?)\s*=")
    dotted_re = re.compile(rf"^\s*{re.escape((section + '.' if section else '') + key)}\s*=")
    for i, line in enumerate(text.splitlines(), 1):
        header = re.match(r"^\s*\[\s*([^\]]+?)\s*\]", line)
        if header:
            current = header.group(1)
            continue
        if (current == section and key_re.match(line)) or (current == "" and dotted_re.match(line)):
            return i
    return None


def _flatten(d: Mapping[str, Any], prefix: str = "") -> Iterable[tuple[str, Any]]:
    for k, v in d.items():
        if isinstance(v, Mapping):
            yield from _flatten(v, f"{prefix}{k}.")
        else:
            yield f"{prefix}{k}", v


def read_toml(path: str) -> tuple[dict[str, Any], dict[str, str]]:
    """The file's nested values and, per dotted key (and per table), where it is: "file.toml:LINE"."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such config file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: cannot read config file ({e})") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: invalid TOML: {e}") from None
    origin = {}
    for dotted, _ in _flatten(data):
        section, _, key = dotted.rpartition(".")
        line = _toml_line(text, section, key)
        origin[dotted] = f"{path}:{line}" if line else path
    lines = text.splitlines()
    for table in {k.rsplit(".", 1)[0] for k in origin if "." in k}:  # headers, to place unknown tables
        header = re.compile(rf"^\s*\[\s*{re.escape(table)}\s*\]")
        line = next((i for i, s in enumerate(lines, 1) if header.match(s)), None)
        origin.setdefault(table, f"{path}:{line}" if line else path)
    return data, origin


def _merge(base: dict[str, Any], new: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in new.items():
        out[k] = _merge(out[k], v) if isinstance(v, Mapping) and isinstance(out.get(k), dict) else v
    return out


def parse_override(arg: str) -> tuple[str, str]:
    """``--section.field=value`` -> ("section.field", "value"); the value stays a string."""
    body = arg[2:] if arg.startswith("--") else arg
    key, eq, value = body.partition("=")
    if not eq or not key or not re.fullmatch(r"[A-Za-z_][\w]*(\.[A-Za-z_]\w*)*", key):
        raise ConfigError(f"{arg}: overrides look like --section.field=value (e.g. --model.d_model=256)")
    return key, value


def _set_dotted(d: dict[str, Any], key: str, value: Any) -> None:
    *parents, leaf = key.split(".")
    for i, p in enumerate(parents):
        if p not in d or d[p] is None:
            d[p] = {}  # an unknown section: from_dict reports it with a suggestion
        elif not isinstance(d[p], dict):
            raise ConfigError(f"--{key}: '{'.'.join(parents[: i + 1])}' is a field, not a section")
        d = d[p]
    d[leaf] = value


def load_config(
    preset: str | None = None,
    config_file: str | None = None,
    overrides: Sequence[str] = (),
    base: dict[str, Any] | None = None,
) -> RunConfig:
    """Resolve a RunConfig: the preset (``--preset``, else the file's ``preset =``, else ``debug``),
    then the TOML file's keys, then dotted CLI overrides, each later source winning. ``base`` (a
    resumed checkpoint's config, as ``to_dict`` wrote it) replaces the preset as the starting point."""
    data: dict[str, Any] = {}
    origin: dict[str, str] = {}
    if config_file:
        data, origin = read_toml(config_file)
    name = preset or data.get("preset") or (base or {}).get("preset") or "debug"
    if not isinstance(name, str):
        raise ConfigError(f"{origin.get('preset', config_file)}: preset: expected a string, got {name!r}")
    if base is None or (preset and preset != base.get("preset")):
        base = to_dict(presets.get(name))
    merged = _merge(base, data)
    merged["preset"] = name
    cli_keys = set()
    for arg in overrides:
        key, value = parse_override(arg)
        origin[key] = f"--{key}"
        cli_keys.add(key)
        _set_dotted(merged, key, value)
    return from_dict(RunConfig, merged, origin=origin, from_cli=frozenset(cli_keys))
