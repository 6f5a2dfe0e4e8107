"""Canary requests in the shape of the traffic that triggered them: chat, completions or responses, streamed or not.

A worker that forged only one kind of request (say, streamed `/v1/responses`) while answering the others honestly
would pass canaries of a single shape; so a canary copies the path and streaming of the user request that triggered
it (serve/canary.py), and this module builds its body for that path and reads the answer's text back.
"""

from __future__ import annotations

import json
from typing import Any

from fedllm.serve.canary_pool import Messages

CHAT, COMPLETIONS, RESPONSES = "/v1/chat/completions", "/v1/completions", "/v1/responses"
PATHS = (CHAT, COMPLETIONS, RESPONSES)
MIN_OUTPUT_TOKENS = 16  # /v1/responses refuses a smaller max_output_tokens in OpenAI's API


def build(path: str, model: str, messages: Messages, max_tokens: int, seed: int, stream: bool) -> dict[str, Any]:
    """The request body of a canary on `path` (temperature 0): `messages` as chat messages, as a completion prompt
    (the texts of its turns without the system message, one paragraph each: an instruct model given a system line
    and a finished question as raw text tends to stop at once), or as a response's instructions (the system message)
    and input.

    Raises:
        ValueError: `path` is not one of PATHS.
    """
    if path == CHAT:
        body: dict[str, Any] = {
            "model": model,
            "messages": messages,
            "max_tokens": max_tokens,
            "temperature": 0,
            "seed": seed,
        }
    elif path == COMPLETIONS:
        prompt = "\n\n".join(m["content"] for m in messages if m["role"] != "system")
        body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "seed": seed}
    elif path == RESPONSES:
        system = [m["content"] for m in messages if m["role"] == "system"]
        rest = [m for m in messages if m["role"] != "system"]
        body = {
            "model": model,
            "input": rest[-1]["content"] if len(rest) == 1 else rest,
            "max_output_tokens": max(MIN_OUTPUT_TOKENS, max_tokens),
            "temperature": 0,
        }
        if system:
            body["instructions"] = "\n\n".join(system)
    else:
        raise ValueError(f"no canary shape for {path!r}; known: {', '.join(PATHS)}")
    if stream:
        body["stream"] = True
    return body


def answer_text(path: str, payload: bytes, stream: bool) -> str:
    """The answer's text in a worker's reply to a canary on `path` (its JSON, or its server-sent events).

    Raises:
        ValueError: the reply is not what `path` answers (not JSON, missing fields).
    """
    text = payload.decode("utf-8", "replace")
    try:
        if stream:
            return _streamed(path, text)
        answer = json.loads(text)
        if path == CHAT:
            return str(answer["choices"][0]["message"]["content"] or "")
        if path == COMPLETIONS:
            return str(answer["choices"][0]["text"] or "")
        return "".join(
            part.get("text", "")
            for item in answer["output"]
            if item.get("type") == "message"
            for part in item.get("content") or []
            if part.get("type") == "output_text"
        )
    except (KeyError, IndexError, TypeError, AttributeError) as exc:
        raise ValueError(f"not a {path} answer: {type(exc).__name__}: {exc}") from exc


def _streamed(path: str, sse: str) -> str:
    """The text of a stream: choice 0's deltas (chat), texts (completions), or `response.output_text.delta` events."""
    pieces = []
    for line in sse.splitlines():
        if not line.startswith("data:") or line[5:].strip() == "[DONE]":
            continue
        event = json.loads(line[5:])
        if path == RESPONSES:
            if event.get("type") == "response.output_text.delta":
                pieces.append(str(event.get("delta") or ""))
            continue
        for choice in event.get("choices") or []:
            if choice.get("index", 0) == 0:
                piece = (choice.get("delta") or {}).get("content") if path == CHAT else choice.get("text")
                pieces.append(piece or "")
    return "".join(pieces)
