"""YAML configs: load, merge ``base:`` chains, apply ``--set`` overrides, validate, dump.

The sections are typed dataclasses (:mod:`sparseham.config.schema`) that validate themselves on
construction. This module parses text into plain mappings, remembers which file or ``--set``
wrote each key, and turns every problem into a one-line :class:`ConfigError` that names that
source, the dotted key, the value and what is allowed::

    configs/x.yaml: unknown key 'ham.alpah'; did you mean 'ham.alpha'?
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

import sparseham.methods  # noqa: F401  (registers the built-in methods, whose sections the schema knows)
from sparseham import method as _method
from sparseham.config.fields import ConfigError, FieldError, Section, coerce_field, hints, show
from sparseham.config.schema import Config, SparsityConfig, help_text
from sparseham.config.shipped import resolve_config, shipped_configs
from sparseham.config.strict_yaml import load_yaml

__all__ = [
    "ConfigError", "Config", "load_config", "config_from_dict", "parse_override",
    "config_to_dict", "dump_config", "method_options", "help_text", "shipped_configs",
]

_SET = "--set"
MAX_BASE_DEPTH = 32
# PyYAML raises ValueError for impossible dates such as 2020-13-01 and for ints longer than
# Python's digit limit, so those count as malformed YAML as well.
_YAML_ERRORS = (yaml.YAMLError, ValueError, OverflowError, RecursionError)


class _Origins:
    """Which source (a file or ``--set``) last wrote each key, so errors can name it."""

    def __init__(self, default: str) -> None:
        self.default = default
        self.by_path: dict[tuple, str] = {}

    def error(self, path: tuple, text: str) -> ConfigError:
        for end in range(len(path), -1, -1):
            if path[:end] in self.by_path:
                return ConfigError(f"{self.by_path[path[:end]]}: {text}")
        return ConfigError(f"{self.default}: {text}")


def _dotted(path: tuple) -> str:
    return ".".join(map(str, path))


def _merge(into: dict, child: Mapping, origins: _Origins, source: str, path: tuple = ()) -> None:
    """Deep-merge ``child`` into ``into`` (mappings merge, the child wins, lists are replaced)
    and record ``source`` as the origin of every key it writes."""
    for key, value in child.items():
        here = (*path, key)
        origins.by_path[here] = source
        if isinstance(value, Mapping):
            if not isinstance(into.get(key), dict):
                into[key] = {}
            _merge(into[key], value, origins, source, here)
        else:
            into[key] = value


def _yaml_problem(error: Exception) -> str:
    mark = getattr(error, "problem_mark", None)
    problem = getattr(error, "problem", None)
    if mark is not None and problem:
        return f"invalid YAML at line {mark.line + 1}, column {mark.column + 1}: {problem}"
    if isinstance(error, RecursionError):
        return "invalid YAML: nested too deeply"
    if isinstance(error, yaml.reader.ReaderError):  # a byte no YAML text holds: NUL, other controls
        char = chr(error.character) if isinstance(error.character, int) else error.character
        return (f"not a YAML text file: character {char!r} at byte {error.position} "
                "(a binary file, or text with control characters)")
    # Never the error's own text: PyYAML quotes the offending line, and the file may not be YAML
    # at all (``base: /etc/shadow``).
    return f"invalid YAML ({type(error).__name__})"


def _top_level(data: Any, source: str) -> Mapping:
    if data is None:
        return {}
    if not isinstance(data, Mapping):
        known = ", ".join(f.name for f in dataclasses.fields(Config))
        raise ConfigError(f"{source}: the top level must be a mapping of sections ({known}), "
                          f"got {show(data)}")
    return data


def _read_yaml(path: Path) -> Mapping:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot read the file ({e.strerror})") from None
    try:
        data = load_yaml(text)
    except _YAML_ERRORS as e:
        raise ConfigError(f"{path}: {_yaml_problem(e)}") from None
    return _top_level(data, str(path))


def _load_file(path: Path, chain: tuple[tuple[Path, str], ...], origins: _Origins) -> dict:
    """Read ``path`` and, first, the ``base:`` files it names (each relative to its child)."""
    real, names = path.resolve(), [*(name for _, name in chain), str(path)]
    if any(real == seen for seen, _ in chain):
        raise ConfigError(f"{chain[0][1]}: base chain has a cycle: {' -> '.join(names)}")
    if len(chain) >= MAX_BASE_DEPTH:
        raise ConfigError(f"{chain[0][1]}: base chain deeper than {MAX_BASE_DEPTH} files (at {path}); "
                          "merge some of them")
    if not path.is_file():
        if not chain:
            raise ConfigError(f"config file not found: {path} (nor a shipped config of that name; "
                              "`sparseham configs` lists them)")
        raise ConfigError(f"{chain[-1][1]}: base file not found: {path} "
                          f"(chain: {' -> '.join(names)})")
    data = _read_yaml(path)
    merged: dict = {}
    if "base" in data:
        base = data["base"]
        if not isinstance(base, str) or not base.strip():
            raise ConfigError(f"{path}: base = {show(base)}: expected the path of another YAML "
                              "file, relative to this one")
        merged = _load_file(path.parent / base, (*chain, (real, str(path))), origins)
    _merge(merged, {k: v for k, v in data.items() if k != "base"}, origins, str(path))
    return merged


def parse_override(text: str) -> tuple[str, Any]:
    """Split a ``--set`` item into its dotted key and its value, parsed as YAML.

    Args:
        text: ``"key=value"``, e.g. ``"ham.alpha=100"`` or ``"sparsity.exclude=[fc*, conv1*]"``.

    Returns:
        ``(key, value)``, e.g. ``("ham.alpha", 100)``; an empty value is ``None``.

    Raises:
        ConfigError: without ``=``, with an empty key part, or with a value that is not YAML.
    """
    key, sep, raw = text.partition("=") if isinstance(text, str) else ("", "", "")
    parts = [part.strip() for part in key.split(".")]
    if not sep or not key.strip():
        raise ConfigError(f"{_SET}: {show(text)}: expected key=value")
    if not all(parts):
        raise ConfigError(f"{_SET}: {show(text)}: the key must be dotted names, like ham.alpha")
    key = ".".join(parts)
    try:
        return key, load_yaml(raw)
    except _YAML_ERRORS as e:
        raise ConfigError(f"{_SET}: {show(text)}: the value is not valid YAML "
                          f"({_yaml_problem(e)})") from None


def _apply_override(raw: dict, origins: _Origins, text: str) -> None:
    key, value = parse_override(text)
    path = tuple(key.split("."))
    sections = {f.name for f in dataclasses.fields(Config)}
    if value is None and (path[0] in sections and len(path) == 1 or _is_section(raw, path)):
        raise ConfigError(f"{_SET}: {show(text)}: '{key}' is a section, null would reset all of it; "
                          f"set its keys instead, e.g. --set {key}.KEY=VALUE")
    node = raw
    for end in range(1, len(path)):
        child = node.get(path[end - 1])
        if child is None:
            child = node[path[end - 1]] = {}
        elif not isinstance(child, dict):
            raise ConfigError(f"{_SET}: {show(text)}: '{_dotted(path[:end])}' = {show(child)} is "
                              "a value, not a section")
        origins.by_path[path[:end]] = _SET
        node = child
    _merge(node, {path[-1]: value}, origins, _SET, path[:-1])


def _is_section(raw: dict, path: tuple) -> bool:
    node = raw
    for key in path:
        if not isinstance(node, dict):
            return False
        node = node.get(key)
    return isinstance(node, dict)


def _unknown_key(path: tuple, key: Any, known: Sequence[str], origins: _Origins) -> ConfigError:
    close = difflib.get_close_matches(str(key), list(known), n=1, cutoff=0.6)
    hint = (f"; did you mean '{_dotted((*path, close[0]))}'?" if close
            else f" (known here: {', '.join(known)})")
    if not re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_-]{0,40}", str(key)):
        # Not a name a config would use: the file is probably not a config at all (``base:
        # /etc/shadow``), so its contents are not echoed.
        where = f" under '{_dotted(path)}'" if path else ""
        return origins.error((*path, key), f"a key that is not a config key{where}; is this a sparseham "
                                           f"config? (known here: {', '.join(known)})")
    return origins.error((*path, key), f"unknown key '{_dotted((*path, key))}'{hint}")


def _as_section(raw: Any, path: tuple, origins: _Origins) -> Mapping:
    if raw is None:
        return {}
    if not isinstance(raw, Mapping):
        raise origins.error(path, f"section '{_dotted(path)}' must be a mapping, got {show(raw)}")
    return raw


def _yaml_fields(cls: type) -> list[str]:
    return [f.name for f in dataclasses.fields(cls) if f.init and not f.metadata.get("sections")]


def _build_options(name: str, raw: Any, path: tuple, origins: _Origins) -> Any:
    """A method's ``Options`` from its section, with the same key and type rules."""
    options_cls = _method.get(name).Options
    known, kwargs = _yaml_fields(options_cls), {}
    for key, value in _as_section(raw, path, origins).items():
        if key not in known:
            raise _unknown_key(path, key, known, origins)
        try:
            kwargs[key] = coerce_field(key, value, hints(options_cls).get(key, Any))
        except FieldError as e:
            raise origins.error((*path, key), _dotted(path) + "." + str(e)) from None
    try:
        return options_cls(**kwargs)
    except (TypeError, ValueError) as e:
        raise origins.error(path, f"{_dotted(path)}: {e}") from None


def _build(cls: type, raw: Any, path: tuple, origins: _Origins) -> Any:
    """Construct section ``cls`` from a mapping, reporting errors with their full key."""
    known = _yaml_fields(cls)
    extra = _method.available() if cls is SparsityConfig else ()
    kwargs: dict[str, Any] = {}
    sections: dict[str, Any] = {}
    for key, value in _as_section(raw, path, origins).items():
        here = (*path, key)
        if key in known:
            tp = hints(cls).get(key)
            is_section = isinstance(tp, type) and issubclass(tp, Section)
            kwargs[key] = _build(tp, value, here, origins) if is_section else value
        elif key in extra:
            sections[key] = _build_options(key, value, here, origins)
        else:
            raise _unknown_key(path, key, [*known, *extra], origins)
    if sections:
        kwargs["options"] = sections
    try:
        return cls(**kwargs)
    except FieldError as e:
        raise origins.error((*path, e.key), _dotted((*path, e.key)) + e.detail) from None


def _resolve(raw: dict, origins: _Origins, overrides: Sequence[str]) -> Config:
    if isinstance(overrides, str):
        raise TypeError("overrides is a sequence of 'key=value' strings; wrap the string in a list")
    for text in overrides:
        _apply_override(raw, origins, text)
    return _build(Config, raw, (), origins)


def load_config(path: str | os.PathLike, overrides: Sequence[str] = ()) -> Config:
    """Load a YAML config file, its ``base:`` chain and ``--set`` overrides.

    Args:
        path: the YAML file, or the name of a shipped config (``rigl_ham``; see
            :func:`shipped_configs`). ``base: other.yaml`` at its top level (relative to the
            file) starts from that file; mappings merge deeply, this file wins and lists are
            replaced.
        overrides: ``"key=value"`` strings (see :func:`parse_override`), applied in order.

    Returns:
        The validated :class:`Config`.

    Raises:
        ConfigError: one line naming the file or ``--set``, the key, the value and the fix.
    """
    path = resolve_config(path)
    origins = _Origins(str(path))
    return _resolve(_load_file(path, (), origins), origins, overrides)


def config_from_dict(
    data: Mapping, *, source: str = "<config>", overrides: Sequence[str] = ()
) -> Config:
    """Validate a config given as a mapping in the YAML layout (without ``base:``).

    Args:
        data: nested mapping, e.g. ``yaml.safe_load`` of a config file.
        source: the name used in error messages.
        overrides: ``"key=value"`` strings applied on top, as in :func:`load_config`.

    Returns:
        The validated :class:`Config`.

    Raises:
        ConfigError: one line naming ``source`` or ``--set``, the key, the value and the fix.
    """
    data = _top_level(data, source)
    if "base" in data:
        raise ConfigError(f"{source}: 'base' works only in a config file; use load_config(path)")
    origins = _Origins(source)
    raw: dict = {}
    _merge(raw, data, origins, source)
    return _resolve(raw, origins, overrides)


def _plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        out = {}
        for f in dataclasses.fields(value):
            if f.metadata.get("sections"):
                out.update({name: _plain(opts) for name, opts in getattr(value, f.name).items()})
            elif f.init:
                out[f.name] = _plain(getattr(value, f.name))
        return out
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    if isinstance(value, Mapping):
        return {key: _plain(item) for key, item in value.items()}
    return value


def config_to_dict(cfg: Config) -> dict:
    """The config as plain YAML-able data in the file layout; ``config_from_dict`` inverts it."""
    return _plain(cfg)


def dump_config(cfg: Config) -> str:
    """The config as YAML text (what a run directory's ``config.yaml`` holds)."""
    return yaml.safe_dump(config_to_dict(cfg), sort_keys=False, default_flow_style=False)


def method_options(cfg: Config) -> dict[str, Any]:
    """The selected method's section as keyword arguments for its constructor."""
    opts = cfg.sparsity.options[cfg.sparsity.method]
    return {f.name: getattr(opts, f.name) for f in dataclasses.fields(opts) if f.init}
