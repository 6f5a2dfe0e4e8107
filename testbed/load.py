"""A closed-loop load generator for the router: streamed chat requests, time to first token per request.

Run it inside a client region (`Bed.run(region, ...)`), so its connections take that region's WAN link.
"""

from __future__ import annotations

import asyncio
import math
import statistics
import time
from dataclasses import dataclass, field


@dataclass
class LoadResult:
    """What one client region saw: TTFT of each successful request (s), failures by kind, the run's length (s)."""

    ttft_s: list[float] = field(default_factory=list)
    errors: dict[str, int] = field(default_factory=dict)
    duration_s: float = 0.0

    def percentile(self, q: float) -> float:
        """The q-th percentile (0-100) of TTFT in ms (nearest rank; nan without data)."""
        if not self.ttft_s:
            return float("nan")
        ordered = sorted(self.ttft_s)
        return 1000 * ordered[min(len(ordered), max(1, math.ceil(q / 100 * len(ordered)))) - 1]

    @property
    def throughput(self) -> float:
        """Completed requests per second."""
        return len(self.ttft_s) / self.duration_s if self.duration_s else 0.0

    def summary(self) -> str:
        return (
            f"n={len(self.ttft_s)} p50={self.percentile(50):.0f}ms p99={self.percentile(99):.0f}ms "
            f"mean={1000 * statistics.fmean(self.ttft_s) if self.ttft_s else float('nan'):.0f}ms errors={self.errors}"
        )


async def stream_load(
    url: str,
    api_key: str,
    model: str,
    *,
    region: str | None,
    concurrency: int,
    duration_s: float,
    max_tokens: int = 16,
    timeout_s: float = 60.0,
) -> LoadResult:
    """`concurrency` clients send streamed chat requests back to back for `duration_s` seconds.

    A request counts when its stream ends with `[DONE]`; one that ends with an error event, a non-200 status or a
    transport error counts under `errors` by kind. TTFT is from sending to the first `data:` event.
    """
    import httpx

    headers = {"Authorization": f"Bearer {api_key}", **({"X-Region": region} if region else {})}
    body = {
        "model": model,
        "stream": True,
        "max_tokens": max_tokens,
        "messages": [{"role": "user", "content": "Say hi."}],
    }
    result = LoadResult()
    stop_at = time.monotonic() + duration_s

    def fail(kind: str) -> None:
        result.errors[kind] = result.errors.get(kind, 0) + 1

    async def one(http: httpx.AsyncClient) -> None:
        sent = time.monotonic()
        first = None
        try:
            async with http.stream("POST", f"{url}/v1/chat/completions", json=body, headers=headers) as r:
                if r.status_code != 200:
                    await r.aread()
                    fail(f"http {r.status_code}")
                    return
                done = False
                async for line in r.aiter_lines():
                    if not line.startswith("data: "):
                        continue
                    if first is None:
                        first = time.monotonic() - sent
                    if line == "data: [DONE]":
                        done = True
                    elif line.startswith('data: {"error"'):
                        fail("stream error event")
                        return
                if not done:
                    fail("stream without [DONE]")
                    return
        except httpx.HTTPError as exc:
            fail(type(exc).__name__)
            return
        result.ttft_s.append(first if first is not None else time.monotonic() - sent)

    async def client(http: httpx.AsyncClient) -> None:
        while time.monotonic() < stop_at:
            await one(http)

    started = time.monotonic()
    async with httpx.AsyncClient(timeout=timeout_s, limits=httpx.Limits(max_connections=concurrency * 2)) as http:
        await asyncio.gather(*(client(http) for _ in range(concurrency)))
    result.duration_s = time.monotonic() - started
    return result
