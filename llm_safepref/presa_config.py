"""Compatibility path: ``PresaConfig`` lives in :mod:`llm_safepref.methods.presa.config`."""

from llm_safepref.methods.presa.config import PresaConfig

__all__ = ["PresaConfig"]
