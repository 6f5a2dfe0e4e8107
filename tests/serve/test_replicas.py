"""Every eligible replica (serve/replicas.py): the version behind an alias is on every trusted worker of its base model
that can hold it, loaded ahead of its traffic, joiners included; through the real router and fake workers."""

from __future__ import annotations

import asyncio

import httpx

from fedllm.testing.factories import wait_until_async

KEY = "joined-worker-key-0123456789"


def _loads(fake) -> list[str]:
    return [r["model"] for r in fake.received() if r["path"] == "/v1/load_lora_adapter"]


def _served(fake, model: str) -> int:
    return sum(1 for r in fake.received() if r["path"] == "/v1/chat/completions" and r["model"] == model)


def _name(fake) -> str:
    return fake.url.replace("http://127.0.0.1:", "fake-")


async def _row(c: httpx.AsyncClient, router, name: str) -> dict:
    return next(a for a in (await c.get("/admin/adapters", headers=router.admin_headers())).json() if a["name"] == name)


async def test_a_promotion_loads_on_every_eligible_worker_and_requests_never_wait_on_a_load(fake_factory, router_factory):
    a, b, other = fake_factory("base"), fake_factory("base"), fake_factory("other-base")
    router = await router_factory([a, b, other], adapter_replicas=1, policy="round_robin")
    admin = router.admin_headers()
    async with httpx.AsyncClient(base_url=router.url, timeout=10) as c:
        promoted = await c.post("/admin/adapters", json={"name": "run-v1", "path": "/a/1", "aliases": ["run-latest"],
                                                         "base_model": "base"}, headers=admin)
        # A version without an alias stays on demand: one replica (serve.adapter_replicas).
        plain = await c.post("/admin/adapters", json={"name": "side-v1", "path": "/s/1", "base_model": "base"}, headers=admin)
        answers = [await c.post("/v1/chat/completions", json={"model": "run-latest"}) for _ in range(6)]
        row = await _row(c, router, "run-v1")
    assert promoted.status_code == 200 and sorted(promoted.json()["workers"]) == sorted(row["workers"])
    assert len(row["workers"]) == 2  # both workers of its base model, not the one serving another model
    assert "run-v1" in _loads(a) and "run-v1" in _loads(b) and _loads(other) == []
    assert len(plain.json()["workers"]) == 1
    assert [r.status_code for r in answers] == [200] * 6
    assert {r.json()["served_by"] for r in answers} == {_name(a), _name(b)}  # the alias's traffic spreads over both
    assert row["loads"] == {"ahead": 2, "request": 0}  # no request waited on a load


async def test_a_worker_that_joins_after_a_promotion_gets_it_before_its_traffic(fake_factory, router_factory):
    static = fake_factory("base")
    joining = fake_factory("base", api_key=KEY)
    router = await router_factory([static], place_adapters_on_joined=True, canary_prompts=0, worker_capacity=1)
    admin = router.admin_headers()
    async with httpx.AsyncClient(base_url=router.url, timeout=10) as c:
        r = await c.post("/admin/adapters", json={"name": "run-v1", "path": "/a/1", "aliases": ["run-latest"]}, headers=admin)
        assert r.status_code == 200, r.text
        # It joins while its loads fail: it takes base-model traffic, never the alias's (it does not hold it).
        joining.control(refuse_loads=True)
        joined = await c.post("/admin/workers", json={"url": joining.url, "api_key": KEY, "max_loras": 3},
                              headers={"Authorization": f"Bearer {router.join_token}"})
        assert joined.status_code == 200, joined.text
        wid = joined.json()["id"]
        await wait_until_async(lambda: "run-v1" in _loads(joining), what="a load attempt on the joined worker")
        # Even with the holder full (capacity 1, six slow requests at once), where the policy alone would rather load
        # it on the idle joiner, the alias's requests wait for the holder.
        static.control(delay_s=0.3)
        answers = await asyncio.gather(*(c.post("/v1/chat/completions", json={"model": "run-latest"}) for _ in range(6)))
        static.control(delay_s=0)
        assert {r.json()["served_by"] for r in answers} == {_name(static)}
        assert (await c.post("/v1/chat/completions", json={"model": "base"})).status_code == 200
        assert _served(joining, "run-v1") == 0
        assert (await _row(c, router, "run-v1"))["loads"]["request"] == 0  # no request even tried to load it there
        # Its loads work again: the keeper retries, ahead of traffic.
        joining.control(refuse_loads=False)
        workers = router.app.state.registry.workers
        await wait_until_async(lambda: "run-v1" in workers[wid].adapters, what="the promoted version on the joiner")
        # The static worker leaves the alias's traffic: the first request to reach the joiner finds it loaded.
        static_id = next(w for w in workers if w != wid)
        assert (await c.post(f"/admin/workers/{static_id}/drain", headers=admin)).status_code == 200
        first = await c.post("/v1/chat/completions", json={"model": "run-latest"})
        row = await _row(c, router, "run-v1")
        workers = {w["id"]: w for w in (await c.get("/admin/workers", headers=admin)).json()}
    assert first.status_code == 200 and first.json()["served_by"] == _name(joining) and first.json()["model"] == "run-v1"
    assert row["loads"]["request"] == 0 and row["loads"]["ahead"] >= 3  # static, the joiner's refused try, its load
    log = [(r["path"], r["model"]) for r in joining.received() if r["model"] == "run-v1"]
    assert log[-2:] == [("/v1/load_lora_adapter", "run-v1"), ("/v1/chat/completions", "run-v1")]
    assert workers[wid]["max_adapters"] == 3


async def test_a_new_promotion_is_pushed_everywhere_and_a_worker_holds_at_most_its_max_loras(fake_factory, router_factory):
    a = fake_factory("base")
    b = fake_factory("base")
    # b declares room for one adapter (its vLLM --max-loras); a has serve.max_adapters_per_worker (4).
    router = await router_factory([{"url": a.url}, {"url": b.url, "max_loras": 1}], policy="round_robin")
    admin = router.admin_headers()
    async with httpx.AsyncClient(base_url=router.url, timeout=10) as c:
        for name in ("x", "y"):
            r = await c.post("/admin/adapters", json={"name": f"{name}-v1", "path": f"/{name}/1", "aliases": [f"{name}-latest"]},
                             headers=admin)
            assert r.status_code == 200, r.text
        r = await c.post("/admin/adapters", json={"name": "x-v2", "path": "/x/2", "aliases": ["x-latest"]}, headers=admin)
        workers = {w["url"]: w for w in (await c.get("/admin/workers", headers=admin)).json()}
        answers = [(await c.post("/v1/chat/completions", json={"model": "x-latest"})).json() for _ in range(4)]
        # A rollback promotes too: x-v1 goes back onto b's one slot ahead of its traffic.
        back = await c.post("/admin/adapters/x-latest/rollback", json={}, headers=admin)
        await wait_until_async(lambda: "x-v1" in _loads(b), what="x-v1 pushed to b after the rollback")
        await wait_until_async(lambda: any(w.url == b.url and w.adapters == {"x-v1"} for w in router.app.state.registry.workers.values()),
                               what="b holding x-v1")
        after = [(await c.post("/v1/chat/completions", json={"model": "x-latest"})).json() for _ in range(4)]
        rows = {a["name"]: a for a in (await c.get("/admin/adapters", headers=admin)).json()}
    # The new version of x went to both workers before the alias moved; b holds only it (its one slot).
    assert sorted(r.json()["workers"]) == sorted(w["id"] for w in workers.values())
    assert {"x-v1", "y-v1", "x-v2"} <= set(workers[a.url]["adapters"])
    assert workers[b.url]["adapters"] == ["x-v2"] and workers[b.url]["max_adapters"] == 1
    assert {ans["model"] for ans in answers} == {"x-v2"} and {ans["served_by"] for ans in answers} == {_name(a), _name(b)}
    assert back.json()["name"] == "x-v1"
    assert {ans["model"] for ans in after} == {"x-v1"} and {ans["served_by"] for ans in after} == {_name(a), _name(b)}
    assert all(row["loads"]["request"] == 0 for row in rows.values())


async def test_a_full_worker_makes_room_with_a_version_no_alias_names(fake_factory, router_factory):
    fake = fake_factory("base")
    router = await router_factory([{"url": fake.url, "max_loras": 2}])
    admin = router.admin_headers()
    async with httpx.AsyncClient(base_url=router.url, timeout=10) as c:
        await c.post("/admin/adapters", json={"name": "x-v1", "path": "/x/1", "aliases": ["x-latest"]}, headers=admin)
        await c.post("/admin/adapters", json={"name": "side-v1", "path": "/s/1"}, headers=admin)
        # side-v1 is the most recently used, x-v1 the least: still x-v1, promoted, stays when z-v1 needs a slot.
        assert (await c.post("/v1/chat/completions", json={"model": "side-v1"})).status_code == 200
        r = await c.post("/admin/adapters", json={"name": "z-v1", "path": "/z/1", "aliases": ["z-latest"]}, headers=admin)
        held = next(w for w in (await c.get("/admin/workers", headers=admin)).json())["adapters"]
    assert r.status_code == 200 and r.json()["workers"]
    assert held == ["x-v1", "z-v1"]
    assert [x["model"] for x in fake.received() if x["path"] == "/v1/unload_lora_adapter"] == ["side-v1"]
