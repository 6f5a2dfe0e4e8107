"""The closed loop: every global adapter version a federation round produces is served under `<run>-latest`.

The first tests drive `fedllm.federation.publishing.publish.RouterPublisher` against the real router (in process, on loopback) in
front of a fake vLLM worker: retries, supersede, never blocking, and the alias moving to each new version. The last
ones run the real pieces end to end (coordinator rounds -> registry -> publisher -> router -> vLLM).
"""

from __future__ import annotations

import asyncio
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from fedllm.core.adapter_registry import AdapterVersion
from fedllm.core.contracts.router_client import latest_alias
from fedllm.federation.publishing.publish import RouterPublisher
from fedllm.testing.factories import free_port, make_settings
from tests.serve.conftest import FakeProcess, start_fake
from tests.ui.fakes import ServerThread


@dataclass
class LiveRouter:
    url: str
    admin_token: str
    worker: FakeProcess

    def chat(self, model: str) -> httpx.Response:
        return httpx.post(f"{self.url}/v1/chat/completions", json={"model": model, "messages": []}, timeout=10)

    def adapters(self) -> dict[str, list[str]]:
        rows = httpx.get(f"{self.url}/admin/adapters", headers={"Authorization": f"Bearer {self.admin_token}"}, timeout=10).json()
        return {a["name"]: a["aliases"] for a in rows}


@pytest.fixture
def router(tmp_path):
    """The real router (`serve.create_app`) served in a thread, in front of one fake vLLM worker."""
    from fedllm.serve import create_app

    worker = start_fake("base")
    settings = make_settings(tmp_path / "router-home", serve={"workers": [{"url": worker.url}], "health_interval_s": 0.5})
    app = create_app(settings)
    server = ServerThread(app).start()
    yield LiveRouter(server.url, app.state.admin_token, worker)
    server.stop()
    worker.stop()


def _version(tmp_path: Path, name: str, version: int) -> AdapterVersion:
    path = tmp_path / name / str(version)
    path.mkdir(parents=True)
    return AdapterVersion(name, version, path, {"round": version})


def _wait_for(condition, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.02)


def test_publish_loads_the_versioned_name_with_the_alias(router, tmp_path):
    # Arrange
    publisher = RouterPublisher(router.url, router.admin_token, initial_backoff_s=0.05)
    v1 = _version(tmp_path, "fed", 1)
    try:
        # Act
        publisher(v1)
        assert publisher.wait_published("fed-v1", timeout_s=10)
    finally:
        publisher.close()
    # Assert
    loads = [r for r in router.worker.received() if r["path"] == "/v1/load_lora_adapter"]
    assert [(r["model"], r["lora_path"]) for r in loads] == [("fed-v1", str(v1.path))]
    assert router.adapters() == {"fed-v1": ["fed-latest"]}
    assert router.chat("fed-latest").json()["model"] == "fed-v1"


def test_the_alias_answers_from_the_newest_version_each_round(router, tmp_path):
    # Before: the router answered 409 to round 2's publish and the publisher retried it for ever.
    publisher = RouterPublisher(router.url, router.admin_token, initial_backoff_s=0.05)
    answered = []
    try:
        for round_id in (1, 2, 3):
            publisher(_version(tmp_path, "fed", round_id))
            assert publisher.wait_published(f"fed-v{round_id}", timeout_s=10), publisher.status()
            answered.append(router.chat("fed-latest").json()["model"])
    finally:
        publisher.close()
    assert answered == ["fed-v1", "fed-v2", "fed-v3"]
    assert router.adapters() == {"fed-v1": [], "fed-v2": [], "fed-v3": ["fed-latest"]}


def test_failed_publish_is_retried_and_reported(router, tmp_path):
    router.worker.control(refuse_loads=True)
    publisher = RouterPublisher(router.url, router.admin_token, initial_backoff_s=0.05, max_backoff_s=0.1)
    try:
        publisher(_version(tmp_path, "fed", 1))
        # Two failures recorded (not merely two attempts begun: the second could still succeed once loads are allowed).
        _wait_for(lambda: len(publisher.status()["fed-v1"]["history"]) >= 2)
        router.worker.control(refuse_loads=False)
        assert publisher.wait_published("fed-v1", timeout_s=10)
        record = publisher.status()["fed-v1"]
    finally:
        publisher.close()
    assert record["attempts"] >= 3
    assert sum("HTTP 502" in h for h in record["history"]) >= 2
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


def test_close_lets_the_last_version_through(router, tmp_path):
    # The coordinator closes its publishers right after its last round: that round's version must still land.
    router.worker.control(refuse_loads=True)
    publisher = RouterPublisher(router.url, router.admin_token, initial_backoff_s=0.2)
    publisher(_version(tmp_path, "fed", 3))
    _wait_for(lambda: publisher.status()["fed-v3"]["attempts"] >= 1)
    threading.Timer(0.1, router.worker.control, kwargs={"refuse_loads": False}).start()
    publisher.close(timeout_s=10)
    assert publisher.status()["fed-v3"]["published"]
    assert "fed-v3" in router.adapters()


def test_newer_version_supersedes_one_still_retrying(router, tmp_path):
    router.worker.control(refuse_loads=True)  # v1 cannot get through
    publisher = RouterPublisher(router.url, router.admin_token, initial_backoff_s=0.5, max_backoff_s=1.0)
    try:
        publisher(_version(tmp_path, "fed", 1))
        _wait_for(lambda: len(publisher.status()["fed-v1"]["history"]) >= 2)  # two failures; now waiting to retry
        publisher(_version(tmp_path, "fed", 2))
        router.worker.control(refuse_loads=False)
        assert publisher.wait_published("fed-v2", timeout_s=10)
        status = publisher.status()
    finally:
        publisher.close()
    assert status["fed-v1"]["superseded"] and not status["fed-v1"]["published"]
    assert router.adapters() == {"fed-v2": [latest_alias("fed")]}


CHAT_ROWS = [{"messages": [{"role": "user", "content": f"Which ticket queue handles case {i}?"},
                           {"role": "assistant", "content": f"Case {i} goes to the billing queue."}]} for i in range(8)]


class _Checker:
    """After each round's version is published, chats as `loop-latest` through the router and records which adapter
    answered; the silo's next round waits for it (so each round's answer is seen before the next round can publish)."""

    def __init__(self, router_url: str, publisher: RouterPublisher, rounds: int):
        self.router_url, self.publisher, self.rounds = router_url, publisher, rounds
        self.answered: list[str] = []
        self.checked = [threading.Event() for _ in range(rounds + 1)]
        self.checked[0].set()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        for n in range(1, self.rounds + 1):
            if not self.publisher.wait_published(f"loop-v{n}", 300.0):
                self.answered.append(f"round {n} not published: {self.publisher.status()}")
                return
            answer = httpx.post(f"{self.router_url}/v1/chat/completions", timeout=120, json={
                "model": "loop-latest", "max_tokens": 8, "temperature": 0,
                "messages": [{"role": "user", "content": "Which ticket queue handles case 3?"}]})
            self.answered.append(answer.json()["model"] if answer.status_code == 200 else f"HTTP {answer.status_code}: {answer.text}")
            self.checked[n].set()


@pytest.mark.vllm
async def test_federation_latest_answers_from_the_newest_round_every_round(vllm_worker, embedded_model_dir, tmp_path):
    """Three federation rounds (one silo, one local step each on the embedded model) -> registry -> publisher -> the
    real router -> a real vLLM worker: after each round, `loop-latest` answers from that round's adapter."""
    from fedllm import train
    from fedllm.federation.runtime.coordinator import Coordinator
    from fedllm.federation.runtime.silo import EngineTrainer, SiloClient
    from fedllm.federation.aggregation.strategies import make_strategy
    from tests.ui.services import start_router

    rounds = 3
    admin_token = "closed-loop-admin-token-0123456789"
    router = start_router(tmp_path / "router-home", [vllm_worker.spec], admin_token)
    train_cfg = {"lora_r": 8, "lora_alpha": 16, "max_seq_len": 128, "batch_size": 2, "zero_stage": 0, "warmup_steps": 0}
    fed = {"bind_host": "127.0.0.1", "port": 0, "status_port": 0, "plaintext": True, "rounds": rounds, "min_silos": 1,
           "round_deadline_s": 600.0, "heartbeat_interval_s": 0.5, "local_steps": 1, "compression": "fp32",
           "run_name": "loop", "start_timeout_s": 60.0}
    settings = make_settings(tmp_path / "coord", federation=fed, train=train_cfg)
    publisher = RouterPublisher(router.url, admin_token, initial_backoff_s=0.2)
    checker = _Checker(router.url, publisher, rounds)

    class GatedTrainer(EngineTrainer):
        """Trains round N only once round N-1's answer was checked."""

        fits = 0

        def fit(self, steps, config):
            assert checker.checked[self.fits].wait(300), f"round {self.fits} was never checked"
            self.fits += 1
            return super().fit(steps, config)

    coordinator = Coordinator(
        settings, make_strategy("fedavg"),
        initial_state=train.initial_adapter_state(settings.train, embedded_model_dir),
        exporter=lambda state, out: train.save_adapter_dir(state, settings.train, embedded_model_dir, out),
        on_publish=[publisher],
    )
    silo = None
    try:
        checker.thread.start()
        address = await coordinator.start()
        silo_settings = make_settings(tmp_path / "silo", train=train_cfg,
                                      federation={"coordinator": address, "silo_id": "s1", "plaintext": True,
                                                  "heartbeat_interval_s": 0.5})
        silo = SiloClient(silo_settings, GatedTrainer(silo_settings.train, embedded_model_dir, CHAT_ROWS))
        await silo.start()
        await coordinator.wait_done(timeout_s=900)
        await asyncio.to_thread(checker.thread.join, 300)

        # No manual step: each round's version was published by the coordinator's callback, and the alias moved.
        assert checker.answered == ["loop-v1", "loop-v2", "loop-v3"], publisher.status()
        async with httpx.AsyncClient(base_url=router.url, timeout=10) as c:
            rows = (await c.get("/admin/adapters", headers={"Authorization": f"Bearer {admin_token}"})).json()
        assert {a["name"]: a["aliases"] for a in rows} == {"loop-v1": [], "loop-v2": [], "loop-v3": ["loop-latest"]}
    finally:
        publisher.close()
        if silo is not None:
            await silo.stop()
        await coordinator.stop()
        for n in range(1, rounds + 1):  # leave the session's vLLM workers as they were
            httpx.delete(f"{router.url}/admin/adapters/loop-v{n}", headers={"Authorization": f"Bearer {admin_token}"}, timeout=60)
        router.stop()


def test_the_publisher_sends_the_runs_serve_regions(tmp_path):
    """`federation.serve_regions` travels as `regions` in each publish (the router places and routes by it)."""
    from fedllm.federation.runtime.service import router_publisher
    from tests.ui.fakes import FakeRouter

    fake = FakeRouter(admin_token="regions-admin-token-0123456789").start()
    try:
        settings = make_settings(tmp_path / "home", serve={"port": int(fake.url.rsplit(":", 1)[1]),
                                                           "admin_token": "regions-admin-token-0123456789"},
                                 federation={"serve_regions": ["eu-west"], "gate": False})
        publisher = router_publisher(settings)
        try:
            publisher(_version(tmp_path, "fed", 1))
            assert publisher.wait_published("fed-v1", timeout_s=10), publisher.status()
        finally:
            publisher.close()
    finally:
        fake.stop()
    assert [(c["name"], c.get("regions")) for c in fake.state.publish_calls] == [("fed-v1", ["eu-west"])]
