"""The Responses API (`POST /v1/responses`) through the router to a real vLLM worker, with the official client:
streamed and not, behind an API key with its limits, counted in the router's metrics."""

from __future__ import annotations

import httpx
import pytest

from fedllm.serve.keys import create_key
from tests.serve.responses_contract import assert_responses_contract

pytestmark = pytest.mark.vllm

MODEL = "smollm2-135m-instruct"


async def test_openai_client_responses_create_through_the_router(vllm_worker, router_factory, tmp_path):
    from openai import AsyncOpenAI, AuthenticationError, BadRequestError, RateLimitError

    home = tmp_path / "home"
    key = create_key(home / "keys", "team-a", rpm=2)
    router = await router_factory([vllm_worker.spec], home=home, request_timeout_s=120, max_tokens_cap=64)
    client = AsyncOpenAI(base_url=f"{router.url}/v1", api_key=key, timeout=120, max_retries=0)
    try:
        await assert_responses_contract(client, MODEL)

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
