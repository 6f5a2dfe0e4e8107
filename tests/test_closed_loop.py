"""The closed loop: every global adapter version a federation round produces is served under `<run>-latest`.

The first tests drive `federation.publish.RouterPublisher` against a fake router on loopback (retries, supersede,
never blocking). The last one runs the real pieces end to end (coordinator round -> registry -> router -> vLLM) and
is skipped until the coordinator, the router and the `vllm_worker` fixture all exist.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import httpx
import pytest

from appliance.core.adapter_registry import AdapterVersion
from appliance.core.router_client import latest_alias
from federation.publish import RouterPublisher
from tests.factories import free_port
from tests.ui.fakes import FakeRouter


@pytest.fixture
def fake_router():
    router = FakeRouter().start()
    yield router
    router.stop()


def _version(tmp_path: Path, name: str, version: int) -> AdapterVersion:
    path = tmp_path / name / str(version)
    path.mkdir(parents=True)
    return AdapterVersion(name, version, path, {"round": version})


def test_publish_posts_versioned_name_and_alias(fake_router, tmp_path):
    # Arrange
    publisher = RouterPublisher(fake_router.url, fake_router.state.admin_token, initial_backoff_s=0.05)
    v1 = _version(tmp_path, "fed", 1)
    try:
        # Act
        publisher(v1)
        assert publisher.wait_published("fed-v1", timeout_s=10)
    finally:
        publisher.close()
    # Assert
    assert fake_router.state.publish_calls == [{"name": "fed-v1", "path": str(v1.path), "aliases": ["fed-latest"]}]
    models = httpx.get(f"{fake_router.url}/v1/models").json()["data"]
    assert {"fed-v1", "fed-latest"} <= {m["id"] for m in models}


def test_failed_publish_is_retried_and_reported(fake_router, tmp_path):
    fake_router.state.fail_publish = 2
    publisher = RouterPublisher(fake_router.url, fake_router.state.admin_token, initial_backoff_s=0.05)
    try:
        publisher(_version(tmp_path, "fed", 1))
        assert publisher.wait_published("fed-v1", timeout_s=10)
        record = publisher.status()["fed-v1"]
    finally:
        publisher.close()
    assert record["attempts"] == 3
    assert sum("HTTP 503" in h for h in record["history"]) == 2
    assert record["last_error"] is None


def test_callback_never_blocks_when_router_is_down(tmp_path):
    port = free_port()  # nothing listens here
    publisher = RouterPublisher(f"http://127.0.0.1:{port}", "tok", initial_backoff_s=0.05, max_backoff_s=0.1)
    try:
        started = time.monotonic()
        publisher(_version(tmp_path, "fed", 1))
        returned_after = time.monotonic() - started
        assert not publisher.wait_published("fed-v1", timeout_s=1.0)
        record = publisher.status()["fed-v1"]
    finally:
        publisher.close(timeout_s=0.5)
    assert returned_after < 1.0, "the on_publish callback must only queue the version"
    assert record["attempts"] >= 2 and "not reachable" in record["last_error"]


def test_close_lets_the_last_version_through(fake_router, tmp_path):
    # The coordinator closes its publishers right after its last round: that round's version must still land.
    fake_router.state.fail_publish = 1
    publisher = RouterPublisher(fake_router.url, fake_router.state.admin_token, initial_backoff_s=0.2)
    publisher(_version(tmp_path, "fed", 3))
    publisher.close(timeout_s=10)
    assert publisher.status()["fed-v3"]["published"]
    assert "fed-v3" in fake_router.state.adapters


def test_newer_version_supersedes_one_still_retrying(fake_router, tmp_path):
    fake_router.state.reject_names.add("fed-v1")  # v1 cannot get through
    publisher = RouterPublisher(fake_router.url, fake_router.state.admin_token, initial_backoff_s=0.05, max_backoff_s=0.1)
    try:
        publisher(_version(tmp_path, "fed", 1))
        deadline = time.monotonic() + 10
        while publisher.status()["fed-v1"]["attempts"] < 2 and time.monotonic() < deadline:
            time.sleep(0.02)
        publisher(_version(tmp_path, "fed", 2))
        assert publisher.wait_published("fed-v2", timeout_s=10)
        status = publisher.status()
    finally:
        publisher.close()
    assert status["fed-v1"]["superseded"] and not status["fed-v1"]["published"]
    assert fake_router.state.adapters["fed-v2"]["aliases"] == [latest_alias("fed")]


CHAT_ROWS = [{"messages": [{"role": "user", "content": f"Which ticket queue handles case {i}?"},
                           {"role": "assistant", "content": f"Case {i} goes to the billing queue."}]} for i in range(8)]


@pytest.mark.vllm
async def test_round_output_answers_under_alias_through_router(vllm_worker, embedded_model_dir, tmp_path):
    """One federation round (one silo, one step on the embedded model) -> registry -> publisher -> router -> vLLM."""
    import train
    from federation.coordinator import Coordinator
    from federation.silo import EngineTrainer, SiloClient
    from federation.strategies import make_strategy
    from tests.factories import make_settings
    from tests.ui.services import start_router

    admin_token = "closed-loop-admin-token-0123456789"
    router = start_router(tmp_path / "router-home", [vllm_worker.spec], admin_token)
    train_cfg = {"lora_r": 8, "lora_alpha": 16, "max_seq_len": 128, "batch_size": 2, "zero_stage": 0, "warmup_steps": 0}
    fed = {"bind_host": "127.0.0.1", "port": 0, "status_port": 0, "plaintext": True, "rounds": 1, "min_silos": 1,
           "round_deadline_s": 300.0, "heartbeat_interval_s": 0.5, "local_steps": 1, "compression": "fp32",
           "run_name": "loop", "start_timeout_s": 60.0}
    settings = make_settings(tmp_path / "coord", federation=fed, train=train_cfg)
    publisher = RouterPublisher(router.url, admin_token, initial_backoff_s=0.2)
    coordinator = Coordinator(
        settings, make_strategy("fedavg"),
        initial_state=train.initial_adapter_state(settings.train, embedded_model_dir),
        exporter=lambda state, out: train.save_adapter_dir(state, settings.train, embedded_model_dir, out),
        on_publish=[publisher],
    )
    silo = None
    try:
        address = await coordinator.start()
        silo_settings = make_settings(tmp_path / "silo", train=train_cfg,
                                      federation={"coordinator": address, "silo_id": "s1", "plaintext": True,
                                                  "heartbeat_interval_s": 0.5})
        silo = SiloClient(silo_settings, EngineTrainer(silo_settings.train, embedded_model_dir, CHAT_ROWS))
        await silo.start()
        await coordinator.wait_done(timeout_s=300)

        # No manual step from here: the coordinator's callback published the round's version.
        assert await asyncio.to_thread(publisher.wait_published, "loop-v1", 180.0), publisher.status()
        models = httpx.get(f"{router.url}/v1/models", timeout=10).json()["data"]
        assert "loop-latest" in {m["id"] for m in models}
        answer = httpx.post(f"{router.url}/v1/chat/completions", timeout=120, json={
            "model": "loop-latest", "max_tokens": 8, "temperature": 0,
            "messages": [{"role": "user", "content": "Which ticket queue handles case 3?"}]})
        assert answer.status_code == 200, answer.text
        assert answer.json()["choices"][0]["message"]["content"].strip()
    finally:
        publisher.close()
        if silo is not None:
            await silo.stop()
        await coordinator.stop()
        router.stop()
