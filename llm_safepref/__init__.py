"""llm_safepref: align language models to be safe from preferences and safety labels.

Submodules are imported lazily so ``import llm_safepref`` stays cheap:
``llm_safepref.losses`` (the shared loss core), ``llm_safepref.models`` (embedded and
tiny models), and the trainers, data and evaluation packages.
"""

__version__ = "0.1.0"
