"""Data residency (serve/residency.py): an adapter limited to regions is placed and routed only on trusted workers of
those operator-assigned regions, answers 503 naming why when none is up (never another region), and keeps its regions
across a router restart; a joined worker's own region claim is not enough. Real router, fake workers, the CLI."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys

import httpx
from typer.testing import CliRunner

from fedllm.appliance.cli import app
from fedllm.core.adapter_registry import AdapterRegistry
from fedllm.testing.factories import REPO, wait_until_async
from tests.serve.conftest import wait_http

KEY = "joined-worker-key-0123456789"


def _seen(fake, model: str) -> list[str]:
    """The paths on which `fake` received anything for `model`."""
    return [r["path"] for r in fake.received() if r["model"] == model]


def _restart(fake) -> None:
    """Start the stopped fake `fake` again on its own port (a worker coming back)."""
    port = fake.url.rsplit(":", 1)[1]
    fake.proc = subprocess.Popen([sys.executable, "-m", "fedllm.testing.fake_vllm", "--port", port, "--model", fake.model,
                                  "--name", f"fake-{port}"], cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_http(f"{fake.url}/health", proc=fake.proc)


async def _ask(c: httpx.AsyncClient, model: str) -> httpx.Response:
    return await c.post("/v1/chat/completions", json={"model": model})


async def test_an_adapter_limited_to_a_region_never_reaches_another(fake_factory, router_factory, tmp_path):
    eu, us = fake_factory("base"), fake_factory("base")
    workers = [{"url": eu.url, "region": "eu"}, {"url": us.url, "region": "us"}]
    home = tmp_path / "home"
    router = await router_factory(workers, home=home, policy="round_robin", max_retries=2)
    admin = router.admin_headers()
    async with httpx.AsyncClient(base_url=router.url, timeout=10) as c:
        r = await c.post("/admin/adapters", json={"name": "gdpr-v1", "path": "/a/1", "aliases": ["gdpr-latest"],
                                                  "regions": ["eu"]}, headers=admin)
        assert r.status_code == 200, r.text
        assert r.json()["regions"] == ["eu"] and len(r.json()["workers"]) == 1
        # A client in the US asking for it (x-region) is still served in the EU.
        answers = [await c.post("/v1/chat/completions", json={"model": m}, headers={"x-region": "us"})
                   for m in ("gdpr-latest", "gdpr-v1") * 5]
        assert {a.status_code for a in answers} == {200}
        assert {a.json()["served_by"] for a in answers} == {eu.url.replace("http://127.0.0.1:", "fake-")}
        listed = next(a for a in (await c.get("/admin/adapters", headers=admin)).json() if a["name"] == "gdpr-v1")
        assert listed["regions"] == ["eu"]

        # The EU worker stops: 503 with the reason, the US worker is never tried.
        eu.stop()
        await wait_until_async(lambda: not any(w.healthy for w in router.app.state.registry.workers.values()
                                               if w.region == "eu"), what="the EU worker marked down")
        down = await _ask(c, "gdpr-latest")
        assert down.status_code == 503
        message = down.json()["error"]["message"]
        assert "gdpr-v1" in message and "gdpr-latest" in message and "region(s) eu" in message and "never served from another region" in message
        assert down.headers.get("retry-after")
        assert (await _ask(c, "base")).status_code == 200  # the base model is not limited: the US worker answers it

        # It comes back: the promoted version is loaded on it again (ahead), and requests answer.
        _restart(eu)
        await wait_until_async(lambda: "/v1/load_lora_adapter" in _seen(eu, "gdpr-v1"), what="gdpr-v1 loaded on the EU worker again")
        await wait_until_async(lambda: any(w.healthy and "gdpr-v1" in w.adapters for w in router.app.state.registry.workers.values()
                                           if w.region == "eu"), what="the EU worker back, holding gdpr-v1")
        back = await _ask(c, "gdpr-latest")
        assert back.status_code == 200 and back.json()["model"] == "gdpr-v1"
    assert _seen(us, "gdpr-v1") == []  # never loaded, never asked

    # The regions are part of the persisted publication: a new router on the same home keeps them.
    saved = json.loads((home / "router" / "publications.json").read_text())
    assert saved["adapters"]["gdpr-v1"]["regions"] == ["eu"]
    second = await router_factory(workers, home=home, policy="round_robin")
    async with httpx.AsyncClient(base_url=second.url, timeout=10) as c:
        listed = next(a for a in (await c.get("/admin/adapters", headers=second.admin_headers())).json() if a["name"] == "gdpr-v1")
        answers = [await _ask(c, "gdpr-latest") for _ in range(6)]
    assert listed["regions"] == ["eu"] and listed["aliases"] == ["gdpr-latest"]
    assert {a.json()["served_by"] for a in answers} == {eu.url.replace("http://127.0.0.1:", "fake-")}
    assert _seen(us, "gdpr-v1") == []


def _invoke(home, *args: str):
    return CliRunner().invoke(app, ["--home", str(home), *args])


async def test_a_joined_worker_counts_for_residency_only_once_the_operator_assigned_its_region(fake_factory, router_factory, tmp_path):
    home = tmp_path / "cli-home"
    src = tmp_path / "src"
    src.mkdir()
    (src / "adapter_config.json").write_text("{}")
    (src / "adapter_model.safetensors").write_bytes(b"")
    AdapterRegistry(home / "adapters").register("legal", src, {})
    us = fake_factory("base")
    joining = fake_factory("base", api_key=KEY)
    router = await router_factory([{"url": us.url, "region": "us"}], home=home, place_adapters_on_joined=True, canary_prompts=0)
    admin = router.admin_headers()
    async with httpx.AsyncClient(base_url=router.url, timeout=10) as c:
        joined = await c.post("/admin/workers", json={"url": joining.url, "api_key": KEY, "region": "eu"},
                              headers={"Authorization": f"Bearer {router.join_token}"})
        wid = joined.json()["id"]
        # Its claim of "eu" does not make it an EU worker: nowhere to place an EU-only adapter.
        claimed = await asyncio.to_thread(_invoke, home, "adapters", "publish", "legal", "--regions", "eu", "--router", router.url)
        assert claimed.exit_code != 0
        said = " ".join(claimed.output.split())
        assert "no trusted worker has an operator-assigned region among them" in said and "eu (claimed, unconfirmed)" in said
        bad = await c.post("/admin/adapters", json={"name": "x", "path": "/x", "regions": ["eu west!"]}, headers=admin)
        static_id = next(w for w in router.app.state.registry.workers if w != wid)
        static = await c.post(f"/admin/workers/{static_id}/region", json={"region": "eu"}, headers=admin)
        unknown = await c.post("/admin/workers/w-nope/region", json={"region": "eu"}, headers=admin)
        as_worker = await c.post(f"/admin/workers/{wid}/region", json={"region": "eu"}, headers={"Authorization": f"Bearer {router.join_token}"})
        row = next(w for w in (await c.get("/admin/workers", headers=admin)).json() if w["id"] == wid)
        assert (row["region"], row["region_assigned"]) == ("eu", False)

        # The operator confirms it: now the adapter is placed there, and only there.
        confirmed = await asyncio.to_thread(_invoke, home, "fleet", "region", wid, "eu", "--router", router.url)
        assert confirmed.exit_code == 0 and f"worker {wid} is in region eu" in confirmed.output
        published = await asyncio.to_thread(_invoke, home, "adapters", "publish", "legal", "--regions", "eu", "--router", router.url)
        assert published.exit_code == 0, published.output
        assert "regions eu" in published.output and wid in published.output
        answers = [await _ask(c, "legal-latest") for _ in range(4)]
        mismatch = await c.post("/admin/adapters", json={"name": "other-v1", "path": "/o", "base_model": "other", "regions": ["eu"]},
                                headers=admin)
    listed = await asyncio.to_thread(_invoke, home, "adapters", "list", "--router", router.url)
    assert "(regions eu only)" in " ".join(listed.output.split())
    shown = await asyncio.to_thread(_invoke, home, "adapters", "show", "legal", "--json", "--router", router.url)
    assert shown.exit_code == 0, shown.output
    assert json.loads(shown.stdout)["served"]["regions"] == ["eu"]
    assert bad.status_code == 400 and "'eu west!' is not a region label" in bad.json()["error"]["message"]
    assert static.status_code == 409 and "serve.workers[].region" in static.json()["error"]["message"]
    assert unknown.status_code == 404 and as_worker.status_code == 401
    assert {a.json()["served_by"] for a in answers} == {joining.url.replace("http://127.0.0.1:", "fake-")}
    assert mismatch.status_code == 409 and "base model 'other'" in mismatch.json()["error"]["message"]
    assert _seen(us, "legal-v1") == []

    # The operator's assignment outlives the router: after a restart the worker joins again (now claiming "us") and is
    # in "eu", where the restored adapter is loaded on it again.
    second = await router_factory([{"url": us.url, "region": "us"}], home=home, place_adapters_on_joined=True, canary_prompts=0)
    async with httpx.AsyncClient(base_url=second.url, timeout=10) as c:
        again = await c.post("/admin/workers", json={"url": joining.url, "api_key": KEY, "region": "us"},
                             headers={"Authorization": f"Bearer {second.join_token}"})
        row = next(w for w in (await c.get("/admin/workers", headers=second.admin_headers())).json() if w["id"] == again.json()["id"])
        answer = await _ask(c, "legal-latest")
    assert (row["region"], row["region_assigned"]) == ("eu", True)
    assert answer.status_code == 200 and answer.json()["served_by"] == joining.url.replace("http://127.0.0.1:", "fake-")
    assert _seen(us, "legal-v1") == []
