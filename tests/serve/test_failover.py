"""Failover on loopback with real fake-backend processes: killed workers, broken streams, client disconnects."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest


async def _one(c: httpx.AsyncClient, i: int, stream: bool) -> str:
    """One request; returns 'ok', or 'error' for an explicit error (status or SSE error event). Never hangs silently."""
    body = {"model": "m", "messages": [{"role": "user", "content": f"q{i}"}], "stream": stream}
    if not stream:
        r = await c.post("/v1/chat/completions", json=body)
        if r.status_code == 200:
            assert r.json()["choices"][0]["message"]["content"]
            return "ok"
        assert "error" in r.json()
        return "error"
    async with c.stream("POST", "/v1/chat/completions", json=body) as s:
        if s.status_code != 200:
            await s.aread()
            assert "error" in s.json()
            return "error"
        lines = [line async for line in s.aiter_lines() if line]
    if lines[-1] == "data: [DONE]":
        return "ok"
    assert "error" in json.loads(lines[-1].removeprefix("data: ")), lines[-3:]
    return "error"


@pytest.mark.slow
async def test_worker_killed_during_load(fake_factory, router_factory):
    fakes = [fake_factory("m", "--chunk-delay-s", "0.01") for _ in range(3)]
    router = await router_factory(fakes, policy="least_outstanding")
    limits = httpx.Limits(max_connections=32)
    done = 0

    async def counted(client, i):
        nonlocal done
        outcome = await _one(client, i, stream=i % 2 == 0)
        done += 1
        return outcome

    async def killer():
        while done < 40:  # kill in the middle of the load, however fast the machine is
            await asyncio.sleep(0.005)
        fakes[1].proc.kill()

    async with httpx.AsyncClient(base_url=router.url, timeout=30, limits=limits) as client:
        results = await asyncio.wait_for(asyncio.gather(killer(), *(counted(client, i) for i in range(200))), timeout=90)
        outcomes = results[1:]
        assert set(outcomes) <= {"ok", "error"}
        assert outcomes.count("ok") >= 170, outcomes.count("error")  # only streams in flight on the killed one may fail
        workers = (await client.get("/admin/workers", headers=router.admin_headers())).json()
        assert [w["healthy"] for w in workers] == [True, False, True]
        assert all(w["outstanding"] == 0 for w in workers)
        # After the kill, everything is served by the survivors.
        assert {await _one(client, i, stream=bool(i % 2)) for i in range(20)} == {"ok"}


async def test_broken_stream_ends_with_error_event(fake_factory, router_factory):
    fake = fake_factory("m", "--break-after-chunks", "2")
    router = await router_factory([fake])
    async with httpx.AsyncClient(base_url=router.url, timeout=30) as c:
        async with c.stream("POST", "/v1/chat/completions", json={"model": "m", "stream": True}) as s:
            assert s.status_code == 200
            lines = [line async for line in s.aiter_lines() if line]
        metrics = (await c.get("/metrics")).text
    assert len(lines) == 3 and "tok1" in lines[1]
    error = json.loads(lines[-1].removeprefix("data: "))["error"]
    assert "broke" in error["message"] and error["code"] == 502
    assert 'router_errors_total{kind="stream_broken"} 1.0' in metrics


async def test_worker_restarted_is_readmitted(fake_factory, router_factory):
    a = fake_factory("m")
    router = await router_factory([a])
    a.control(unhealthy=True)
    async with httpx.AsyncClient(base_url=router.url, timeout=30) as c:
        for _ in range(100):
            if (await c.post("/v1/chat/completions", json={"model": "m"})).status_code == 503:
                break
            await asyncio.sleep(0.1)
        else:
            raise AssertionError("an unhealthy worker kept receiving traffic")
        assert (await c.get("/v1/models")).json()["data"] == []
        a.control(unhealthy=False)
        for _ in range(100):
            if (await c.post("/v1/chat/completions", json={"model": "m"})).status_code == 200:
                break
            await asyncio.sleep(0.1)
        else:
            raise AssertionError("a recovered worker was not re-admitted")


async def test_client_disconnect_releases_the_worker(fake_factory, router_factory):
    fake = fake_factory("m", "--chunks", "400", "--chunk-delay-s", "0.02")
    router = await router_factory([fake])
    async with httpx.AsyncClient(base_url=router.url, timeout=30) as c:
        async with c.stream("POST", "/v1/chat/completions", json={"model": "m", "stream": True}) as s:
            async for line in s.aiter_lines():
                if line:
                    break  # leave after the first event: the client closes the connection
        for _ in range(100):
            workers = (await c.get("/admin/workers", headers=router.admin_headers())).json()
            if workers[0]["outstanding"] == 0:
                break
            await asyncio.sleep(0.05)
        else:
            raise AssertionError("the upstream request was not aborted after the client left")
