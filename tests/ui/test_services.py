"""The console's HTTP clients: SSE parsing, error messages that name the service, Prometheus summary, CLI entry."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from fedllm.appliance.cli import app
from fedllm.testing.factories import free_port
from fedllm.ui.services import STREAM_DONE, RouterClient, ServiceUnavailable, parse_sse_line


def test_parse_sse_line_content_done_and_error():
    chunk = {"choices": [{"index": 0, "delta": {"content": "Hel"}}]}
    assert parse_sse_line(f"data: {json.dumps(chunk)}") == "Hel"
    assert parse_sse_line("data: [DONE]") is STREAM_DONE
    assert parse_sse_line(": keep-alive") is None
    assert parse_sse_line('data: {"choices": [{"delta": {"role": "assistant"}}]}') is None
    with pytest.raises(ServiceUnavailable, match="worker died"):
        parse_sse_line('data: {"error": {"message": "worker died mid-stream"}}')


def test_router_down_is_a_clear_message_not_a_crash():
    router = RouterClient(f"http://127.0.0.1:{free_port()}", "tok", timeout_s=2)
    with pytest.raises(ServiceUnavailable, match=r"router at http://127\.0\.0\.1:\d+ is not reachable.*appliance up"):
        router.models()
    with pytest.raises(ServiceUnavailable, match="not reachable"):
        list(router.stream_chat("m", [{"role": "user", "content": "hi"}], 0.7, 8))


def test_cli_has_ui_command_with_its_flags():
    result = CliRunner().invoke(app, ["ui", "--help"])
    assert result.exit_code == 0
    for flag in ("--host", "--port", "--router-url", "--coordinator-url"):
        assert flag in result.output
