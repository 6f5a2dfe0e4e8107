"""The bytes of a relayed answer: SSE framing, the end of a stream, and the usage a worker reports.

Pure functions on bytes (no sockets, no state) that `serve/forwarding.py` uses to relay a stream event by event and to
settle a tokens-per-minute key from its usage.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, AsyncIterator, Callable

_loads: Callable[[bytes], Any]  # orjson's and json's loads differ in signature; both take bytes
try:  # orjson is several times faster than json on the hot path; json is the fallback
    from orjson import loads as _loads
except ImportError:  # pragma: no cover
    from json import loads as _loads

if TYPE_CHECKING:
    import aiohttp

SSE_HEADERS = [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache"), (b"x-accel-buffering", b"no")]
# Streams end with `data: [DONE]`, except the Responses API's: its last event is one of these (no [DONE]).
STREAM_ENDS = {
    "/v1/responses": (b"event: response.completed", b"event: response.incomplete", b"event: response.failed"),
}


async def prefixed(first: bytes, resp: aiohttp.ClientResponse) -> AsyncIterator[bytes]:
    """`first`, then the rest of the stream."""
    yield first
    async for chunk in resp.content.iter_any():
        yield chunk


def complete_events(buffer: bytes) -> tuple[bytes, bytes]:
    """Split SSE bytes into the complete events and the start of an unfinished one."""
    cut = buffer.rfind(b"\n\n")
    if cut < 0:
        return b"", buffer
    return buffer[: cut + 2], buffer[cut + 2 :]


def with_usage_asked(body: bytes) -> bytes:
    """A JSON object's bytes (without `stream_options`) with `"stream_options": {"include_usage": true}` added,
    spliced before its closing brace instead of re-encoding the whole request."""
    return body.rstrip()[:-1] + b',"stream_options":{"include_usage":true}}'


def take_usage(events: bytes, strip: bool) -> tuple[bytes, int | None]:
    """Find the usage chunk among complete SSE `events`: returns the events to relay (without it when `strip`)
    and its `total_tokens` (None when there is none).

    Only the events that mention `"usage"` are parsed; OpenAI-style chunks carrying `"usage": null` are relayed.
    """
    used = None
    pos = events.find(b'"usage"')
    while pos >= 0:
        cut = events.rfind(b"\n\n", 0, pos)
        start = 0 if cut < 0 else cut + 2
        end = events.find(b"\n\n", pos) + 2  # the events are complete: each ends with a blank line
        event = events[start : end - 2]
        data_at = event.find(b"data: {")  # after an `event:` line in Responses streams
        if data_at >= 0:  # an event without a JSON data line carries no usage
            try:
                chunk = _loads(event[data_at + 6 :])
                total = int((chunk["response"] if "response" in chunk else chunk)["usage"]["total_tokens"])
            except (ValueError, KeyError, TypeError):
                total = None
            if total is not None:
                used = total
                if strip and not chunk.get("choices"):
                    events = events[:start] + events[end:]
                    end = start
        pos = events.find(b'"usage"', end)
    return events, used


def usage_total(payload: bytes) -> int | None:
    """`usage.total_tokens` of a non-streamed answer (None when absent or malformed)."""
    try:
        return int(_loads(payload)["usage"]["total_tokens"])
    except (ValueError, KeyError, TypeError):
        return None
