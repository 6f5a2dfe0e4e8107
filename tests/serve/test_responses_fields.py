"""What the router reads from Responses API requests and streams (pure functions; the real path is in
tests/serve/test_responses_vllm.py)."""

from __future__ import annotations

import json

from fedllm.serve.protocol import read_fields
from fedllm.serve.sse import take_usage


def test_max_output_tokens_is_the_token_budget_and_input_the_prefix() -> None:
    fields = read_fields({"model": "m", "input": "Summarise this.", "max_output_tokens": 300, "max_tokens": 10, "stream": True})

    assert fields.max_tokens == 300 and fields.prefix == "Summarise this." and fields.stream


def test_the_usage_of_a_responses_stream_is_read_from_its_completed_event() -> None:
    created = {"type": "response.created", "response": {"id": "r", "usage": None}}
    done = {"type": "response.completed", "response": {"id": "r", "usage": {"input_tokens": 7, "output_tokens": 5, "total_tokens": 12}}}
    events = b"".join(f"event: {e['type']}\ndata: {json.dumps(e)}\n\n".encode() for e in (created, done))

    kept, used = take_usage(events, strip=False)

    assert used == 12 and kept == events
