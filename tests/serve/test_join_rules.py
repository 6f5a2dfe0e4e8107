"""What the join token allows (docs/CONTRACTS.md, "Join rules"), per-worker state after removal, where adapters go,
and what a 502 tells an API client: against the real router and fake workers as processes."""

from __future__ import annotations

import asyncio
import re

import httpx
import pytest

from fedllm.serve.worker_address import normalised_address, parse_worker_url

KEY = "any-key-the-fake-accepts-0123"  # a fake started without a key of its own accepts any


async def _join(c: httpx.AsyncClient, router, url: str, **body) -> httpx.Response:
    return await c.post("/admin/workers", json={"url": url, "api_key": KEY, **body},
                        headers={"Authorization": f"Bearer {router.join_token}"})


async def _rows(c: httpx.AsyncClient, router) -> list[dict]:
    return (await c.get("/admin/workers", headers=router.admin_headers())).json()


async def test_a_join_without_a_worker_key_is_refused(fake_factory, router_factory):
    router = await router_factory()
    fake = fake_factory("m")
    async with httpx.AsyncClient(base_url=router.url, timeout=10) as c:
        r = await _join(c, router, fake.url, api_key=None)
        assert r.status_code == 400 and "API key" in r.json()["error"]["message"]
        assert await _rows(c, router) == []


@pytest.mark.parametrize("tail", ["/v1", "/?x=", "?x=", "/#f", "/models"])
async def test_worker_urls_are_scheme_host_port_only_and_nothing_is_probed_or_echoed(fake_factory, router_factory, tail):
    router = await router_factory()
    fake = fake_factory("secret-model-name")
    async with httpx.AsyncClient(base_url=router.url, timeout=10) as c:
        r = await _join(c, router, fake.url + tail)
        userinfo = await _join(c, router, fake.url.replace("http://", "http://user:pw@"))
    for answer in (r, userinfo):
        assert answer.status_code == 400 and answer.json()["error"]["param"] == "url", answer.text
        assert "secret-model-name" not in answer.text


async def test_one_address_under_another_spelling_is_the_same_worker(fake_factory, router_factory):
    router = await router_factory()
    fake = fake_factory("m")
    port = fake.url.rsplit(":", 1)[1]
    async with httpx.AsyncClient(base_url=router.url, timeout=10) as c:
        first = await _join(c, router, f"http://127.0.0.1:{port}/")
        second = await _join(c, router, f"HTTP://[::ffff:127.0.0.1]:{port}")
        rows = await _rows(c, router)
    assert first.status_code == 200 and second.status_code == 200
    assert [(w["id"], w["url"]) for w in rows] == [(second.json()["id"], f"http://127.0.0.1:{port}")]


def test_normalised_address_is_one_key_per_address():
    same = ["http://Example.COM:80", "http://example.com", "http://example.com.:80/", "https://example.com:80"]
    assert {normalised_address(u) for u in same} == {"example.com:80"}
    assert normalised_address("https://[::FFFF:10.0.0.1]") == "10.0.0.1:443"
    assert normalised_address("http://[2001:DB8::1]:8100/") == "[2001:db8::1]:8100"
    assert normalised_address("http://127.1:8100") == "127.0.0.1:8100"
    for bad in ("ftp://h:1", "http://h:1/v1", "http://h:1?", "http://h:1/#x", "http://u@h:1", "http://:1", "http://h:0", "h:1"):
        with pytest.raises(ValueError):
            parse_worker_url(bad)


async def test_plain_http_beyond_loopback_is_refused_unless_the_operator_allows_it(router_factory):
    strict = await router_factory()
    lax = await router_factory(allow_plain_http_workers=True)
    outside = "http://192.0.2.1:8100"  # TEST-NET-1: never routed
    async with httpx.AsyncClient(base_url=strict.url, timeout=30) as c:
        refused = await _join(c, strict, outside)
    async with httpx.AsyncClient(base_url=lax.url, timeout=30) as c:
        allowed = await _join(c, lax, outside)
    assert refused.status_code == 400 and "serve.allow_plain_http_workers" in refused.json()["error"]["message"]
    assert allowed.status_code == 502  # past the rule; then it cannot be reached
    assert "192.0.2.1" not in re.sub(r"worker at \S+", "", allowed.json()["error"]["message"])


async def test_the_router_refuses_its_own_address(fake_factory, router_factory):
    fake = fake_factory("m")
    router = await router_factory([fake])  # its /v1/models lists m: on its own it would pass for a worker
    port = router.url.rsplit(":", 1)[1]
    async with httpx.AsyncClient(base_url=router.url, timeout=10) as c:
        answers = [await _join(c, router, f"http://{host}:{port}") for host in ("127.0.0.1", "localhost", "127.0.0.2", "[::1]")]
        rows = await _rows(c, router)
    for r in answers:
        assert r.status_code == 400 and "own address" in r.json()["error"]["message"], r.text
    assert len(rows) == 1 and rows[0]["static"]


async def test_the_fleet_size_and_a_workers_capacity_are_bounded(fake_factory, router_factory):
    router = await router_factory(max_workers=2, max_worker_capacity=32)
    a, b, c3 = fake_factory("m"), fake_factory("m"), fake_factory("m")
    async with httpx.AsyncClient(base_url=router.url, timeout=10) as c:
        greedy = await _join(c, router, a.url, capacity=10**9)
        first, second = await _join(c, router, a.url, capacity=32), await _join(c, router, b.url)
        third = await _join(c, router, c3.url)
        again = await _join(c, router, b.url)  # a worker already in the fleet may join again
    assert greedy.status_code == 400 and "serve.max_worker_capacity" in greedy.json()["error"]["message"]
    assert first.status_code == 200 and second.status_code == 200 and again.status_code == 200
    assert third.status_code == 409 and "serve.max_workers" in third.json()["error"]["message"]


def _per_worker_tables(app) -> dict[str, int]:
    from fedllm.serve.runtime_stats import per_worker_tables

    return per_worker_tables(app.state)


async def test_joining_and_leaving_200_times_leaves_no_per_worker_state(fake_factory, router_factory, tmp_path):
    fake = fake_factory("m")
    router = await router_factory(canary_prompts=0, hedge="on", allow_unverified=True)  # joined workers only
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    before = _per_worker_tables(router.app)
    ids = []
    async with httpx.AsyncClient(base_url=router.url, timeout=10) as c:
        for i in range(200):
            joined = (await _join(c, router, fake.url)).json()
            ids.append(joined["id"])
            chat = await c.post("/v1/chat/completions", json={"model": "m", "messages": [{"role": "user", "content": "hi"}]})
            assert chat.status_code == 200
            await c.get("/metrics")  # the outstanding gauge gets a series per worker
            gone = await c.delete(f"/admin/workers/{joined['id']}", headers={"Authorization": f"Bearer {joined['secret']}"})
            assert gone.status_code == 200
        exposition = (await c.get("/metrics")).text
        runtime = (await c.get("/admin/runtime", headers=router.admin_headers())).json()  # what an operator reads
    assert _per_worker_tables(router.app) == before
    assert not any(wid in exposition for wid in ids)
    assert runtime["tables"] == before and runtime["asyncio_tasks"] > 0


async def test_a_502_to_an_api_client_names_no_worker_address(fake_factory, router_factory, caplog):
    from fedllm.testing.factories import free_port

    fake = fake_factory("m")
    router = await router_factory([fake], max_retries=0, health_interval_s=60)
    (worker,) = router.app.state.registry.workers.values()
    port = str(free_port())
    worker.url = f"http://127.0.0.1:{port}"  # healthy when probed, then gone: the connection is refused
    async with httpx.AsyncClient(base_url=router.url, timeout=10) as c:
        failed = await c.post("/v1/chat/completions", json={"model": "m", "messages": [{"role": "user", "content": "hi"}]})
    assert failed.status_code == 502
    assert port not in failed.text and "127.0.0.1" not in failed.text
    assert any(port in r.getMessage() for r in caplog.records)  # the operator still sees which worker failed


# -- placement --
async def _adapter_rows(c, router) -> dict[str, dict]:
    return {a["name"]: a for a in (await c.get("/admin/adapters", headers=router.admin_headers())).json()}


async def test_adapters_go_only_to_trusted_workers_of_their_base_model(fake_factory, router_factory, tmp_path):
    base, other, joiner = fake_factory("base"), fake_factory("other"), fake_factory("base")
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    publish = {"path": str(adapter), "base_model": "base"}
    for opt_in, expected in ((False, {"static"}), (True, {"static", "joined"})):
        opt = {"place_adapters_on_joined": True} if opt_in else {}  # the default: joined workers get none
        router = await router_factory([base, other], canary_prompts=0, adapter_replicas=3, **opt)
        async with httpx.AsyncClient(base_url=router.url, timeout=10) as c:
            joined = (await _join(c, router, joiner.url)).json()["id"]
            r = await c.post("/admin/adapters", json={"name": f"a{opt_in}", **publish}, headers=router.admin_headers())
            assert r.status_code == 200, r.text
            static_base = next(w["id"] for w in await _rows(c, router) if w["static"] and w["models"] == ["base"])
            holders = set((await _adapter_rows(c, router))[f"a{opt_in}"]["workers"])
        assert holders == {static_base} | ({joined} if "joined" in expected else set())
        for fake in (base, joiner):  # the next router starts from workers without it
            httpx.post(f"{fake.url}/v1/unload_lora_adapter", json={"lora_name": f"a{opt_in}"}, timeout=5)


async def test_a_worker_refusing_an_adapter_load_is_skipped_for_the_next_one(fake_factory, router_factory, tmp_path):
    from fedllm.serve.errors import UpstreamError
    from fedllm.serve.placement import PublishedAdapter

    refuser, taker, holder = fake_factory("base"), fake_factory("base"), fake_factory("base")
    refuser.control(refuse_loads=True)
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    router = await router_factory([refuser, taker, holder], adapter_replicas=1)
    registry, placement = router.app.state.registry, router.app.state.placement
    by_url = {w.url: w for w in registry.workers.values()}
    # The placement's own verdict on a 4xx: try another worker (an UpstreamError), not a failed request.
    with pytest.raises(UpstreamError, match="refused adapter"):
        await placement.ensure_on(by_url[refuser.url], PublishedAdapter("probe", str(adapter), base_model="base"))
    async with httpx.AsyncClient(base_url=router.url, timeout=10) as c:
        taker.control(refuse_loads=True)  # so that the adapter lands on `holder`
        r = await c.post("/admin/adapters", json={"name": "ad", "path": str(adapter), "base_model": "base"}, headers=router.admin_headers())
        assert r.status_code == 200 and r.json()["workers"] == [by_url[holder.url].id], r.text
        taker.control(refuse_loads=False)
        holder.control(unhealthy=True)  # the holder drops out: the next request loads it elsewhere, on demand
        for _ in range(100):
            if not by_url[holder.url].healthy:
                break
            await asyncio.sleep(0.05)
        chats = [await c.post("/v1/chat/completions", json={"model": "ad", "messages": [{"role": "user", "content": "hi"}]})
                 for _ in range(4)]
    assert [r.status_code for r in chats] == [200] * 4, [r.text for r in chats]
    assert "ad" in by_url[taker.url].adapters and "ad" not in by_url[refuser.url].adapters


async def test_publish_version_sends_the_base_model(fake_factory, router_factory, tmp_path):
    from fedllm.core.adapter_registry import AdapterRegistry
    from fedllm.core.contracts.router_client import RouterClient

    base = fake_factory("smol-base")
    router = await router_factory([base])
    src = tmp_path / "src"
    src.mkdir()
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        (src / name).write_text("{}")
    version = AdapterRegistry(tmp_path / "adapters").register("tuned", src, {"base_model": str(tmp_path / "models" / "smol-base")})
    client = RouterClient(router.url, token=router.admin_token)
    answer = await asyncio.to_thread(client.publish_version, version)
    async with httpx.AsyncClient(base_url=router.url, timeout=10) as c:
        row = (await _adapter_rows(c, router))[version.served_name]
    assert row["base_model"] == "smol-base" and answer["workers"]
