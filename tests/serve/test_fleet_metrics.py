"""The router's metric names are the console's: after one chat through the real router, what the Fleet tab reads from
/metrics counts it, with a non-zero time to first token for the worker that answered."""

from __future__ import annotations

import httpx
import pytest

from fedllm.core.contracts.router_metrics import FleetSnapshot, interval_rates, quantile, snapshot
from fedllm.ui.fleet_history import FleetHistory, summary_markdown


def test_quantile_interpolates_within_buckets_as_prometheus_does() -> None:
    # 10 observations: 4 in (0, 0.1], 6 in (0.1, 0.5]; the median (rank 5) is 1/6 into the second bucket
    buckets = {0.1: 4.0, 0.5: 10.0, float("inf"): 10.0}
    assert quantile(buckets, 0.5) == pytest.approx(0.1 + 0.4 * (1 / 6))
    assert quantile({0.1: 0.0, float("inf"): 0.0}, 0.5) is None


def test_interval_rates_use_only_the_interval() -> None:
    before = FleetSnapshot(100.0, 10, 1, 0, 0, {"w0": {0.1: 5.0, float("inf"): 5.0}})
    after = FleetSnapshot(110.0, 30, 2, 0, 0, {"w0": {0.1: 5.0, float("inf"): 25.0}})
    r = interval_rates(before, after)
    assert r["requests_per_s"] == 2.0 and r["errors_per_s"] == 0.1
    assert r["ttft"]["w0"][0.5] == 0.1  # the 20 new answers all fell beyond the last finite bound


async def test_one_chat_through_the_router_is_counted_with_its_latency(fake_factory, router_factory) -> None:
    router = await router_factory([fake_factory("m")])
    async with httpx.AsyncClient(base_url=router.url, timeout=30) as c:
        empty = snapshot((await c.get("/metrics")).text, 0.0)
        r = await c.post("/v1/chat/completions", json={"model": "m", "messages": [{"role": "user", "content": "hi"}]})
        assert r.status_code == 200
        after = snapshot((await c.get("/metrics")).text, 5.0)
        worker_id = (await c.get("/admin/workers", headers=router.admin_headers())).json()[0]["id"]

    history = FleetHistory()
    history.add(empty)
    history.add(after)
    rates, ttft = history.frames()

    assert after.requests == 1 and after.mean_latency_ms > 0
    text = summary_markdown(after)
    assert text.startswith("**Requests** 1 · **errors** 0 · **mean latency** ") and f"**TTFT p50** `{worker_id}` " in text
    assert rates[rates["series"] == "requests/s"]["value"].tolist() == [pytest.approx(0.2)]
    assert ttft[ttft["series"] == f"{worker_id} p50"]["value"].iloc[0] > 0
