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

It also holds :func:`original_std_streams`, used when building Bullet Safety Gym envs,
whose pybullet-silencing code breaks when ``sys.stdout``/``sys.stderr`` are replaced.

``import control`` installs the hook (idempotent). If ``safety_gymnasium.assets.color`` was
already imported before the hook, :func:`install` patches the loaded module in place.
"""

from __future__ import annotations

import contextlib
import importlib.abc
import importlib.machinery
import sys
from types import ModuleType

import numpy as np

__all__ = ["FrozenColor", "install", "is_installed", "patch_color_module", "import_bullet_safety_gym",
           "original_std_streams", "TARGET_MODULE"]

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


@contextlib.contextmanager
def original_std_streams():
    """Temporarily point ``sys.stdout``/``sys.stderr`` at the interpreter's original streams.

    Bullet Safety Gym silences pybullet by redirecting ``sys.stdout``/``sys.stderr`` (at
    builder import and at every env construction) and then looks the stream's *name* up as
    a libc symbol. When a stream has been replaced (pytest's capture, notebooks), its name is
    not a libc symbol and Bullet raises ``ValueError: undefined symbol``. Use this around
    Bullet env construction; output still reaches the same file descriptors.
    """
    saved = sys.stdout, sys.stderr
    try:
        if getattr(sys.stdout, "name", None) != "<stdout>" and sys.__stdout__ is not None:
            sys.stdout = sys.__stdout__
        if getattr(sys.stderr, "name", None) != "<stderr>" and sys.__stderr__ is not None:
            sys.stderr = sys.__stderr__
        yield
    finally:
        sys.stdout, sys.stderr = saved


def import_bullet_safety_gym():
    """Import bullet_safety_gym and its env builder (see :func:`original_std_streams`)."""
    import importlib

    import bullet_safety_gym

    if "bullet_safety_gym.envs.builder" not in sys.modules:
        with original_std_streams():
            importlib.import_module("bullet_safety_gym.envs.builder")
    return bullet_safety_gym
