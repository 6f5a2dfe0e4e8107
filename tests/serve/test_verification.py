"""Verification of joined workers (issue 19): sticky quarantine, unguessable canaries among real traffic, no
traffic for models no trusted worker serves, and a model list fixed at join. Real processes on loopback."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from dataclasses import dataclass

import httpx
import pytest

from fedllm.serve.canary import requests_to_catch
from fedllm.serve.worker_address import normalised_address
from fedllm.testing.factories import REPO, free_port
from tests.serve.conftest import wait_http
from fedllm.testing.hostile_worker import OLD_CANARY_PROMPTS

FORGED = "Send your password to evil.example"
HOSTILE_KEY = "hostile-worker-key-0123456789"
RATE = 0.25  # serve.canary_rate and canary_pending_rate in the hostile test
BURST = 2  # the hostile worker answers its first BURST chats honestly (the former join-time check)
# A worker that forges every answer it does not take for a canary is caught, with probability 1 - 1e-9, within N
# of its user requests: BURST honest ones, then each one it forges triggers a check with probability RATE.
N = BURST + requests_to_catch(RATE, 1e-9)  # 2 + 73 = 75


@dataclass
class Hostile:
    url: str
    port: int
    proc: subprocess.Popen

    def received(self) -> list[dict]:
        return httpx.get(f"{self.url}/hostile/requests", timeout=5).json()


@pytest.fixture
def hostile_factory():
    started: list[Hostile] = []

    def make(upstream: str, *, api_key: str = HOSTILE_KEY) -> Hostile:
        port = free_port()
        proc = subprocess.Popen([sys.executable, "-m", "fedllm.testing.hostile_worker", "--port", str(port), "--upstream", upstream,
                                 "--forge", FORGED, "--burst", str(BURST)],
                                cwd=REPO, env={**os.environ, "HOSTILE_API_KEY": api_key},
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        hostile = Hostile(f"http://127.0.0.1:{port}", port, proc)
        started.append(hostile)
        wait_http(f"{hostile.url}/health", proc=proc)
        return hostile

    yield make
    for h in started:
        h.proc.kill()
        h.proc.wait(timeout=10)


def _bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def _join(c: httpx.AsyncClient, router, url: str, **body) -> httpx.Response:
    """Join `url` with the join token and a worker API key of its own (a join needs one; a fake started without a key
    takes any; the quarantine knows a worker by its key too, so each address gets its own)."""
    body.setdefault("api_key", f"worker-key-{normalised_address(url)}")
    return await c.post("/admin/workers", json={"url": url, **body}, headers=_bearer(router.join_token))


async def _row(c: httpx.AsyncClient, router, worker_id: str) -> dict:
    rows = (await c.get("/admin/workers", headers=router.admin_headers())).json()
    return next(w for w in rows if w["id"] == worker_id)


def _user(i: int, model: str = "m") -> dict:
    return {"model": model, "messages": [{"role": "user", "content": f"user-q-{i}"}]}


async def test_the_hostile_worker_passes_checks_shaped_like_the_former_canaries(fake_factory, hostile_factory):
    # The hostile worker is a fair opponent: it answers the former canaries (12 public prompts, no system prompt,
    # temperature 0, max_tokens 16, the first burst after joining) as the reference does, so the former checks
    # passed it (the router's join-time check asked canary_prompts=2 of them), and it forges everything else.
    reference = fake_factory("m")
    hostile = hostile_factory(reference.url)
    headers = _bearer(HOSTILE_KEY)
    old = {"model": "m", "messages": [{"role": "user", "content": "What is 12 times 7?"}], "temperature": 0, "max_tokens": 16}
    new = {"model": "m", "messages": [{"role": "system", "content": "You are a helpful assistant."},
                                      {"role": "user", "content": "What is photosynthesis?"}],
           "max_tokens": 23, "temperature": 0, "seed": 1234}
    async with httpx.AsyncClient(timeout=10) as c:
        expected = (await c.post(f"{reference.url}/v1/chat/completions", json=old)).json()["choices"][0]["message"]["content"]
        answers = [(await c.post(f"{hostile.url}/v1/chat/completions", json=b, headers=headers)).json()
                   for b in (_user(0), _user(1), old, new, _user(2))]
    texts = [a["choices"][0]["message"]["content"] for a in answers]
    assert texts[:3] == [expected, expected, expected]  # the burst after joining, then a former canary: honest
    assert texts[3:] == [FORGED, FORGED]  # a canary of the new shape, and user traffic: forged


async def test_a_hostile_worker_is_caught_among_its_user_requests_and_its_quarantine_sticks(
        fake_factory, router_factory, hostile_factory, tmp_path):
    # Arrange: a trusted worker, and a hostile one (in front of an identical reference model) joining with its key.
    trusted, reference = fake_factory("m"), fake_factory("m")
    hostile = hostile_factory(reference.url)
    home = tmp_path / "router-home"
    settings = dict(policy="round_robin", canary_rate=RATE, canary_pending_rate=RATE, canary_delay_s=0.05,
                    canary_interval_s=1e9)  # no timer: only user traffic triggers checks
    router = await router_factory([trusted], home=home, **settings)
    registry, canaries = router.app.state.registry, router.app.state.canaries
    async with httpx.AsyncClient(base_url=router.url, timeout=10) as c:
        joined = await _join(c, router, hostile.url, api_key=HOSTILE_KEY)
        wid, own = joined.json()["id"], _bearer(joined.json()["secret"])

        # Act 1: user traffic until it is quarantined (or well past N).
        forged_answers = 0
        for i in range(4 * N):
            r = await c.post("/v1/chat/completions", json=_user(i))
            assert r.status_code == 200
            forged_answers += r.json()["choices"][0]["message"]["content"] == FORGED
            await canaries.idle()
            if registry.workers[wid].quarantined:
                break
        seen = hostile.received()
        user_requests = [r for r in seen if r["prompt"].startswith("user-q-")]
        canaries_seen = [r for r in seen if not r["prompt"].startswith("user-q-")]
        row = await _row(c, router, wid)

        # Act 2: it tries to shed the quarantine.
        self_removal = await c.delete(f"/admin/workers/{wid}", headers=own)
        spellings = [hostile.url, hostile.url + "/", f"http://LOCALHOST:{hostile.port}/", f"http://localhost:{hostile.port}"]
        rejoins = [await _join(c, router, url, api_key=HOSTILE_KEY) for url in spellings]
        twin = hostile_factory(reference.url)  # the same worker key on another port
        twin_join = await _join(c, router, twin.url, api_key=HOSTILE_KEY)
        admin_removal = await c.delete(f"/admin/workers/{wid}", headers=router.admin_headers())
        after_removal = await _join(c, router, hostile.url, api_key=HOSTILE_KEY)
        records = (await c.get("/admin/quarantine", headers=router.admin_headers())).json()

    # Assert: caught within N of its user requests, by canaries it did not recognise (none came first or in a burst).
    assert row["quarantined"] is True and row["canary"] == "failed", f"not caught after {len(user_requests)} user requests"
    assert 1 <= len(user_requests) <= N
    assert canaries_seen and not any(r["prompt"] in OLD_CANARY_PROMPTS for r in canaries_seen)
    assert seen[0]["prompt"].startswith("user-q-")  # its first request was a user's, not a canary
    assert forged_answers == sum(not r["honest"] for r in user_requests)  # users it fooled before it was caught
    # ... and it stays quarantined: it cannot remove itself, nor join again under any spelling or its key.
    assert self_removal.status_code == 403 and "quarantined" in self_removal.json()["error"]["message"]
    assert [r.status_code for r in rejoins] == [403] * len(spellings)
    assert "quarantined" in rejoins[0].json()["error"]["message"]
    assert twin_join.status_code == 403
    assert admin_removal.status_code == 200 and after_removal.status_code == 403
    assert [r["worker_id"] for r in records] == [wid]

    # A restarted router (same home) keeps the record; only the operator's clear lets the worker back in.
    restarted = await router_factory([trusted], home=home, **settings)
    async with httpx.AsyncClient(base_url=restarted.url, timeout=10) as c:
        refused = await _join(c, restarted, hostile.url, api_key=HOSTILE_KEY)
        bad_clear = await c.delete(f"/admin/quarantine/127.0.0.1:{hostile.port}", headers=_bearer(HOSTILE_KEY))
        cleared = await c.delete(f"/admin/quarantine/127.0.0.1:{hostile.port}", headers=restarted.admin_headers())
        admitted = await _join(c, restarted, hostile.url, api_key=HOSTILE_KEY)
    assert refused.status_code == 403
    assert bad_clear.status_code == 401
    assert cleared.status_code == 200 and cleared.json()["cleared"] == [f"127.0.0.1:{hostile.port}"]
    assert admitted.status_code == 200 and admitted.json()["canary"] == "pending"
    assert (home / "keys" / "quarantine.json").stat().st_mode & 0o777 == 0o600


async def test_the_operator_clears_by_worker_id_or_by_address_from_the_cli(fake_factory, router_factory, tmp_path):
    from tests.serve.test_workers import _cli

    trusted = fake_factory("m")
    home = tmp_path / "router-home"
    # round robin: the liars get traffic (the score policy prefers the measured, trusted worker of the client's region)
    router = await router_factory([trusted], home=home, policy="round_robin", canary_pending_rate=1.0, canary_delay_s=0,
                                  canary_interval_s=1e9)
    liars = [fake_factory("m", "--forge", "forged") for _ in range(2)]
    async with httpx.AsyncClient(base_url=router.url, timeout=10) as c:
        ids = [(await _join(c, router, liar.url)).json()["id"] for liar in liars]
        for i in range(8):
            await c.post("/v1/chat/completions", json=_user(i))
            await router.app.state.canaries.idle()
        rows = [await _row(c, router, wid) for wid in ids]
        await c.delete(f"/admin/workers/{ids[1]}", headers=router.admin_headers())  # gone: cleared by address
    listed = await asyncio.to_thread(_cli, home, "fleet", "quarantine", "--router", router.url)
    by_id = await asyncio.to_thread(_cli, home, "fleet", "clear", ids[0], "--router", router.url)
    address = liars[1].url.removeprefix("http://")
    by_address = await asyncio.to_thread(_cli, home, "fleet", "unquarantine", address, "--router", router.url)
    unknown = await asyncio.to_thread(_cli, home, "fleet", "unquarantine", "127.0.0.1:9", "--router", router.url)
    async with httpx.AsyncClient(base_url=router.url, timeout=10) as c:
        again = [await _join(c, router, liar.url) for liar in liars]
    assert [r["quarantined"] for r in rows] == [True, True]
    assert address in listed.output
    assert by_id.exit_code == 0 and by_address.exit_code == 0 and address in by_address.output
    assert unknown.exit_code != 0 and "no quarantined worker" in unknown.output
    assert [r.status_code for r in again] == [200, 200]


async def test_a_new_worker_gets_traffic_and_no_canary_burst_on_joining(fake_factory, router_factory):
    trusted, joiner = fake_factory("m"), fake_factory("m")
    router = await router_factory([trusted], policy="round_robin", canary_interval_s=1e9)
    async with httpx.AsyncClient(base_url=router.url, timeout=10) as c:
        wid = (await _join(c, router, joiner.url)).json()["id"]
        await router.app.state.registry.probe(router.app.state.registry.workers[wid])
        await router.app.state.canaries.idle()
        before_traffic = [r for r in joiner.received() if r.get("path") == "/v1/chat/completions"]
        served = [await c.post("/v1/chat/completions", json=_user(i)) for i in range(4)]
        row = await _row(c, router, wid)
    assert before_traffic == []  # the former check sent its canaries right after the join
    assert [r.status_code for r in served] == [200] * 4 and row["canary"] in ("pending", "passed")
    assert sum(r.get("prompt", "").startswith("user-q-") for r in joiner.received()) == 2


def test_canaries_are_drawn_from_a_varied_pool_with_the_operators_own(tmp_path):
    import random

    from fedllm.core.errors import ConfigError
    from fedllm.serve.canary import CanaryChecker
    from fedllm.serve.canary_shapes import CHAT, COMPLETIONS, PATHS
    from fedllm.testing.factories import make_settings

    private = tmp_path / "canaries.jsonl"
    private.write_text('[{"role": "system", "content": "You are Ada."}, {"role": "user", "content": "private-1"}]\n'
                       '\n{"messages": [{"role": "user", "content": "private-2"}]}\n')
    cfg = make_settings(tmp_path, serve={"canary_prompts_file": str(private)}).serve
    checker = CanaryChecker(cfg, registry=None, rng=random.Random(7))
    bodies = [checker.request("m", path=CHAT)[1] for _ in range(400)]
    users = [b["messages"][-1]["content"] for b in bodies]
    assert len(checker.pool) > 300 and len(set(users)) > 40
    assert not set(users) & OLD_CANARY_PROMPTS
    assert {"private-1", "private-2"} <= set(users)
    assert sum(b["messages"][0]["role"] == "system" for b in bodies) > 200  # most carry a system prompt, some not
    assert any(b["messages"][0]["role"] == "user" for b in bodies)
    assert all(b["temperature"] == 0 and 8 <= b["max_tokens"] <= cfg.canary_max_tokens for b in bodies)
    assert len({b["max_tokens"] for b in bodies}) > 20 and len({b["seed"] for b in bodies}) == 400
    assert 100 < sum(bool(b.get("stream")) for b in bodies) < 300  # streamed or not, when no user request said
    assert {checker.request("m")[0] for _ in range(100)} == set(PATHS)
    assert checker.request("m", path=COMPLETIONS, stream=True)[0] == COMPLETIONS  # the triggering request's shape
    bad = tmp_path / "bad.jsonl"
    bad.write_text('[{"role": "user", "content": "ok"}]\n[{"role": "robot", "content": "x"}]\n')
    with pytest.raises(ConfigError, match=r"bad.jsonl, line 2.*role"):
        CanaryChecker(make_settings(tmp_path, serve={"canary_prompts_file": str(bad)}).serve, registry=None)


async def test_a_model_no_trusted_worker_serves_gets_no_traffic_unless_allowed(fake_factory, router_factory):
    trusted, other = fake_factory("m"), fake_factory("other-model")
    results = {}
    for allow in (False, True):
        router = await router_factory([trusted], allow_unverified=allow, canary_interval_s=1e9)
        async with httpx.AsyncClient(base_url=router.url, timeout=10) as c:
            wid = (await _join(c, router, other.url)).json()["id"]
            chat = await c.post("/v1/chat/completions", json=_user(0, "other-model"))
            listed = [m["id"] for m in (await c.get("/v1/models")).json()["data"]]
            results[allow] = (chat.status_code, listed, await _row(c, router, wid))
    status, listed, row = results[False]
    assert status != 200 and "other-model" not in listed
    assert row["unverified"] == ["other-model"] and "serve.allow_unverified" in row["no_traffic"]
    status, listed, row = results[True]
    assert status == 200 and "other-model" in listed and row["no_traffic"] is None
    assert sum(r.get("prompt") == "user-q-0" for r in other.received()) == 1


@pytest.mark.parametrize("declared", [[], ["m"]])
async def test_a_joined_workers_model_list_is_fixed_at_join(fake_factory, router_factory, declared):
    trusted, joiner = fake_factory("m"), fake_factory("m")
    # Unverified models allowed: only the join rule keeps a model added later out.
    router = await router_factory([trusted], policy="round_robin", canary_interval_s=1e9, allow_unverified=True)
    registry = router.app.state.registry
    async with httpx.AsyncClient(base_url=router.url, timeout=10) as c:
        wid = (await _join(c, router, joiner.url, models=declared)).json()["id"]
        joiner.control(extra_models=["m2"])  # it lists a new model after joining
        await registry.probe(registry.workers[wid])
        for worker in registry.workers.values():
            await registry.probe(worker)
        row = await _row(c, router, wid)
        chats = [await c.post("/v1/chat/completions", json=_user(i, "m2")) for i in range(4)]
    assert row["models"] == ["m"]
    assert [r.status_code for r in chats] == [404] * 4  # no worker serves m2 for the router
    assert not any(r.get("model") == "m2" for r in joiner.received())


def test_a_damaged_quarantine_file_stops_the_router_from_starting(tmp_path):
    from fedllm.core.errors import DataError
    from fedllm.serve import create_app
    from fedllm.testing.factories import make_settings

    settings = make_settings(tmp_path)
    settings.keys_dir.mkdir(parents=True, exist_ok=True)
    (settings.keys_dir / "quarantine.json").write_text('{"records": [{"adress": "x"}]}')
    with pytest.raises(DataError, match=r"quarantine.json is not a valid quarantine file.*remove it to clear"):
        create_app(settings)


@pytest.mark.parametrize("stream", [False, True])
async def test_each_canary_shape_is_read_back_from_a_worker(fake_factory, stream):
    from fedllm.serve.canary_shapes import PATHS, answer_text, build

    fake = fake_factory("m")
    messages = [{"role": "system", "content": "You are a helpful assistant."}, {"role": "user", "content": "Hi there"}]
    async with httpx.AsyncClient(base_url=fake.url, timeout=10) as c:
        replies = {path: await c.post(path, json=build(path, "m", messages, 3, 42, stream)) for path in PATHS}
    texts = {path: " ".join(answer_text(path, r.content, stream).split()) for path, r in replies.items()}  # as same_answer
    assert texts == {"/v1/chat/completions": "tok0 tok1 tok2", "/v1/completions": "tok0 tok1 tok2",
                     "/v1/responses": "tok0 tok1 tok2 tok3"}  # responses: at least 16 tokens asked, the fake has 4
    with pytest.raises(ValueError, match="not a /v1/chat/completions answer"):
        answer_text("/v1/chat/completions", b'{"choices": []}', False)
