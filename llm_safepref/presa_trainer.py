"""Compatibility path: the PRESA trainer lives in :mod:`llm_safepref.methods.presa.trainer`
(on the shared base :mod:`llm_safepref.methods.base`)."""

from llm_safepref.methods.base.callback import LagrangeCallback
from llm_safepref.methods.base.trainer import LAGRANGE_FILE, LabelledPreferenceTrainer
from llm_safepref.methods.presa.config import PresaConfig
from llm_safepref.methods.presa.trainer import PresaDataCollator, PresaTrainer

__all__ = ["LAGRANGE_FILE", "LabelledPreferenceTrainer", "LagrangeCallback", "PresaConfig", "PresaDataCollator",
           "PresaTrainer"]
