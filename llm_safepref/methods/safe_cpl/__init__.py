"""Safe-CPL stage 1 (Lin & Brown, ICML 2026): a policy conditioned on a latent user variable z.

``config.py``: :class:`SafeCPLConfig`; ``trainer.py``: :class:`SafeCPLTrainer` (on
:class:`~llm_safepref.methods.presa.PresaTrainer` and the shared base); ``model.py``: the
:class:`LatentConditioner` (encoder, prior, soft-prompt projection) and the per-example noise;
``embeddings.py``: the frozen, cached context embedder; ``data.py``: context sets;
``artifact.py``: save / load / publish the one-folder artefact; ``generate.py``:
:class:`SafeCPLPolicy` (generation with a z, a context set, a user, or the prior mean);
``python -m llm_safepref.methods.safe_cpl generate``. Docs: ``docs/safe_cpl.md``.

The flow a recipe follows::

    train = load_crowd_dataset("embedded", split="train", context_size=(2, 8))
    trainer = SafeCPLTrainer(model, args=SafeCPLConfig(...), train_dataset=train,
                             processing_class=tokenizer, peft_config=LoraConfig(...))
    trainer.train()
    folder = trainer.save_artifact("outputs/safe_cpl")
    policy = SafeCPLPolicy.from_pretrained(folder)
    policy.generate(["..."], z=z)            # or context=pairs, user="concise", or nothing

Names load on first use (importing this package imports neither trl nor transformers).
"""

from __future__ import annotations

from llm_safepref._runtime import lazy_exports

_LAZY = {
    "SafeCPLConfig": "llm_safepref.methods.safe_cpl.config",
    "SafeCPLTrainer": "llm_safepref.methods.safe_cpl.trainer",
    "SafeCPLCollator": "llm_safepref.methods.safe_cpl.trainer",
    "LatentConditioner": "llm_safepref.methods.safe_cpl.model",
    "ConditionerConfig": "llm_safepref.methods.safe_cpl.model",
    "CONDITIONER_NAME": "llm_safepref.methods.safe_cpl.model",
    "conditioner_of": "llm_safepref.methods.safe_cpl.model",
    "example_noise": "llm_safepref.methods.safe_cpl.model",
    "example_noise_seed": "llm_safepref.methods.safe_cpl.model",
    "ContextEmbedder": "llm_safepref.methods.safe_cpl.embeddings",
    "EmbeddingCache": "llm_safepref.methods.safe_cpl.embeddings",
    "SafeCPLDataError": "llm_safepref.methods.safe_cpl.data",
    "prepare_context_dataset": "llm_safepref.methods.safe_cpl.data",
    "SafeCPLPolicy": "llm_safepref.methods.safe_cpl.generate",
    "load_policy_model": "llm_safepref.methods.safe_cpl.artifact",
    "publish_artifact": "llm_safepref.methods.safe_cpl.artifact",
    "save_artifact": "llm_safepref.methods.safe_cpl.artifact",
}

__all__ = list(_LAZY)
__getattr__, __dir__ = lazy_exports(__name__, _LAZY, globals())
