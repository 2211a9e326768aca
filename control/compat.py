"""Import shim that makes ``import safety_gymnasium`` work on Python 3.11 + numpy 2.

Why: safety-gymnasium 1.0.0 declares dataclasses whose field defaults are numpy arrays
taken from ``safety_gymnasium.assets.color.COLOR`` (e.g. ``color: np.ndarray =
COLOR['goal']``). Since Python 3.11, ``dataclasses`` rejects any default whose class has
``__hash__ is None`` (``ValueError: mutable default <class 'numpy.ndarray'> ... use
default_factory``), and ``np.ndarray`` is unhashable. Upstream has not fixed it.

What: a ``sys.meta_path`` finder that intercepts only the module
``safety_gymnasium.assets.color``; after the real module has executed, every array in its
``COLOR`` dict is replaced by a view of class :class:`FrozenColor`, an ``ndarray`` subclass
that is read-only and hashable (by value). Dataclasses then accept it as a default, and it
behaves like the original array everywhere else. No installed file is edited.

``import control`` installs the hook (idempotent). If ``safety_gymnasium.assets.color`` was
already imported before the hook, :func:`install` patches the loaded module in place.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys
from types import ModuleType

import numpy as np

__all__ = ["FrozenColor", "install", "is_installed", "patch_color_module", "TARGET_MODULE"]

TARGET_MODULE = "safety_gymnasium.assets.color"


class FrozenColor(np.ndarray):
    """Read-only, hashable ndarray used for safety-gymnasium's colour constants."""

    def __hash__(self) -> int:  # dataclasses only checks that __hash__ is not None
        return hash((self.shape, self.tobytes()))


def _freeze(value):
    if isinstance(value, np.ndarray) and not isinstance(value, FrozenColor):
        frozen = np.array(value).view(FrozenColor)
        frozen.flags.writeable = False  # shared as a dataclass default: must not mutate
        return frozen
    return value


def patch_color_module(module: ModuleType) -> None:
    """Replace the arrays of ``module.COLOR`` by :class:`FrozenColor` views (in place)."""
    colors = getattr(module, "COLOR", None)
    if not isinstance(colors, dict):
        raise RuntimeError(
            f"{TARGET_MODULE} has no COLOR dict; this shim targets safety-gymnasium 1.0.0 "
            f"(found {type(colors).__name__})"
        )
    for key in list(colors):
        colors[key] = _freeze(colors[key])


class _PatchingLoader(importlib.abc.Loader):
    def __init__(self, wrapped: importlib.abc.Loader):
        self._wrapped = wrapped

    def create_module(self, spec):
        return self._wrapped.create_module(spec)

    def exec_module(self, module):
        self._wrapped.exec_module(module)
        patch_color_module(module)


class _ColorFinder(importlib.abc.MetaPathFinder):
    """Finds the real spec with the other finders, then wraps its loader."""

    def find_spec(self, fullname, path, target=None):
        if fullname != TARGET_MODULE:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None and spec.loader is not None:
                spec.loader = _PatchingLoader(spec.loader)
                return spec
        return None


def is_installed() -> bool:
    return any(isinstance(f, _ColorFinder) for f in sys.meta_path)


def install() -> None:
    """Install the hook once; also patches the colour module if it is already loaded."""
    if not is_installed():
        sys.meta_path.insert(0, _ColorFinder())
    loaded = sys.modules.get(TARGET_MODULE)
    if loaded is not None:
        patch_color_module(loaded)
