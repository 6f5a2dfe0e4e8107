"""Serving across regions: a router in `hq`, fake workers in eu (5 ms), us (40 ms) and ap (120 ms) one way from it,
each joined with `appliance worker join` from inside its region; clients in their regions send `X-Region`."""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import pytest

from fedllm.serve.policy import NEAR_BAND_MS
from fedllm.testbed.bed import Bed
from fedllm.testbed.fleet import FAKE_MODEL, GeoFleet
from fedllm.testbed.link import LinkSpec
from tests.geo.conftest import needs_netns


pytestmark = pytest.mark.slow  # starts a router and three joined workers in namespaces

HEALTH_INTERVAL_S = 1.0
REGIONS = {"hq": LinkSpec(0), "eu": LinkSpec(5), "us": LinkSpec(40), "ap": LinkSpec(120)}


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("geo-fleet")
    with Bed(REGIONS, workdir) as bed:
        fleet = GeoFleet(bed, "hq", workdir / "router-home",
                         serve_env={"HEALTH_INTERVAL_S": HEALTH_INTERVAL_S, "RETRY_BACKOFF_S": 0.01})
        fleet.start_router()
        for region in ("eu", "us", "ap"):
            fleet.add_fake_worker(region)
        fleet.wait_healthy()
        yield fleet


def _chat(stream: bool = False, text: str = "hi") -> dict:
    return {"model": FAKE_MODEL, "messages": [{"role": "user", "content": text}], "stream": stream}


def _send(fleet: GeoFleet, client: str, n: int, *, region: str | None = None, concurrent: bool = False,
          text: str = "hi") -> list[tuple[int, str]]:
    """`n` chat requests from `client`'s region; returns (status, served_by or error message) per request."""
    url = fleet.router_url(client)
    headers = {"Authorization": f"Bearer {fleet.api_key}", **({"X-Region": region} if region else {})}

    async def one(http: httpx.AsyncClient) -> tuple[int, str]:
        r = await http.post(f"{url}/v1/chat/completions", json=_chat(text=text), headers=headers)
        body = r.json()
        return r.status_code, body.get("served_by") if r.status_code == 200 else body["error"]["message"]

    async def main() -> list[tuple[int, str]]:
        async with httpx.AsyncClient(timeout=60, limits=httpx.Limits(max_connections=64)) as http:
            if concurrent:
                return list(await asyncio.gather(*(one(http) for _ in range(n))))
            return [await one(http) for _ in range(n)]

    return fleet.bed.run(client, main)


def _table(fleet: GeoFleet) -> list[tuple]:
    """What the router knows of each worker (for assertion messages)."""
    return [(w["url"], w["healthy"], w["latency_ms"], w["distance_ms"], w["outstanding"])
            for w in fleet.admin("GET", "/admin/workers")]


def _control(fleet: GeoFleet, **changes) -> None:
    """Change every fake worker's behaviour (from inside its own region)."""
    _control_only(fleet, list(fleet.workers), **changes)


def _control_only(fleet: GeoFleet, names: list[str], **changes) -> None:
    for w in (fleet.workers[n] for n in names):
        fleet.bed.call(w.region, lambda w=w: httpx.post(f"{w.url}/fake/control", json=changes, timeout=5).raise_for_status())


def test_workers_join_from_their_regions(fleet):
    rows = {r["region"]: r for r in fleet.admin("GET", "/admin/workers")}

    assert set(rows) == {"eu", "us", "ap"}
    for region, row in rows.items():
        assert row["healthy"] and FAKE_MODEL in row["models"]
        assert row["url"] == fleet.workers[f"fake-{region}"].advertised  # the router reaches it through the WAN link


def test_router_reaches_workers_only_through_links(fleet):
    needs_netns()
    worker = fleet.workers["fake-us"]
    with pytest.raises(httpx.HTTPError):
        fleet.bed.call("hq", lambda: httpx.get(f"{worker.url}/health", timeout=2))


def test_requests_go_to_the_nearest_region_while_it_has_capacity(fleet):
    # Arrange: one request per region, then wait until the router has eu's and us's distances (probes measure them):
    # prefix affinity chooses among the workers within NEAR_BAND_MS of the nearest, and us is 70 ms further than eu
    for region in ("eu", "us", "ap"):
        _send(fleet, region, 1, region=region)
    deadline = time.monotonic() + 30
    while True:
        distance = {w["url"]: w["distance_ms"] for w in fleet.admin("GET", "/admin/workers")}
        eu, us = (distance[fleet.workers[f"fake-{region}"].advertised] for region in ("eu", "us"))
        if eu is not None and us is not None and eu + NEAR_BAND_MS < us:
            break
        assert time.monotonic() < deadline, ("the router never measured eu as nearer than us", _table(fleet))
        time.sleep(0.2)
    # Act / Assert: eu is 5 ms from the router; ap's clients get it too (through the router, ap's own worker is
    # 120 ms further away), as long as eu has capacity (one request at a time here)
    for client in ("eu", "ap"):
        answers = _send(fleet, client, 6, region=client)
        assert answers == [(200, "fake-eu")] * 6, _table(fleet)


def test_load_spills_over_to_other_regions_with_bounded_load(fleet):
    _control(fleet, delay_s=0.5)
    try:
        answers = _send(fleet, "eu", 12, region="eu", concurrent=True)
    finally:
        _control(fleet, delay_s=0.0)
    served = [who for status, who in answers if status == 200]
    assert len(served) == 12
    counts = {w: served.count(w) for w in set(served)}
    assert counts["fake-eu"] == max(counts.values())  # the client's region first
    assert counts["fake-eu"] < 12 and len(counts) >= 2  # ...but not all of it: the rest spilled over


def test_cutting_a_region_mid_load_leaves_no_request_hanging(fleet):
    _control(fleet, delay_s=0.5)
    url = fleet.router_url("eu")
    headers = {"Authorization": f"Bearer {fleet.api_key}", "X-Region": "us"}

    async def load() -> list[int]:
        async with httpx.AsyncClient(timeout=60, limits=httpx.Limits(max_connections=64)) as http:
            async def one() -> int:
                r = await http.post(f"{url}/v1/chat/completions", json=_chat(), headers=headers)
                assert r.status_code == 200 or "error" in r.json()  # an answer, or an explicit OpenAI error
                return r.status_code
            tasks = [asyncio.ensure_future(one()) for _ in range(10)]
            await asyncio.sleep(0.3)  # requests are now waiting on the workers
            cut_at.append(time.monotonic())
            await asyncio.get_running_loop().run_in_executor(None, fleet.bed.cut, "us")
            return list(await asyncio.wait_for(asyncio.gather(*tasks), 120))  # none hangs

    cut_at: list[float] = []
    try:
        statuses = fleet.bed.run("eu", load)
        assert len(statuses) == 10 and statuses.count(200) >= 1

        # marked unhealthy within the health-check interval (plus the probe's own round trips, this poll, and slack for
        # a loaded machine): long before a joined worker would expire (serve.worker_expiry_s, 60 s)
        fleet.wait(lambda: not fleet.row("fake-us")["healthy"], 2 * HEALTH_INTERVAL_S + 10, "us to be marked unhealthy")
        assert time.monotonic() - cut_at[0] <= 2 * HEALTH_INTERVAL_S + 10
        after = _send(fleet, "eu", 3, region="us")
        assert all(status == 200 and who != "fake-us" for status, who in after)  # served elsewhere meanwhile
    finally:
        fleet.bed.restore("us")
        _control(fleet, delay_s=0.0)

    fleet.wait_healthy(["fake-us"], timeout_s=30)
    _control(fleet, delay_s=0.5)
    try:
        again = _send(fleet, "eu", 9, region="us", concurrent=True)
    finally:
        _control(fleet, delay_s=0.0)
    assert all(status == 200 for status, _ in again) and ("fake-us" in {who for _, who in again})  # takes traffic again


def test_a_stream_over_a_cut_link_ends_with_an_error_event(fleet):
    url = fleet.router_url("eu")
    headers = {"Authorization": f"Bearer {fleet.api_key}", "X-Region": "ap"}
    _control(fleet, chunk_delay_s=0.5)

    async def stream() -> list[bytes]:
        events: list[bytes] = []
        async with httpx.AsyncClient(timeout=60) as http:
            async with http.stream("POST", f"{url}/v1/chat/completions", json=_chat(stream=True), headers=headers) as r:
                assert r.status_code == 200
                async for line in r.aiter_lines():
                    if line.startswith("data: "):
                        events.append(line[6:].encode())
                        if len(events) == 1:
                            await asyncio.get_running_loop().run_in_executor(None, fleet.bed.cut, "ap")
        return events

    # only ap may take the stream: the other workers report unhealthy for the moment
    _control_only(fleet, ["fake-eu", "fake-us"], unhealthy=True)
    fleet.wait(lambda: not fleet.row("fake-eu")["healthy"] and not fleet.row("fake-us")["healthy"], 30, "eu, us unhealthy")
    ap = fleet.workers["fake-ap"]
    streams_at_ap = lambda: sum(e.get("stream", False) for e in fleet.bed.call("ap", lambda: httpx.get(f"{ap.url}/fake/requests", timeout=5).json()))
    before = streams_at_ap()
    try:
        events = fleet.bed.run("eu", stream)
    finally:
        fleet.bed.restore("ap")
        _control(fleet, chunk_delay_s=0.0, unhealthy=False)
    assert streams_at_ap() == before + 1  # the stream ran over ap's link
    assert b"[DONE]" not in events
    last = json.loads(events[-1])
    assert "error" in last and "incomplete" in last["error"]["message"]
    fleet.wait_healthy(timeout_s=30)
