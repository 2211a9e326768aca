"""The recipes' defaults: one YAML file per recipe in ``llm_safepref/recipes/configs/`` (package data).

These files are the only copy of the defaults: the recipe's parser takes them as its defaults
(``llm_safepref.recipes.arguments``), ``--config my.yaml`` and flags go on top. Reading them
imports nothing heavy (no torch, no TRL).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

__all__ = ["CONFIG_DIR", "config_path", "load_defaults", "recipe_names"]

#: The recipes' defaults files.
CONFIG_DIR = Path(__file__).resolve().parent / "configs"


def recipe_names() -> list[str]:
    return sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))


def config_path(name: str) -> Path:
    """``llm_safepref/recipes/configs/<name>.yaml``; a clear error naming the ones that exist."""
    path = CONFIG_DIR / f"{name}.yaml"
    if not path.is_file():
        raise FileNotFoundError(f"no recipe defaults {path}; known: {recipe_names()}")
    return path


def load_defaults(name: str) -> dict[str, Any]:
    """The defaults of recipe ``name`` as a flat mapping (flag name -> value)."""
    import yaml

    path = config_path(name)
    with open(path) as f:
        values = yaml.safe_load(f)
    if not isinstance(values, dict):
        raise ValueError(f"{path}: expected a YAML mapping of flag names to values")
    return values
