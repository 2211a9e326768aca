"""control/: the safe-RL continuous-control side of llm_safepref.

Design decisions:

- Runs from the repository root (``python -m control ...``); it is deliberately not
  installed into site-packages, where a top-level ``control`` would shadow python-control.
- Importing it installs the safety-gymnasium compatibility shim (see ``control.compat``).
  Submodules are imported on demand, so ``import control`` stays cheap.
- Of ``llm_safepref`` it uses only ``llm_safepref.core`` (losses, multiplier, latent math,
  run records, cache root, CLI convention); ``tests/control/test_boundary.py`` checks it.
"""

from __future__ import annotations

from control.compat import install as _install_compat
from llm_safepref.core.provenance import current_command, redact_command

_install_compat()

__all__ = ["collection", "compat", "tasks", "data", "feedback", "evaluation", "gaits", "objectives", "policies",
           "segment_report", "tool_command"]


def tool_command(module: str, argv: list[str] | None = None) -> str:
    """The command line of a ``python -m <module>`` tool, redacted, for its run record.

    ``argv=None``: this process's own command line; else ``python -m <module> <argv...>``
    (a tool's ``main(argv)`` called in-process knows its arguments, not ``sys.argv``).
    """
    if argv is None:
        return current_command()
    return redact_command(["python", "-m", module, *argv])
