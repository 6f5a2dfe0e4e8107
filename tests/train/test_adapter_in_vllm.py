"""Integration: a short run on the embedded SmolLM2 gives an adapter that a real vLLM worker loads and answers with."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest

from tests.train.conftest import arithmetic_records, small_cfg


@pytest.mark.vllm
def test_trained_adapter_loads_into_vllm_at_run_time(embedded_model_dir: Path, vllm_worker, tmp_path: Path) -> None:
    import httpx

    from fedllm.train import fit_adapter, save_adapter_dir

    cfg = small_cfg(lr=1e-3, batch_size=2, lora_r=8, zero_stage=2)
    result = fit_adapter(cfg, embedded_model_dir, arithmetic_records(8), max_steps=2)
    adapter_dir = save_adapter_dir(result.state, cfg, embedded_model_dir, tmp_path / "adapter")
    name = f"train-test-{uuid.uuid4().hex[:8]}"

    auth = {"Authorization": f"Bearer {vllm_worker.api_key}"}  # the fixture's workers guard /v1 with their own key
    with httpx.Client(base_url=vllm_worker.url, timeout=120, headers=auth) as client:
        loaded = client.post("/v1/load_lora_adapter", json={"lora_name": name, "lora_path": str(adapter_dir)})
        assert loaded.status_code == 200, loaded.text
        assert name in [m["id"] for m in client.get("/v1/models").json()["data"]]
        reply = client.post("/v1/chat/completions", json={
            "model": name, "messages": [{"role": "user", "content": "What is 3 plus 3?"}], "max_tokens": 12, "temperature": 0,
        })
        assert reply.status_code == 200, reply.text
        assert reply.json()["model"] == name and reply.json()["choices"][0]["message"]["content"].strip()
        client.post("/v1/unload_lora_adapter", json={"lora_name": name})
