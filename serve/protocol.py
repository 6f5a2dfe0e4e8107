"""The OpenAI-compatible wire shapes the router reads and writes.

The router forwards request bodies as bytes; it only reads a few fields (`model`, `stream`, `max_tokens`,
`max_completion_tokens`, `n`, `best_of`, `stream_options`, `user`, and the first message or prompt prefix for
affinity). Errors leave in OpenAI's JSON shape, built here and nowhere else. Imports only pydantic and the standard
library.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, Field


class ModelCard(BaseModel):
    """One entry of `GET /v1/models`."""

    id: str
    object: str = "model"
    created: int = 0
    owned_by: str = "appliance"
    # -- our extensions --
    root: str | None = None
    parent: str | None = None


class ModelList(BaseModel):
    """`GET /v1/models`."""

    object: str = "list"
    data: list[ModelCard] = Field(default_factory=list)


# The OpenAI `type` that goes with each HTTP status the router answers with.
ERROR_TYPES: dict[int, str] = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    502: "upstream_error",
    503: "service_unavailable",
    504: "timeout_error",
}


def error_body(status: int, message: str, *, param: str | None = None) -> bytes:
    """The JSON bytes of an OpenAI error with HTTP `status`."""
    err = {"message": message, "type": ERROR_TYPES.get(status, "api_error"), "param": param, "code": status}
    return json.dumps({"error": err}).encode()


def sse_error_event(message: str, *, type_: str = "upstream_error", code: int = 502) -> bytes:
    """An SSE event carrying an OpenAI error, sent when a stream breaks after its first byte."""
    return (
        b"data: "
        + json.dumps({"error": {"message": message, "type": type_, "param": None, "code": code}}).encode()
        + b"\n\n"
    )


@dataclass(slots=True)
class RequestFields:
    """The few fields the router reads from a completion request (the body itself is forwarded untouched).

    A plain slotted dataclass, not a pydantic model: it is built once per request on the hot path, from values
    `read_fields` has already checked.
    """

    model: str
    stream: bool = False
    max_tokens: int | None = None  # the larger of max_tokens and max_completion_tokens (None: neither given)
    choices: int = 1  # completions generated: the larger of n and best_of, times the prompts of a prompt list
    user: str | None = None
    prefix: str | None = None  # our extension: the system prompt / prompt head, for prefix affinity (never logged)
    stream_usage: bool = False  # the client asked for the usage chunk (stream_options.include_usage)


def _count(data: dict[str, Any], name: str, minimum: int) -> int | None:
    value = data.get(name)
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"`{name}` must be an integer of at least {minimum}")
    return value


def read_fields(data: Any, *, prefix_chars: int = 256) -> RequestFields:
    """Pick the routed fields out of a parsed request body.

    Token caps read every spelling: workers honour `max_completion_tokens` over `max_tokens` (vLLM), and the
    Responses API says `max_output_tokens`, so the effective cap is the largest of them; `n`/`best_of` multiply it,
    and so does a completions prompt list (each prompt is answered `n` times).

    Raises:
        ValueError: the body is not an object, `model` is missing or not a string, or `max_tokens`,
            `max_completion_tokens` (integers >= 0), `n` or `best_of` (integers >= 1) are of the wrong type.
    """
    if not isinstance(data, dict):
        raise ValueError("the request body must be a JSON object")
    model = data.get("model")
    if not isinstance(model, str) or not model:
        raise ValueError("the request must name a `model` (a non-empty string)")
    max_tokens = _count(data, "max_tokens", 0)
    for other in ("max_completion_tokens", "max_output_tokens"):
        value = _count(data, other, 0)
        if value is not None and (max_tokens is None or value > max_tokens):
            max_tokens = value
    choices = max(_count(data, "n", 1) or 1, _count(data, "best_of", 1) or 1) * _prompts(data.get("prompt"))
    stream = bool(data.get("stream"))
    options = data.get("stream_options") if stream else None
    user = data.get("user")
    return RequestFields(
        model=model,
        stream=stream,
        max_tokens=max_tokens,
        choices=choices,
        user=user if isinstance(user, str) else None,
        prefix=_prefix(data, prefix_chars),
        stream_usage=isinstance(options, dict) and options.get("include_usage") is True,
    )


def _prompts(prompt: Any) -> int:
    """How many prompts a completions `prompt` holds: a list of strings or of token lists is one prompt per item; a
    string or one list of token ids is one."""
    if isinstance(prompt, list) and prompt and all(isinstance(p, (str, list)) for p in prompt):
        return len(prompt)
    return 1


def _prefix(data: dict[str, Any], chars: int) -> str | None:
    messages = data.get("messages")
    if isinstance(messages, list) and messages and isinstance(messages[0], dict):
        content = messages[0].get("content")
        if isinstance(content, str):
            return content[:chars]
        return None
    prompt = data.get("prompt", data.get("input"))  # completions' prompt, the Responses API's input
    if isinstance(prompt, str):
        return prompt[:chars]
    return None
