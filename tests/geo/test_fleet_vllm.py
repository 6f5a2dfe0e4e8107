"""A real vLLM worker across the WAN: started and joined with `appliance worker join` inside its region (as the
README tells a GPU owner: its region, its namespace address, `--advertise`), answering through the router."""

from __future__ import annotations

import json

import httpx
import pytest

from fedllm.testbed.bed import Bed
from fedllm.testbed.fleet import GeoFleet
from fedllm.testbed.link import LinkSpec

pytestmark = pytest.mark.vllm


def test_a_vllm_worker_joined_from_another_region_answers_through_the_router(tmp_path, embedded_model_dir):
    with Bed({"hq": LinkSpec(0), "eu": LinkSpec(5), "us": LinkSpec(40)}, tmp_path) as bed:
        fleet = GeoFleet(bed, "hq", tmp_path / "router-home", serve_env={"HEALTH_INTERVAL_S": 2.0})
        fleet.start_router()
        worker = fleet.add_vllm_worker("us", embedded_model_dir, extra_env={
            "APPLIANCE_WORKER__KV_CACHE_GIB": "1", "APPLIANCE_WORKER__STARTUP_TIMEOUT_S": "900"})
        rows = fleet.wait_healthy(timeout_s=900)
        row = next(r for r in rows if r["url"] == worker.advertised)
        assert row["region"] == "us" and embedded_model_dir.name in row["models"]

        url, headers = fleet.router_url("eu"), {"Authorization": f"Bearer {fleet.api_key}", "X-Region": "eu"}
        body = {"model": embedded_model_dir.name, "max_tokens": 12, "temperature": 0,
                "messages": [{"role": "user", "content": "Name one colour."}]}

        def ask() -> tuple[dict, list[str]]:
            answer = httpx.post(f"{url}/v1/chat/completions", json=body, headers=headers, timeout=300).json()
            with httpx.stream("POST", f"{url}/v1/chat/completions", json={**body, "stream": True}, headers=headers, timeout=300) as r:
                events = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
            return answer, events

        answer, events = bed.call("eu", ask)
    assert answer["choices"][0]["message"]["content"].strip()
    assert events[-1] == "[DONE]"
    assert "".join(json.loads(e)["choices"][0]["delta"].get("content") or "" for e in events[:-1] if json.loads(e)["choices"]).strip()
