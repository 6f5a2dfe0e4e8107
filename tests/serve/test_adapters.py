"""Adapter placement against fake workers: publish loads, requests route to holders, on-demand loads, LRU unloads."""

from __future__ import annotations

import asyncio

import httpx


def _loads(fake) -> list[str]:
    return [r["model"] for r in fake.received() if r["path"] == "/v1/load_lora_adapter"]


async def test_publish_loads_and_routes_to_holder(fake_factory, router_factory):
    # Bounded replicas (the version behind an alias on every worker is tests/serve/test_replicas.py).
    a, b = fake_factory("base"), fake_factory("base")
    router = await router_factory([a, b], adapter_replicas=1, replicate_promoted=False)
    admin = router.admin_headers()
    async with httpx.AsyncClient(base_url=router.url) as c:
        r = await c.post("/admin/adapters", json={"name": "legal-v1", "path": "/adapters/legal/1", "aliases": ["legal"]}, headers=admin)
        assert r.status_code == 200 and len(r.json()["workers"]) == 1
        holder, other = (a, b) if _loads(a) else (b, a)
        assert _loads(holder) == ["legal-v1"] and _loads(other) == []
        assert next(x for x in holder.received() if x["path"] == "/v1/load_lora_adapter")["lora_path"] == "/adapters/legal/1"
        for model in ("legal-v1", "legal"):
            for _ in range(4):
                r = await c.post("/v1/chat/completions", json={"model": model})
                assert r.status_code == 200, r.text
                assert r.json()["served_by"] == holder.url.replace("http://127.0.0.1:", "fake-")
        # An alias reaches the worker as the adapter's own name.
        assert {r["model"] for r in holder.received() if r["path"] == "/v1/chat/completions"} == {"legal-v1"}
        ids = {m["id"] for m in (await c.get("/v1/models")).json()["data"]}
        assert {"base", "legal-v1", "legal"} <= ids
        listed = (await c.get("/admin/adapters", headers=admin)).json()
        assert listed[0]["name"] == "legal-v1" and listed[0]["aliases"] == ["legal"]
        assert (await c.delete("/admin/adapters/legal-v1", headers=admin)).status_code == 200
        assert [r["model"] for r in holder.received() if r["path"] == "/v1/unload_lora_adapter"] == ["legal-v1"]
        assert (await c.post("/v1/chat/completions", json={"model": "legal-v1"})).status_code == 404
        assert (await c.delete("/admin/adapters/legal-v1", headers=admin)).status_code == 404


async def test_load_on_demand_when_no_holder_is_healthy(fake_factory, router_factory):
    a, b = fake_factory("base"), fake_factory("base")
    router = await router_factory([a, b])
    admin = router.admin_headers()
    async with httpx.AsyncClient(base_url=router.url) as c:
        await c.post("/admin/adapters", json={"name": "x", "path": "/p/x"}, headers=admin)
        holder, other = (a, b) if _loads(a) else (b, a)
        holder.control(unhealthy=True)
        workers = []
        for _ in range(100):
            workers = (await c.get("/admin/workers", headers=admin)).json()
            if not all(w["healthy"] for w in workers):
                break
            await asyncio.sleep(0.05)
        r = await c.post("/v1/chat/completions", json={"model": "x"})
        assert r.status_code == 200 and r.json()["served_by"] == other.url.replace("http://127.0.0.1:", "fake-")
        assert _loads(other) == ["x"]


async def test_lru_unload_beyond_the_bound(fake_factory, router_factory):
    fake = fake_factory("base")
    router = await router_factory([fake], max_adapters_per_worker=2)
    admin = router.admin_headers()
    async with httpx.AsyncClient(base_url=router.url) as c:
        for name in ("a1", "a2"):
            await c.post("/admin/adapters", json={"name": name, "path": f"/p/{name}"}, headers=admin)
        assert (await c.post("/v1/chat/completions", json={"model": "a1"})).status_code == 200  # a2 is now the LRU
        await c.post("/admin/adapters", json={"name": "a3", "path": "/p/a3"}, headers=admin)
        assert [r["model"] for r in fake.received() if r["path"] == "/v1/unload_lora_adapter"] == ["a2"]
        # a2 is still published: asking for it loads it again (evicting the LRU, a1).
        assert (await c.post("/v1/chat/completions", json={"model": "a2"})).status_code == 200
        assert _loads(fake) == ["a1", "a2", "a3", "a2"]
        rows = (await c.get("/admin/workers", headers=admin)).json()
        assert rows[0]["adapters"] == ["a2", "a3"]


async def test_publish_refused_by_every_worker_is_an_error(fake_factory, router_factory):
    fake = fake_factory("base")
    router = await router_factory([fake])
    admin = router.admin_headers()
    async with httpx.AsyncClient(base_url=router.url) as c:
        r = await c.post("/admin/adapters", json={"name": "bad", "path": ""}, headers=admin)
        assert r.status_code == 400  # validation: empty path
        fake.control(refuse_loads=True)
        r = await c.post("/admin/adapters", json={"name": "nowhere", "path": "/does/not/exist"}, headers=admin)
        assert r.status_code == 502 and "no adapter found at /does/not/exist" in r.json()["error"]["message"]
        assert (await c.get("/admin/adapters", headers=admin)).json() == []  # a refused adapter is not kept
        fake.control(refuse_loads=False)
        await c.post("/admin/adapters", json={"name": "dup", "path": "/p"}, headers=admin)
        r = await c.post("/admin/adapters", json={"name": "other", "path": "/q", "aliases": ["dup"]}, headers=admin)
        assert r.status_code == 409


async def test_hot_adapter_spreads_to_another_worker(fake_factory, router_factory):
    a, b = fake_factory("base", "--delay-s", "0.6"), fake_factory("base", "--delay-s", "0.6")
    router = await router_factory([a, b], adapter_replicas=1, max_adapter_replicas=2, worker_capacity=1)
    admin = router.admin_headers()
    async with httpx.AsyncClient(base_url=router.url, timeout=30) as c:
        await c.post("/admin/adapters", json={"name": "hot", "path": "/p/hot"}, headers=admin)
        assert len(_loads(a) + _loads(b)) == 1
        # Two requests at once fill the single holder (capacity 1): the router loads it on the other worker too.
        codes = await asyncio.gather(*(c.post("/v1/chat/completions", json={"model": "hot"}) for _ in range(3)))
        assert [r.status_code for r in codes] == [200, 200, 200]
        for _ in range(100):
            if _loads(a) == ["hot"] and _loads(b) == ["hot"]:
                break
            await asyncio.sleep(0.05)
        else:
            raise AssertionError(f"hot adapter not spread: {_loads(a)} {_loads(b)}")


def _paths(fake, path: str) -> list[str]:
    return [r["model"] for r in fake.received() if r["path"] == path]


async def test_publishing_a_new_version_moves_its_alias(fake_factory, router_factory):
    # Before: 409 "alias already names adapter ...; unpublish it first", and `run-latest` stayed on v1 for ever.
    fake = fake_factory("base")
    router = await router_factory([fake])
    admin = router.admin_headers()
    async with httpx.AsyncClient(base_url=router.url, timeout=10) as c:
        answers = []
        for version in (1, 2, 3):
            r = await c.post("/admin/adapters", json={"name": f"run-v{version}", "path": f"/a/{version}", "aliases": ["run-latest"]},
                             headers=admin)
            assert r.status_code == 200, r.text
            answers.append((await c.post("/v1/chat/completions", json={"model": "run-latest"})).json()["model"])
        old = await c.post("/v1/chat/completions", json={"model": "run-v1"})
        listed = {a["name"]: a["aliases"] for a in (await c.get("/admin/adapters", headers=admin)).json()}
    assert answers == ["run-v1", "run-v2", "run-v3"]  # the alias answers from the newest version each time
    assert old.status_code == 200 and old.json()["model"] == "run-v1"  # the old version still answers by its own name
    assert listed == {"run-v1": [], "run-v2": [], "run-v3": ["run-latest"]}


async def test_a_failed_publish_leaves_the_alias_where_it_was(fake_factory, router_factory):
    fake = fake_factory("base")
    router = await router_factory([fake])
    admin = router.admin_headers()
    async with httpx.AsyncClient(base_url=router.url, timeout=10) as c:
        await c.post("/admin/adapters", json={"name": "run-v1", "path": "/a/1", "aliases": ["run-latest"]}, headers=admin)
        fake.control(refuse_loads=True)
        refused = await c.post("/admin/adapters", json={"name": "run-v2", "path": "/a/2", "aliases": ["run-latest"]}, headers=admin)
        answer = await c.post("/v1/chat/completions", json={"model": "run-latest"})
    assert refused.status_code == 502
    assert answer.status_code == 200 and answer.json()["model"] == "run-v1"


async def test_an_adapter_with_requests_in_flight_is_not_unloaded(fake_factory, router_factory):
    # One worker with room for one adapter; a slow request is in flight on run-v1 (through the alias).
    fake = fake_factory("base", "--delay-s", "1.0")
    router = await router_factory([fake], max_adapters_per_worker=1, max_retries=0)
    admin = router.admin_headers()
    async with httpx.AsyncClient(base_url=router.url, timeout=30) as c:
        await c.post("/admin/adapters", json={"name": "run-v1", "path": "/a/1", "aliases": ["run-latest"]}, headers=admin)
        in_flight = asyncio.create_task(c.post("/v1/chat/completions", json={"model": "run-latest"}))
        while not any(r["path"] == "/v1/chat/completions" for r in fake.received()):
            await asyncio.sleep(0.02)
        # Publishing v2 needs v1's slot: it must not take it while v1 answers someone (v2 then loads on demand).
        moved = await c.post("/admin/adapters", json={"name": "run-v2", "path": "/a/2", "aliases": ["run-latest"]}, headers=admin)
        unloads_during = _paths(fake, "/v1/unload_lora_adapter")
        # Unpublishing v1 while its request runs: it is forgotten at once, unloaded only after the request ends.
        gone = await c.delete("/admin/adapters/run-v1", headers=admin)
        unloads_before_end = _paths(fake, "/v1/unload_lora_adapter")
        first = await in_flight
        for _ in range(100):
            if _paths(fake, "/v1/unload_lora_adapter"):
                break
            await asyncio.sleep(0.05)
        newest = await c.post("/v1/chat/completions", json={"model": "run-latest"})
    assert moved.status_code == 200 and gone.status_code == 200
    assert unloads_during == [] and unloads_before_end == []
    assert first.status_code == 200 and first.json()["model"] == "run-v1"
    assert _paths(fake, "/v1/unload_lora_adapter")[0] == "run-v1"
    assert newest.status_code == 200 and newest.json()["model"] == "run-v2"
