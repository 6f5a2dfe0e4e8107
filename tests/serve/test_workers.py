"""Worker membership against the real router: join, heartbeat and leave through `RouterRegistration`."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from fedllm.core.contracts.router_client import RouterClient, ServiceUnavailable
from fedllm.serve.worker_launcher import RouterRegistration


def _cli(home, *args: str):
    from typer.testing import CliRunner

    from fedllm.appliance.cli import app

    return CliRunner().invoke(app, ["--home", str(home), *args])


async def _workers(router) -> list[dict]:
    async with httpx.AsyncClient() as client:
        return (await client.get(f"{router.url}/admin/workers", headers=router.admin_headers(), timeout=5)).json()


async def test_registration_heartbeats_and_deregisters(fake_factory, router_factory):
    # Arrange: a router with no worker, and a fake worker joining it with the join token.
    router = await router_factory()
    fake = fake_factory("m")
    membership = RouterRegistration(RouterClient(router.url), router.join_token, fake.url, "eu", ["m"], api_key=ANY_KEY)

    # Act
    worker_id = await asyncio.to_thread(membership.register)
    listed = await _workers(router)
    await asyncio.to_thread(membership.heartbeat)
    await asyncio.to_thread(membership.deregister)

    # Assert
    assert [(w["id"], w["url"], w["region"], w["models"]) for w in listed] == [(worker_id, fake.url, "eu", ["m"])]
    assert await _workers(router) == []


async def test_registration_with_a_wrong_token_is_refused_clearly(fake_factory, router_factory):
    router = await router_factory()
    fake = fake_factory("m")
    membership = RouterRegistration(RouterClient(router.url), "wrong", fake.url, "eu", ["m"])
    with pytest.raises(ServiceUnavailable, match="401") as refused:
        await asyncio.to_thread(membership.register)
    assert refused.value.status == 401


# Canaries come at random times among traffic (serve/canary.py); these settings make the first check come at once.
QUICK_CANARIES = {"canary_interval_s": 0.2, "canary_delay_s": 0, "canary_passes": 1}


async def _canary_verdict(router, worker_id: str, timeout_s: float = 20.0) -> str:
    """The worker's canary verdict once its first check is over."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    while True:
        row = next(w for w in await _workers(router) if w["id"] == worker_id)
        if row["canary"] not in ("pending", "cleared") or asyncio.get_running_loop().time() > deadline:
            return row["canary"]
        await asyncio.sleep(0.05)


def _bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


ANY_KEY = "any-key-the-fake-accepts-0123"  # a fake started without a key of its own accepts any


async def _join(c: httpx.AsyncClient, router, url: str, **body) -> httpx.Response:
    return await c.post("/admin/workers", json={"url": url, "api_key": ANY_KEY, **body}, headers=_bearer(router.join_token))


async def test_the_join_token_only_registers_and_each_worker_holds_its_own_secret(fake_factory, router_factory):
    router = await router_factory()
    a, b = fake_factory("m"), fake_factory("m")
    async with httpx.AsyncClient(base_url=router.url, timeout=10) as c:
        ja, jb = (await _join(c, router, a.url)).json(), (await _join(c, router, b.url)).json()
        for path in ("heartbeat", "drain"):
            assert (await c.post(f"/admin/workers/{ja['id']}/{path}", headers=_bearer(router.join_token))).status_code == 401
            assert (await c.post(f"/admin/workers/{ja['id']}/{path}", headers=_bearer(jb["secret"]))).status_code == 401
        assert (await c.delete(f"/admin/workers/{ja['id']}", headers=_bearer(router.join_token))).status_code == 401
        assert (await c.delete(f"/admin/workers/{ja['id']}", headers=_bearer(jb["secret"]))).status_code == 401
        assert (await c.post(f"/admin/workers/{ja['id']}/heartbeat", headers=_bearer(ja["secret"]))).status_code == 200
        assert (await c.post(f"/admin/workers/{ja['id']}/drain", headers=_bearer(ja["secret"]))).json()["draining"] is True
        assert (await c.delete(f"/admin/workers/{ja['id']}", headers=_bearer(ja["secret"]))).status_code == 200
        assert [w["id"] for w in await _workers(router)] == [jb["id"]]


async def test_the_router_keeps_only_the_models_it_sees_on_the_worker(fake_factory, router_factory):
    router = await router_factory()
    fake = fake_factory("real-model")
    async with httpx.AsyncClient(base_url=router.url, timeout=10) as c:
        claimed = await _join(c, router, fake.url, models=["real-model", "gpt-5"])
        unreachable = await _join(c, router, "http://127.0.0.1:9", models=["m"])
        honest = await _join(c, router, fake.url)
    assert claimed.status_code == 400 and "gpt-5" in claimed.json()["error"]["message"]
    assert unreachable.status_code == 502 and "cannot verify" in unreachable.json()["error"]["message"]
    assert honest.status_code == 200 and honest.json()["models"] == ["real-model"]
    assert [(w["url"], w["models"]) for w in await _workers(router)] == [(fake.url, ["real-model"])]


async def test_a_joined_worker_cannot_claim_adapters_the_router_did_not_load(fake_factory, router_factory):
    router = await router_factory(allow_unverified=True)  # no trusted worker: its base model may serve
    fake = fake_factory("m")
    httpx.post(  # loaded behind the router's back
        f"{fake.url}/v1/load_lora_adapter", json={"lora_name": "someone-v1", "lora_path": "/x"}, timeout=5)
    async with httpx.AsyncClient(base_url=router.url, timeout=10) as c:
        assert (await _join(c, router, fake.url)).status_code == 200
        r = await c.post("/v1/chat/completions", json={"model": "someone-v1", "messages": []})
    assert r.status_code == 404
    assert (await _workers(router))[0]["adapters"] == []


async def test_static_workers_are_never_removed(fake_factory, router_factory):
    fake = fake_factory("m")
    router = await router_factory([fake])
    (wid,) = router.app.state.registry.workers
    async with httpx.AsyncClient(base_url=router.url, timeout=10) as c:
        refused = await c.delete(f"/admin/workers/{wid}", headers=router.admin_headers())
        taken = await _join(c, router, fake.url)  # nor replaced by a joiner claiming its URL
    assert refused.status_code == 409 and "serve.workers" in refused.json()["error"]["message"]
    assert taken.status_code == 409
    assert [(w["id"], w["static"]) for w in await _workers(router)] == [(wid, True)]


async def test_a_drained_worker_cannot_undrain_itself_by_joining_again(fake_factory, router_factory):
    router = await router_factory()
    fake = fake_factory("m")
    async with httpx.AsyncClient(base_url=router.url, timeout=10) as c:
        first = (await _join(c, router, fake.url)).json()
        await c.post(f"/admin/workers/{first['id']}/drain", headers=router.admin_headers())
        again = await _join(c, router, fake.url)
        served = await c.post("/v1/chat/completions", json={"model": "m", "messages": []})
    rows = await _workers(router)
    assert again.status_code == 200 and again.json()["id"] != first["id"]
    assert [(w["id"], w["draining"]) for w in rows] == [(again.json()["id"], True)]
    assert served.status_code == 503


async def test_worker_ids_are_random_and_not_reused_after_a_restart(fake_factory, router_factory, tmp_path):
    fake = fake_factory("m")
    ids = []
    for _ in range(2):  # the same home and settings: a restarted router
        router = await router_factory(home=tmp_path / "same-home")
        async with httpx.AsyncClient(base_url=router.url, timeout=10) as c:
            ids.append((await _join(c, router, fake.url)).json()["id"])
    assert ids[0] != ids[1] and not {"w1", "w2"} & set(ids)


async def test_the_router_sends_each_worker_its_own_api_key(fake_factory, router_factory, tmp_path):
    # Arrange: a static worker and a joining one, each guarding /v1 with its own key (as vLLM --api-key does).
    static = fake_factory("m", api_key="static-worker-key-0123456789")
    joining = fake_factory("m", api_key="joined-worker-key-0123456789")
    router = await router_factory([{"url": static.url, "api_key": "static-worker-key-0123456789"}], policy="round_robin",
                                  **QUICK_CANARIES)
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    async with httpx.AsyncClient(base_url=router.url, timeout=10) as c:
        # Act
        keyless = await _join(c, router, joining.url, api_key=None)
        wrong = await _join(c, router, joining.url, api_key="not-the-worker-key-0123456789")
        joined = await _join(c, router, joining.url, api_key="joined-worker-key-0123456789")
        verdict = await _canary_verdict(router, joined.json()["id"])
        user = {"model": "m", "messages": [{"role": "user", "content": "user-q"}]}
        chats = [await c.post("/v1/chat/completions", json=user) for _ in range(6)]
        published = await c.post("/admin/adapters", json={"name": "a-v1", "path": str(adapter)}, headers=router.admin_headers())
        direct = await c.post(f"{joining.url}/v1/chat/completions", json={"model": "m", "messages": []})

    # Assert
    assert keyless.status_code == 400 and "API key" in keyless.json()["error"]["message"]
    assert wrong.status_code == 502 and "key" in wrong.json()["error"]["message"]
    assert joined.status_code == 200 and verdict == "passed"
    assert [r.status_code for r in chats] == [200] * 6
    assert published.status_code == 200 and published.json()["workers"]
    assert direct.status_code == 401  # reached directly, without its key, the worker answers nothing
    user_requests = [sum(r.get("prompt") == "user-q" for r in fake.received()) for fake in (static, joining)]
    assert sum(user_requests) == 6 and min(user_requests) >= 1  # both workers served, each reached with its key


async def test_a_lying_worker_is_quarantined_by_canaries_and_an_honest_one_keeps_serving(fake_factory, router_factory):
    # Arrange: a trusted (static) worker, then two joiners through the join token: one honest, one forging answers.
    trusted = fake_factory("m")
    router = await router_factory([trusted], policy="round_robin", canary_prompts=2, **QUICK_CANARIES)
    honest, liar = fake_factory("m"), fake_factory("m", "--forge", "Send your password to evil.example")
    async with httpx.AsyncClient(base_url=router.url, timeout=10) as c:
        # Act
        ids = [(await _join(c, router, fake.url)).json()["id"] for fake in (honest, liar)]
        verdicts = [await _canary_verdict(router, wid) for wid in ids]
        user = {"model": "m", "messages": [{"role": "user", "content": "user-q"}]}
        answers = [await c.post("/v1/chat/completions", json=user) for _ in range(9)]
        rows = {w["id"]: w for w in await _workers(router)}

    # Assert
    assert verdicts == ["passed", "failed"]
    assert rows[ids[1]]["quarantined"] is True and rows[ids[0]]["quarantined"] is False
    assert [r.status_code for r in answers] == [200] * 9
    assert all(r.json()["choices"][0]["message"]["content"] == "tok0 tok1 tok2 tok3" for r in answers)
    user_requests = {name: sum(r.get("prompt") == "user-q" for r in fake.received())
                     for name, fake in (("trusted", trusted), ("honest", honest), ("liar", liar))}
    assert user_requests["liar"] == 0 and user_requests["honest"] >= 3 and sum(user_requests.values()) == 9


async def test_an_operator_clears_a_quarantined_worker(fake_factory, router_factory, tmp_path):
    trusted = fake_factory("m")
    router = await router_factory([trusted], policy="round_robin", home=tmp_path / "router-home", **QUICK_CANARIES)
    liar = fake_factory("m", "--forge", "forged")
    async with httpx.AsyncClient(base_url=router.url, timeout=10) as c:
        first = (await _join(c, router, liar.url)).json()
        wid = first["id"]
        assert await _canary_verdict(router, wid) == "failed"
        # Joining again does not shed the quarantine: it is refused (serve/quarantine.py).
        again = await _join(c, router, liar.url)
        assert again.status_code == 403 and (await _workers(router))[-1]["quarantined"] is True
        refused = await c.post(f"/admin/workers/{wid}/clear", headers=_bearer(first["secret"]))
    listed = await asyncio.to_thread(_cli, tmp_path / "router-home", "fleet", "--router", router.url)
    # The operator fixed the worker before clearing it: a worker still forging is caught again by the next periodic
    # canary (that re-quarantine raced the row read below in a CI run)
    liar.control(forge=None)
    cleared = await asyncio.to_thread(_cli, tmp_path / "router-home", "fleet", "clear", wid, "--router", router.url)
    assert refused.status_code == 401  # only the operator clears
    assert "QUARANTINED" in listed.output
    assert cleared.exit_code == 0 and f"worker {wid} cleared" in cleared.output
    row = next(w for w in await _workers(router) if w["id"] == wid)
    assert row["quarantined"] is False


async def test_canaries_run_periodically_and_catch_a_worker_that_starts_lying_later(fake_factory, router_factory):
    trusted, joiner = fake_factory("m"), fake_factory("m")
    router = await router_factory([trusted], **QUICK_CANARIES)
    async with httpx.AsyncClient(base_url=router.url, timeout=10) as c:
        wid = (await _join(c, router, joiner.url)).json()["id"]
        assert await _canary_verdict(router, wid) == "passed"
        joiner.control(forge="now I lie")  # honest on joining, forging afterwards
        for _ in range(200):
            row = next(w for w in await _workers(router) if w["id"] == wid)
            if row["quarantined"]:
                break
            await asyncio.sleep(0.05)
    assert (row["quarantined"], row["canary"]) == (True, "failed")


async def test_a_joined_worker_heartbeats_and_leaves_with_its_own_secret_not_the_join_token(fake_factory, router_factory):
    router = await router_factory()
    fake = fake_factory("m")
    membership = RouterRegistration(RouterClient(router.url), router.join_token, fake.url, "eu", ["m"], api_key=ANY_KEY)
    await asyncio.to_thread(membership.register)
    router.app.state.join_token = "rotated-join-token-0123456789"  # the join token is not needed after joining
    await asyncio.to_thread(membership.heartbeat)
    await asyncio.to_thread(membership.deregister)
    assert await _workers(router) == []
