"""The closed loop: every global adapter version a federation round produces is served under `<run>-latest`.

The first tests drive `federation.publish.RouterPublisher` against a fake router on loopback (retries, supersede,
never blocking). The last one runs the real pieces end to end (coordinator round -> registry -> router -> vLLM) and
is skipped until the coordinator, the router and the `vllm_worker` fixture all exist.
"""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import pytest

from appliance.core.adapter_registry import AdapterVersion
from federation.publish import RouterPublisher, latest_alias
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
        publisher.close()
    assert returned_after < 1.0, "the on_publish callback must only queue the version"
    assert record["attempts"] >= 2 and "unreachable" in record["last_error"]


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


def _closed_loop_pieces_missing() -> str | None:
    import importlib.util

    for mod in ("federation.coordinator", "serve.app"):
        if importlib.util.find_spec(mod) is None:
            return f"{mod} does not exist yet"
    return None


@pytest.mark.vllm
@pytest.mark.skipif(_closed_loop_pieces_missing() is not None, reason=str(_closed_loop_pieces_missing()))
def test_round_output_answers_under_alias_through_router(request, tmp_path):
    pytest.skip("end-to-end loop wired once the coordinator and router land")
