"""The Responses API (`POST /v1/responses`) through the router to a real vLLM worker, with the official client:
streamed and not, behind an API key with its limits, counted in the router's metrics."""

from __future__ import annotations

import httpx
import pytest

from serve.keys import create_key

pytestmark = pytest.mark.vllm

MODEL = "smollm2-135m-instruct"


async def test_openai_client_responses_create_through_the_router(vllm_worker, router_factory, tmp_path):
    from openai import AsyncOpenAI, AuthenticationError, BadRequestError, RateLimitError

    home = tmp_path / "home"
    key = create_key(home / "keys", "team-a", rpm=2)
    router = await router_factory([vllm_worker.spec], home=home, request_timeout_s=120, max_tokens_cap=64)
    client = AsyncOpenAI(base_url=f"{router.url}/v1", api_key=key, timeout=120, max_retries=0)
    try:
        # Act: one answer, then one stream
        out = await client.responses.create(model=MODEL, input="What is the capital of France? Answer in one word.",
                                            max_output_tokens=8, temperature=0)
        stream = await client.responses.create(model=MODEL, input="Name a colour.", max_output_tokens=8, temperature=0, stream=True)
        events = [event async for event in stream]

        # Assert
        assert out.status in ("completed", "incomplete") and out.output_text.strip() and out.model == MODEL
        assert out.usage.total_tokens > out.usage.output_tokens > 0
        deltas = [e.delta for e in events if e.type == "response.output_text.delta"]
        assert len(deltas) >= 2 and "".join(deltas).strip()
        assert events[-1].type in ("response.completed", "response.incomplete")
        assert events[-1].response.output_text == "".join(deltas)

        # the same limits as chat: the token cap reads max_output_tokens, the key's rpm holds (2 per minute)
        with pytest.raises(BadRequestError, match="max_tokens=100 exceeds this router's cap of 64"):
            await client.responses.create(model=MODEL, input="Hi", max_output_tokens=100)
        with pytest.raises(RateLimitError):
            await client.responses.create(model=MODEL, input="Hi", max_output_tokens=4)
        with pytest.raises(AuthenticationError):
            await AsyncOpenAI(base_url=f"{router.url}/v1", api_key="wrong", max_retries=0).responses.create(model=MODEL, input="Hi")
        async with httpx.AsyncClient(base_url=router.url) as c:
            metrics = (await c.get("/metrics")).text
        counted = [line for line in metrics.splitlines() if line.startswith("router_requests_total{") and 'route="/v1/responses"' in line]
        assert sum(float(line.rsplit(" ", 1)[1]) for line in counted if 'status="200"' in line) == 2
    finally:
        await client.close()
