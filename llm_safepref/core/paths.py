"""The toolkit's one cache root, used by the model conversion, the benchmark and ``control/``."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["cache_root", "CACHE_ENV"]

#: Environment variable that moves the cache.
CACHE_ENV = "LLM_SAFEPREF_CACHE"


def cache_root() -> Path:
    """``$LLM_SAFEPREF_CACHE``, else ``$XDG_CACHE_HOME/llm_safepref``, else ``~/.cache/llm_safepref``."""
    explicit = os.environ.get(CACHE_ENV)
    if explicit:
        return Path(explicit).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "llm_safepref"
