"""The CLI around the router: keys, fleet, adapters publish/list/unpublish (against a running router)."""

from __future__ import annotations

import asyncio
import json

from typer.testing import CliRunner

from fedllm.appliance.cli import app
from fedllm.core.adapter_registry import AdapterRegistry


def _invoke(home, *args: str):
    return CliRunner().invoke(app, ["--home", str(home), *args])


def test_keys_create_prints_once_and_stores_hash(tmp_path):
    result = _invoke(tmp_path, "keys", "create", "--name", "team-a", "--rpm", "600", "--tpm", "200000")
    assert result.exit_code == 0, result.output
    key = result.stdout.strip().splitlines()[0]
    assert key.startswith("sk-fedllm-")
    stored = (tmp_path / "keys" / "api_keys.json").read_text()
    assert key not in stored and json.loads(stored)["keys"][0]["rpm"] == 600
    again = _invoke(tmp_path, "keys", "create", "--name", "team-a")
    assert again.exit_code == 2 and "exists already" in again.output
    listed = _invoke(tmp_path, "keys", "list")
    assert "team-a" in listed.output and key not in listed.output


async def test_fleet_and_adapters_commands(fake_factory, router_factory, tmp_path):
    home = tmp_path / "cli-home"
    src = tmp_path / "src"
    src.mkdir()
    (src / "adapter_config.json").write_text("{}")
    (src / "adapter_model.safetensors").write_bytes(b"")
    version = AdapterRegistry(home / "adapters").register("legal", src, {})
    fake = fake_factory("base")
    router = await router_factory([fake], home=home)

    fleet = await asyncio.to_thread(_invoke, home, "fleet", "--router", router.url)
    (worker_id,) = router.app.state.registry.workers
    assert fleet.exit_code == 0, fleet.output
    assert worker_id in fleet.output and "base" in fleet.output

    published = await asyncio.to_thread(_invoke, home, "adapters", "publish", "legal", "--router", router.url)
    assert published.exit_code == 0, published.output
    assert "legal-v1" in published.output
    loads = [r for r in fake.received() if r["path"] == "/v1/load_lora_adapter"]
    assert loads == [{"path": "/v1/load_lora_adapter", "model": "legal-v1", "lora_path": str(version.path)}]

    listed = await asyncio.to_thread(_invoke, home, "adapters", "list", "--router", router.url)
    assert "legal:1" in listed.output and f"published on {worker_id}" in listed.output
    gone = await asyncio.to_thread(_invoke, home, "adapters", "unpublish", "legal-v1", "--router", router.url)
    assert gone.exit_code == 0, gone.output

    down = await asyncio.to_thread(_invoke, home, "fleet", "--router", "http://127.0.0.1:9")
    assert down.exit_code == 1 and "not reachable" in down.output


def test_serve_refuses_public_bind_without_keys(tmp_path):
    result = _invoke(tmp_path, "serve", "--host", "0.0.0.0", "--port", "0")
    assert result.exit_code == 2 and "refusing to listen on 0.0.0.0" in result.output
    assert "router on" not in result.output
