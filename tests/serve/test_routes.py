"""Router v1 against fake backends on loopback: forwarding, streaming, models, and OpenAI-shaped errors."""

from __future__ import annotations

import httpx
import pytest


def _err(r: httpx.Response) -> dict:
    body = r.json()
    assert set(body) == {"error"} and {"message", "type", "code"} <= set(body["error"])
    return body["error"]


async def test_chat_and_completion_forwarded_and_streamed(fake_factory, router_factory):
    fake = fake_factory("m")
    router = await router_factory([fake])
    async with httpx.AsyncClient(base_url=router.url) as c:
        r = await c.post("/v1/chat/completions", json={"model": "m", "messages": [{"role": "user", "content": "hi"}]})
        assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == "tok0 tok1 tok2 tok3"
        r = await c.post("/v1/completions", json={"model": "m", "prompt": "hi"})
        assert r.json()["object"] == "text_completion"
        async with c.stream("POST", "/v1/chat/completions", json={"model": "m", "stream": True}) as s:
            assert s.headers["content-type"].startswith("text/event-stream")
            events = [line async for line in s.aiter_lines() if line]
        assert len(events) == 5 and events[-1] == "data: [DONE]"
        models = (await c.get("/v1/models")).json()
        assert [m["id"] for m in models["data"]] == ["m"]
        assert (await c.get("/health")).json()["workers_healthy"] == 1
        metrics = (await c.get("/metrics")).text
        (worker_id,) = router.app.state.registry.workers
        assert f'router_requests_total{{model="m",route="/v1/chat/completions",status="200",worker="{worker_id}"}} 2.0' in metrics


async def test_openai_client_works_through_router(fake_factory, router_factory):
    from openai import AsyncOpenAI

    router = await router_factory([fake_factory("m")])
    client = AsyncOpenAI(base_url=f"{router.url}/v1", api_key="unused")
    out = await client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}])
    assert out.choices[0].message.content.startswith("tok0")
    stream = await client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}], stream=True)
    text = "".join([chunk.choices[0].delta.content or "" async for chunk in stream])
    assert text == "tok0 tok1 tok2 tok3 "
    assert [m.id async for m in client.models.list()] == ["m"]
    await client.close()


@pytest.mark.parametrize(
    ("body", "status", "fragment"),
    [
        (b"{not json", 400, "not valid JSON"),
        (b'{"messages": []}', 400, "model"),
        (b"[1, 2]", 400, "JSON object"),
        (b'{"model": "nope"}', 404, "nope"),
        (b'{"model": "m", "max_tokens": 999999}', 400, "max_tokens"),
    ],
)
async def test_error_mapping(fake_factory, router_factory, body, status, fragment):
    router = await router_factory([fake_factory("m")])
    async with httpx.AsyncClient(base_url=router.url) as c:
        r = await c.post("/v1/chat/completions", content=body, headers={"content-type": "application/json"})
    assert r.status_code == status
    assert fragment in _err(r)["message"]


async def test_body_too_large_is_413(fake_factory, router_factory):
    router = await router_factory([fake_factory("m")], max_body_bytes=2048)
    async with httpx.AsyncClient(base_url=router.url) as c:
        r = await c.post("/v1/chat/completions", json={"model": "m", "prompt": "x" * 5000})
    assert r.status_code == 413 and "2048" in _err(r)["message"]


async def test_no_healthy_worker_is_503(router_factory):
    from fedllm.testing.factories import free_port

    router = await router_factory([f"http://127.0.0.1:{free_port()}"])
    async with httpx.AsyncClient(base_url=router.url) as c:
        r = await c.post("/v1/chat/completions", json={"model": "m"})
    assert r.status_code == 503 and _err(r)["type"] == "service_unavailable"


async def test_5xx_retried_on_other_worker_then_502(fake_factory, router_factory):
    a, b = fake_factory("m"), fake_factory("m")
    router = await router_factory([a, b], policy="round_robin", max_retries=1)
    a.control(fail_next=100)
    async with httpx.AsyncClient(base_url=router.url) as c:
        for _ in range(4):
            r = await c.post("/v1/chat/completions", json={"model": "m"})
            assert r.status_code == 200 and r.json()["served_by"] == b.url.replace("http://127.0.0.1:", "fake-")
        b.control(fail_next=100)
        r = await c.post("/v1/chat/completions", json={"model": "m"})
    assert r.status_code == 502 and "2 worker(s)" in _err(r)["message"]


async def test_upstream_4xx_passes_through(fake_factory, router_factory):
    fake = fake_factory("m")
    router = await router_factory([fake])
    fake.control(fail_next=1, fail_status=400)
    async with httpx.AsyncClient(base_url=router.url) as c:
        r = await c.post("/v1/chat/completions", json={"model": "m"})
    assert r.status_code == 400 and _err(r)["message"] == "injected failure"


async def test_region_header_and_session_affinity_steer_routing(fake_factory, router_factory):
    eu, us = fake_factory("m"), fake_factory("m")
    router = await router_factory([{"url": eu.url, "region": "eu-west"}, {"url": us.url, "region": "us-east"}], region="us-east")
    name = {eu.url.replace("http://127.0.0.1:", "fake-"): "eu", us.url.replace("http://127.0.0.1:", "fake-"): "us"}
    async with httpx.AsyncClient(base_url=router.url) as c:
        served = [name[(await c.post("/v1/chat/completions", json={"model": "m"}, headers={"X-Region": "eu-west"})).json()["served_by"]] for _ in range(6)]
        assert served == ["eu"] * 6
        served = [name[(await c.post("/v1/chat/completions", json={"model": "m"})).json()["served_by"]] for _ in range(6)]
        assert served == ["us"] * 6  # no header: the router's own region
    same_region = await router_factory([eu, us])
    async with httpx.AsyncClient(base_url=same_region.url) as c:
        homes = set()
        for i in range(10):
            picks = set()
            for _ in range(4):
                r = await c.post("/v1/chat/completions", json={"model": "m", "user": f"user-{i}"})
                picks.add(name[r.json()["served_by"]])
            assert len(picks) == 1  # a session sticks to one worker while load is low
            homes |= picks
        assert homes == {"eu", "us"}  # and sessions spread over the workers (consistent hashing)
