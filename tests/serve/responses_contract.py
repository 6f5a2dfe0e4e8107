"""What a client sees of `POST /v1/responses` through the router, asserted the same way against real vLLM
(tests/serve/test_responses_vllm.py) and the fake worker (tests/serve/test_responses_fake.py), so the fake that the
fast tests and benchmarks use cannot drift from the real shape unnoticed."""

from __future__ import annotations

from typing import Any


async def assert_responses_contract(client: Any, model: str) -> None:
    """One answer and one stream with the official `openai` client (`AsyncOpenAI` aimed at the router's /v1)."""
    # Act
    out = await client.responses.create(model=model, input="What is the capital of France? Answer in one word.",
                                        max_output_tokens=8, temperature=0)
    stream = await client.responses.create(model=model, input="Name a colour.", max_output_tokens=8, temperature=0, stream=True)
    events = [event async for event in stream]

    # Assert: the answer
    assert out.object == "response" and out.id
    assert out.status in ("completed", "incomplete") and out.output_text.strip() and out.model == model
    assert out.output[0].type == "message" and out.output[0].role == "assistant"
    assert out.usage.total_tokens == out.usage.input_tokens + out.usage.output_tokens
    assert out.usage.total_tokens > out.usage.output_tokens > 0
    # the stream: vLLM's event order, numbered, the deltas adding up to the final response's text
    types = [e.type for e in events]
    assert types[:4] == ["response.created", "response.in_progress", "response.output_item.added", "response.content_part.added"]
    assert types[-4:-1] == ["response.output_text.done", "response.content_part.done", "response.output_item.done"]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    deltas = [e.delta for e in events if e.type == "response.output_text.delta"]
    assert len(deltas) >= 2 and "".join(deltas).strip()
    assert events[-1].type in ("response.completed", "response.incomplete")
    assert events[-1].response.output_text == "".join(deltas) == events[-4].text
    assert events[-1].response.usage.output_tokens > 0
