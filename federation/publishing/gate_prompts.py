"""The promotion gate's second check: a few gate prompts sent through the router to the new version under its own
name (`NAME-vN`, already published, on a trusted worker: the router routes only to those) must each get a non-empty
answer whose token log-probabilities, when the worker returns them, are finite.

`prompt_problem(...)` returns None when every prompt passed, else the first problem in words (an HTTP error, an empty
answer, a non-finite log-probability); the gate then holds the version back and records that reason.
"""

from __future__ import annotations

import math
import ssl
from typing import Any

import httpx

DEFAULT_GATE_PROMPTS = ["Say hello in one short sentence.", "What is 2 + 3?", "Name one colour."]


def prompt_problem(
    router_url: str,
    model: str,
    prompts: list[str],
    *,
    api_key: str | None = None,
    verify: bool | ssl.SSLContext = True,
    max_tokens: int = 16,
    timeout_s: float = 120.0,
) -> str | None:
    """Send each prompt to `model` through the router; None when all answers are non-empty and finite, else why not."""
    from fedllm.core.contracts.router_client import error_text

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    for i, prompt in enumerate(prompts, 1):
        body = {
            "model": model,
            "messages": [{"role": "user", "content": prompt}],
            "max_tokens": max_tokens,
            "temperature": 0,
            "logprobs": True,
        }
        try:
            resp = httpx.post(
                f"{router_url.rstrip('/')}/v1/chat/completions",
                json=body,
                headers=headers,
                timeout=timeout_s,
                verify=verify,
            )
        except httpx.HTTPError as exc:
            return f"gate prompt {i}: the router is not reachable ({type(exc).__name__}: {exc})"
        if resp.status_code != 200:
            return f"gate prompt {i}: HTTP {resp.status_code}: {error_text(resp)}"
        problem = answer_problem(resp.json())
        if problem is not None:
            return f"gate prompt {i} ({prompt!r}): {problem}"
    return None


def answer_problem(answer: Any) -> str | None:
    """What is wrong with one chat completion (None when its first choice has text and finite log-probabilities)."""
    try:
        choice = answer["choices"][0]
        text = choice["message"]["content"]
    except (KeyError, IndexError, TypeError):
        return "the answer has no message"
    if not isinstance(text, str) or not text.strip():
        return "empty answer"
    for token in (choice.get("logprobs") or {}).get("content") or []:
        value = token.get("logprob") if isinstance(token, dict) else None
        if not isinstance(value, (int, float)) or not math.isfinite(value):
            return (
                f"non-finite log-probability {value!r} "
                f"for token {token.get('token') if isinstance(token, dict) else token!r}"
            )
    return None
