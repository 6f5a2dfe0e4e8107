"""Hedged requests (serve.hedge): a late first byte is hedged on the next worker, the first answer wins, the loser is
aborted; nothing is hedged when off or once the first byte went out. Real fake-backend processes on loopback."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest

from fedllm.serve.hedging import BURST, MIN_SAMPLES, FirstByteWindow, Hedger
from fedllm.testing.factories import wait_until_async

CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}


# -- the bookkeeping (pure) --
def test_window_learns_the_percentile_only_after_enough_samples():
    window = FirstByteWindow(90.0)
    for i in range(MIN_SAMPLES - 1):
        window.add(0.01 * (i + 1))
    assert window.value() is None
    window.add(0.01 * MIN_SAMPLES)
    assert window.value() == pytest.approx(0.01 * MIN_SAMPLES * 0.9)  # nearest rank: the 18th of 20


def test_delay_has_a_floor_and_is_per_worker():
    hedger = Hedger(95.0, min_delay_s=0.05, max_extra=0.1)
    for _ in range(MIN_SAMPLES):
        hedger.observe("fast", 0.001)
        hedger.observe("slow", 0.4)
    assert hedger.delay_s("fast") == 0.05
    assert hedger.delay_s("slow") == pytest.approx(0.4)
    assert hedger.delay_s("unknown") is None


def test_budget_bounds_the_extra_load():
    hedger = Hedger(95.0, min_delay_s=0.05, max_extra=0.1)
    taken = 0
    for _ in range(1000):
        hedger.request()
        taken += hedger.take()  # every request would like a hedge
    assert taken == 100
    idle = Hedger(95.0, min_delay_s=0.05, max_extra=1.0)
    for _ in range(100):
        idle.request()
    assert sum(idle.take() for _ in range(100)) == BURST  # a quiet spell saves up only a small burst


def test_censored_losers_keep_the_tail_in_the_percentile():
    """Primaries aborted after the delay are recorded at their wait: the learned delay stays put instead of shrinking
    to the fast answers only (which would hedge ever more requests)."""
    hedger = Hedger(90.0, min_delay_s=0.001, max_extra=1.0)
    for i in range(200):
        hedger.observe("w", 0.01 if i % 10 else 1.0)  # 10% slow
    learned = hedger.delay_s("w")
    for i in range(400):  # from now on each slow one is hedged and aborted at the learned delay
        hedger.observe("w", 0.01 if i % 10 else learned)
    assert hedger.delay_s("w") == pytest.approx(learned)


def test_hedging_is_off_by_default():
    from fedllm.core.sections.serve import ServeSettings

    cfg = ServeSettings()
    assert cfg.hedge == "off"
    with pytest.raises(ValueError):
        ServeSettings(hedge="maybe")
    with pytest.raises(ValueError):
        ServeSettings(hedge_percentile=100)


# -- the router, with fake workers on loopback --
async def _fleet(fake_factory, router_factory, **serve):
    """Worker `near` (the router's region: always ranked first) and worker `far`; `near` learned as fast."""
    near, far = fake_factory("m"), fake_factory("m")
    router = await router_factory([{"url": near.url, "region": "r1"}, {"url": far.url, "region": "r2"}], region="r1",
                                  hedge_min_delay_s=0.05, **serve)
    async with httpx.AsyncClient(base_url=router.url, timeout=30) as c:
        for _ in range(MIN_SAMPLES + 5):  # the router learns near's first-byte times (and earns hedge budget)
            r = await c.post("/v1/chat/completions", json=CHAT)
            assert r.status_code == 200 and r.json()["served_by"] == f"fake-{near.url.rsplit(':', 1)[1]}"
            assert await _chat(c, stream=True) == "tok0 tok1 tok2 tok3"  # streams are learned apart
    assert await asyncio.to_thread(far.received) == []
    return near, far, router


async def _chat(c: httpx.AsyncClient, stream: bool) -> str:
    """One chat request; returns the answer's text (streamed: the deltas joined) after checking it completed."""
    if not stream:
        r = await c.post("/v1/chat/completions", json=CHAT)
        assert r.status_code == 200, r.text
        return r.json()["choices"][0]["message"]["content"]
    async with c.stream("POST", "/v1/chat/completions", json={**CHAT, "stream": True}) as s:
        assert s.status_code == 200
        lines = [line.removeprefix("data: ") async for line in s.aiter_lines() if line]
    assert lines[-1] == "[DONE]"
    return "".join(json.loads(x)["choices"][0]["delta"]["content"] for x in lines[:-1]).strip()


def _completions(fake) -> list[dict]:
    return [r for r in fake.received() if r["path"] == "/v1/chat/completions"]


@pytest.mark.parametrize("stream", [False, True], ids=["non-streamed", "streamed"])
async def test_a_late_first_byte_is_hedged_and_the_loser_aborted(fake_factory, router_factory, stream):
    near, far, router = await _fleet(fake_factory, router_factory, hedge="on")
    near.control(first_byte_delay_s=60)  # near now stalls before its first token (a stream: after its headers)
    async with httpx.AsyncClient(base_url=router.url, timeout=30) as c:
        assert await _chat(c, stream) == "tok0 tok1 tok2 tok3"  # far's answer, long before near's minute

        await wait_until_async(lambda: _completions(near)[-1].get("cancelled") is True, what="the loser's worker to see the abort")
        workers = router.app.state.registry.workers.values()
        await wait_until_async(lambda: all(w.outstanding == 0 for w in workers), what="the outstanding counts to return to 0")
        # The loser waited at least the 50 ms floor: the policy's latency EWMA (weight 0.2) learns that it was slow.
        assert next(w for w in workers if w.url == near.url).ttft_ms >= 0.2 * 50
        metrics = (await c.get("/metrics")).text
    assert [r["stream"] for r in _completions(far)] == [stream]
    assert 'router_hedges_total{result="won"} 1.0' in metrics
    assert "router_client_aborts_total{" not in metrics  # the loser is no client abort


async def test_no_hedge_when_off(fake_factory, router_factory):
    near, far, router = await _fleet(fake_factory, router_factory)  # serve.hedge defaults to off
    near.control(first_byte_delay_s=0.5)
    async with httpx.AsyncClient(base_url=router.url, timeout=30) as c:
        for stream in (False, True):
            assert await _chat(c, stream) == "tok0 tok1 tok2 tok3"
        metrics = (await c.get("/metrics")).text
    assert _completions(far) == []
    assert "router_hedges_total{" not in metrics
    assert not any(r.get("cancelled") for r in _completions(near))


async def test_a_stream_whose_first_byte_went_out_is_never_hedged(fake_factory, router_factory):
    near, far, router = await _fleet(fake_factory, router_factory, hedge="on")
    near.control(chunk_delay_s=0.4)  # the first token comes at once, the rest slowly: ~1.6 s, far past the hedge delay
    async with httpx.AsyncClient(base_url=router.url, timeout=30) as c:
        assert await _chat(c, stream=True) == "tok0 tok1 tok2 tok3"
        metrics = (await c.get("/metrics")).text
    assert _completions(far) == []
    assert "router_hedges_total{" not in metrics
    assert not any(r.get("cancelled") for r in _completions(near))
