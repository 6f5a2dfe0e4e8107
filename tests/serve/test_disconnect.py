"""A client that disconnects while its request waits on a worker aborts the upstream request (streamed or not)."""

from __future__ import annotations

import asyncio
import json
from urllib.parse import urlsplit

import httpx
import pytest


async def _send_and_leave(router_url: str, fake, stream: bool) -> None:
    """Send one completion on a raw socket, wait until the worker has it, then close the socket unanswered."""
    body = json.dumps({"model": "m", "messages": [{"role": "user", "content": "secret prompt"}], "stream": stream}).encode()
    url = urlsplit(router_url)
    reader, writer = await asyncio.open_connection(url.hostname, url.port)
    writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
                 b"content-length: %d\r\n\r\n%s" % (len(body), body))
    await writer.drain()
    for _ in range(200):
        if await asyncio.to_thread(fake.received):
            break
        await asyncio.sleep(0.02)
    else:
        raise AssertionError("the request never reached the worker")
    assert not reader.at_eof()  # nothing answered yet: the worker is still "generating"
    writer.close()
    await writer.wait_closed()


async def _poll(predicate, what: str) -> None:
    for _ in range(200):
        if await predicate():
            return
        await asyncio.sleep(0.025)
    raise AssertionError(what)


@pytest.mark.parametrize("stream", [False, True], ids=["non-streamed", "stream-before-first-byte"])
async def test_client_disconnect_aborts_the_upstream_request(fake_factory, router_factory, caplog, stream):
    fake = fake_factory("m", "--delay-s", "60")  # the worker would answer only after a minute
    router = await router_factory([fake])
    caplog.set_level("INFO", logger="fedllm.serve.forwarding")
    await _send_and_leave(router.url, fake, stream)
    async with httpx.AsyncClient(base_url=router.url, timeout=10) as c:

        async def upstream_cancelled() -> bool:
            return [r.get("cancelled") for r in await asyncio.to_thread(fake.received)] == [True]

        async def released() -> bool:
            workers = (await c.get("/admin/workers", headers=router.admin_headers())).json()
            return workers[0]["outstanding"] == 0

        await _poll(upstream_cancelled, "the worker did not see its request cancelled after the client left")
        await _poll(released, "the worker's outstanding count did not return to 0")
        metrics = (await c.get("/metrics")).text
        fake.control(delay_s=0)  # the worker still serves the next client
        r = await c.post("/v1/chat/completions", json={"model": "m", "messages": [{"role": "user", "content": "hi"}]})
        assert r.status_code == 200
    assert 'router_client_aborts_total{route="/v1/chat/completions"} 1.0' in metrics
    assert 'status="499"' in metrics and 'status="200"' not in metrics
    lines = [r.getMessage() for r in caplog.records if "client disconnected" in r.getMessage()]
    assert len(lines) == 1 and "secret prompt" not in lines[0]


async def test_answered_requests_are_not_counted_as_aborts(fake_factory, router_factory):
    fake = fake_factory("m")
    router = await router_factory([fake])
    async with httpx.AsyncClient(base_url=router.url, timeout=10) as c:
        for stream in (False, True, False):
            r = await c.post("/v1/chat/completions", json={"model": "m", "stream": stream})
            assert r.status_code == 200
        metrics = (await c.get("/metrics")).text
        workers = (await c.get("/admin/workers", headers=router.admin_headers())).json()
    assert "router_client_aborts_total" not in metrics.replace("# HELP router_client_aborts_total", "").replace("# TYPE router_client_aborts_total", "")
    assert workers[0]["outstanding"] == 0
