"""The configs shipped with the package (``configs/`` in the repository, ``sparseham.configs`` when
installed), found by name: ``rigl_ham``, ``paper/imagenet_rigl_ham``, ``studies/tune``."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

__all__ = ["resolve_config", "shipped_configs", "shipped_dir"]


def shipped_dir() -> Path:
    """The folder that holds the shipped configs."""
    spec = importlib.util.find_spec("sparseham.configs")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the shipped configs (sparseham.configs) are not installed")
    return Path(next(iter(spec.submodule_search_locations)))


def shipped_configs() -> list[str]:
    """Names of the shipped configs, sorted; files starting with ``_`` are bases, not listed."""
    root = shipped_dir()
    return sorted(
        p.relative_to(root).with_suffix("").as_posix()
        for p in root.rglob("*.yaml")
        if not any(part.startswith("_") for part in p.relative_to(root).parts)
    )


def resolve_config(name: str | os.PathLike) -> Path:
    """``name`` itself when it is a file, else the shipped config of that name, else ``name``.

    A path that exists always wins, so a user's ``rigl_ham.yaml`` in the working directory is
    used over the shipped one of the same name.
    """
    path = Path(name)
    if path.is_file():
        return path
    try:
        root = shipped_dir()
    except FileNotFoundError:
        return path
    for candidate in (root / path, root / path.with_name(path.name + ".yaml")):
        if candidate.is_file() and candidate.resolve().is_relative_to(root.resolve()):
            return candidate
    return path
