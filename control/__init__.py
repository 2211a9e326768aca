"""control/: the safe-RL continuous-control side of llm_safepref.

Runs from the repository root (``python -m control ...``); it is deliberately not
installed into site-packages, where a top-level ``control`` would shadow python-control.
Importing it installs the safety-gymnasium compatibility shim (see ``control.compat``).
Submodules are imported lazily so ``import control`` stays cheap.
"""

from control.compat import install as _install_compat

_install_compat()

__all__ = ["compat", "tasks", "data", "feedback", "evaluation", "policies"]
