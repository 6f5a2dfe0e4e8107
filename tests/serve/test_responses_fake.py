"""The Responses API through the router to fake workers (real processes on loopback): the fake answers in vLLM's
shapes (the same contract as tests/serve/test_responses_vllm.py asserts against real vLLM), and a request fails over
to a healthy worker when the first one answers 5xx or has died, streamed and not, as chat does."""

from __future__ import annotations

import json

import httpx
import pytest

from tests.serve.responses_contract import assert_responses_contract


def _served_by(fake) -> str:
    return fake.url.replace("http://127.0.0.1:", "fake-")


async def test_the_fake_worker_meets_the_responses_contract_through_the_router(fake_factory, router_factory):
    from openai import AsyncOpenAI

    fake = fake_factory("m")
    router = await router_factory([fake])
    async with AsyncOpenAI(base_url=f"{router.url}/v1", api_key="unused", max_retries=0, timeout=30) as client:
        await assert_responses_contract(client, "m")
        cut = await client.responses.create(model="m", input="Hi", max_output_tokens=2)

    assert cut.status == "incomplete" and cut.incomplete_details.reason == "max_output_tokens"
    assert cut.output_text == "tok0 tok1" and cut.usage.output_tokens == 2
    assert [r["path"] for r in fake.received()] == ["/v1/responses"] * 3


async def _responses(c: httpx.AsyncClient, stream: bool) -> tuple[int, str, list[dict]]:
    """One Responses request: (status, served_by or x-served-by, the stream's events)."""
    body = {"model": "m", "input": "Name a colour.", "max_output_tokens": 8, "stream": stream}
    if not stream:
        r = await c.post("/v1/responses", json=body)
        return r.status_code, r.json().get("served_by", ""), []
    async with c.stream("POST", "/v1/responses", json=body) as s:
        text = (await s.aread()).decode()
        served = s.headers.get("x-served-by", "")
    events = [json.loads(block.split("data: ", 1)[1]) for block in text.split("\n\n") if "data: " in block]
    return s.status_code, served, events


@pytest.mark.parametrize("stream", [False, True])
async def test_a_responses_request_fails_over_from_a_5xx_worker(fake_factory, router_factory, stream):
    a, b = fake_factory("m"), fake_factory("m")
    router = await router_factory([a, b], policy="round_robin", max_retries=1)
    a.control(fail_next=100)

    async with httpx.AsyncClient(base_url=router.url, timeout=30) as c:
        answers = [await _responses(c, stream) for _ in range(4)]

    assert [status for status, _, _ in answers] == [200] * 4
    if stream:  # every stream is whole: it ends with its completed response, whose text is the deltas'
        for _, _, events in answers:
            assert events[-1]["type"] == "response.completed"
            deltas = "".join(e["delta"] for e in events if e["type"] == "response.output_text.delta")
            assert events[-1]["response"]["output"][0]["content"][0]["text"] == deltas == "tok0 tok1 tok2 tok3"
    else:
        assert {served for _, served, _ in answers} == {_served_by(b)}
    tried_a = [r for r in a.received() if r["path"] == "/v1/responses"]
    assert tried_a and len([r for r in b.received() if r["path"] == "/v1/responses"]) == 4  # a was tried, b answered all


@pytest.mark.parametrize("stream", [False, True])
async def test_a_responses_request_fails_over_from_a_dead_worker(fake_factory, router_factory, stream):
    a, b = fake_factory("m"), fake_factory("m")
    router = await router_factory([a, b], policy="round_robin", max_retries=1, health_interval_s=60)
    a.proc.kill()  # dead before the router's next health probe: the request itself finds out
    a.proc.wait()

    async with httpx.AsyncClient(base_url=router.url, timeout=30) as c:
        answers = [await _responses(c, stream) for _ in range(4)]
        workers = (await c.get("/admin/workers", headers=router.admin_headers())).json()

    assert [status for status, _, _ in answers] == [200] * 4
    if stream:
        assert all(events[-1]["type"] == "response.completed" for _, _, events in answers)
    assert len([r for r in b.received() if r["path"] == "/v1/responses"]) == 4
    assert [w["healthy"] for w in workers] == [False, True]
