"""Health probes against real fake-backend processes: what one probe may and may not conclude.

On 6d47ea8 a worker measured slow once kept its stale latency for good (once the policy prefers others, no request
measures it again), and one periodic probe that timed out took a worker out of service at once."""

from __future__ import annotations

import asyncio
import time

import aiohttp
import httpx
import pytest

from fedllm.serve.registry import Worker, WorkerRegistry, upstream_headers
from fedllm.testing.factories import make_settings

CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}


async def test_probes_refresh_a_stale_latency_but_one_slow_answer_leaves_the_distance(fake_factory, router_factory):
    # Arrange: a worker whose next answer is 0.4 s late
    slow = fake_factory("m")
    router = await router_factory([slow], policy="score", health_interval_s=0.1)
    async with httpx.AsyncClient(base_url=router.url, timeout=30) as client:

        async def row() -> dict:
            return (await client.get("/admin/workers", headers=router.admin_headers())).json()[0]

        while (await row())["distance_ms"] is None:  # probed at least once
            await asyncio.sleep(0.05)
        slow.control(first_byte_delay_s=0.4)
        # Act: one slow answer
        assert (await client.post("/v1/chat/completions", json=CHAT)).status_code == 200
        slow.control(first_byte_delay_s=0.0)
        after = await row()
        # Assert: the latency EWMA learnt it; its distance (shortest recent round trip) did not move
        assert after["latency_ms"] >= 300 and after["distance_ms"] < 100, after
        # no request measures it again: the probes' round trips bring the stale estimate down
        deadline = time.monotonic() + 30
        while (await row())["latency_ms"] >= 100 and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        assert (await row())["latency_ms"] < 100


@pytest.fixture
async def probed(fake_factory, tmp_path):
    """(fake worker, registry, its Worker), probed healthy once; the registry's session is closed after."""
    fake = fake_factory("m")
    async with aiohttp.ClientSession() as session:
        registry = WorkerRegistry(make_settings(tmp_path, serve={"health_interval_s": 0.5}).serve, session)
        worker = registry.add_static(fake.url, models=["m"])
        assert await registry.probe(worker)
        yield fake, registry, worker


async def test_one_probe_timeout_alone_keeps_a_worker_in_service_and_a_second_takes_it_out(probed):
    # Arrange: a healthy worker whose /health then answers later than the probe waits (2 s)
    fake, registry, worker = probed
    fake.control(health_delay_s=3.0)
    # Act / Assert: one periodic probe times out: the worker stays in service
    assert await registry.probe(worker)
    assert worker.healthy and worker.probe_timeouts == 1
    # a second in a row confirms it: out of service
    assert not await registry.probe(worker)
    assert not worker.healthy
    # it answers in time again: back in service, the count reset
    fake.control(health_delay_s=0.0)
    assert await registry.probe(worker)
    assert worker.healthy and worker.probe_timeouts == 0


async def test_a_probe_timeout_after_a_forwarding_failure_takes_the_worker_out_at_once(probed):
    fake, registry, worker = probed
    fake.control(health_delay_s=3.0)
    assert not await registry.probe(worker, suspect=True)  # what probe_soon runs after a failed request
    assert not worker.healthy


async def test_a_refused_connection_takes_the_worker_out_at_once(probed):
    fake, registry, worker = probed
    fake.stop()
    assert not await registry.probe(worker)
    assert not worker.healthy and worker.probe_timeouts == 0


def test_probe_round_trips_refresh_only_an_estimate_no_request_refreshed():
    worker = Worker("w-1", "http://127.0.0.1:1", "local", 16, headers=upstream_headers(None))
    worker.observe_probe(1.0)
    assert worker.ttft_ms == 0.0  # never measured: stays unmeasured (the policy treats that specially)
    worker.observe_ttft(400.0)
    worker.observe_probe(1.0)
    assert worker.ttft_ms == 400.0  # a request measured it since the last probe: requests rule
    worker.observe_probe(1.0)
    assert worker.ttft_ms < 400.0  # no request since: the probe's round trip pulls the stale estimate down
