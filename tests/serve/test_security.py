"""API keys, admin and join tokens, rate limits, and the refusal to listen beyond loopback without keys."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest

from fedllm.core.errors import ConfigError
from fedllm.serve.keys import create_key, keys_path, load_keys
from fedllm.serve.limits import RateLimiter, TokenBucket


def test_keys_are_stored_hashed(tmp_path):
    key = create_key(tmp_path, "team-a", rpm=10)
    stored = keys_path(tmp_path).read_text()
    assert key not in stored and json.loads(stored)["keys"][0]["name"] == "team-a"
    assert load_keys(tmp_path)[0].rpm == 10
    assert oct(keys_path(tmp_path).stat().st_mode & 0o777) == "0o600"
    with pytest.raises(ConfigError, match="exists already"):
        create_key(tmp_path, "team-a")


def test_token_bucket_refills_at_its_rate():
    bucket = TokenBucket(60)  # one per second
    assert bucket.wait_s(60, now=0.0) == 0.0
    bucket.take(60, now=0.0)
    assert bucket.wait_s(1, now=0.0) == pytest.approx(1.0)
    assert bucket.wait_s(1, now=1.0) == 0.0
    limiter = RateLimiter()
    assert limiter.admit("k", 2, None, 0, now=0.0) == 0.0
    assert limiter.admit("k", 2, None, 0, now=0.0) == 0.0
    assert limiter.admit("k", 2, None, 0, now=0.0) == pytest.approx(30.0)


async def test_wrong_or_missing_key_is_401_and_good_key_passes(fake_factory, router_factory, tmp_path):
    router = await router_factory([fake_factory("m")], api_keys=["sk-settings-key-123"])
    key_file_key = create_key(tmp_path / "home0" / "keys", "team-b")
    await asyncio.sleep(1.1)  # the key file is re-read at most once a second
    async with httpx.AsyncClient(base_url=router.url) as c:
        body = {"model": "m"}
        r = await c.post("/v1/chat/completions", json=body)
        assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
        r = await c.post("/v1/chat/completions", json=body, headers={"Authorization": "Bearer wrong"})
        assert r.status_code == 401
        assert (await c.get("/v1/models")).status_code == 401
        for key in ("sk-settings-key-123", key_file_key):
            r = await c.post("/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {key}"})
            assert r.status_code == 200, r.text


async def test_rate_limit_gives_429_with_retry_after(fake_factory, router_factory, tmp_path):
    home = tmp_path / "rl"
    key = create_key(home / "keys", "slow", rpm=3)
    tkey = create_key(home / "keys", "few-tokens", tpm=100)
    router = await router_factory([fake_factory("m")], home=home)
    async with httpx.AsyncClient(base_url=router.url) as c:
        auth = {"Authorization": f"Bearer {key}"}
        codes = [(await c.post("/v1/chat/completions", json={"model": "m"}, headers=auth)).status_code for _ in range(4)]
        assert codes == [200, 200, 200, 429]
        r = await c.post("/v1/chat/completions", json={"model": "m"}, headers=auth)
        assert r.status_code == 429 and int(r.headers["retry-after"]) >= 1
        assert r.json()["error"]["type"] == "rate_limit_error"
        tauth = {"Authorization": f"Bearer {tkey}"}
        post = lambda n: c.post("/v1/chat/completions", json={"model": "m", "max_tokens": n}, headers=tauth)  # noqa: E731
        assert (await post(95)).status_code == 200
        # A request is charged its cap plus its prompt's estimate (8 tokens for this body). Each answer uses 9 tokens
        # and the rest of the charge is refunded: 91 remain, so 80 (+8) fit (only thanks to the refund), then 82
        # remain and 95 (+8) do not.
        assert (await post(80)).status_code == 200
        assert (await post(95)).status_code == 429


async def test_admin_needs_token_and_join_token_registers_a_worker(fake_factory, router_factory):
    router = await router_factory([], allow_unverified=True)  # no trusted worker serves its model: allowed here
    fake = fake_factory("joined-model")
    async with httpx.AsyncClient(base_url=router.url) as c:
        assert (await c.get("/admin/workers")).status_code == 401
        join = {"Authorization": f"Bearer {router.join_token}"}
        assert (await c.get("/admin/workers", headers=join)).status_code == 401  # the join token is not admin
        r = await c.post("/admin/workers", json={"url": fake.url, "region": "eu-west", "capacity": 4,
                                                 "api_key": "any-key-the-fake-accepts-0123"}, headers=join)
        assert r.status_code == 200 and r.json()["healthy"] is True
        wid, own = r.json()["id"], {"Authorization": f"Bearer {r.json()['secret']}"}
        assert [m["id"] for m in (await c.get("/v1/models")).json()["data"]] == ["joined-model"]
        assert (await c.post(f"/admin/workers/{wid}/heartbeat", headers=join)).status_code == 401  # join token only joins
        assert (await c.post(f"/admin/workers/{wid}/heartbeat", headers=own)).status_code == 200
        rows = (await c.get("/admin/workers", headers=router.admin_headers())).json()
        assert rows[0]["region"] == "eu-west" and rows[0]["models"] == ["joined-model"]
        assert (await c.post("/v1/chat/completions", json={"model": "joined-model"})).status_code == 200
        assert (await c.post(f"/admin/workers/{wid}/drain", headers=router.admin_headers())).json()["draining"] is True
        assert (await c.post("/v1/chat/completions", json={"model": "joined-model"})).status_code == 503
        assert (await c.delete(f"/admin/workers/{wid}", headers=join)).status_code == 401
        assert (await c.delete(f"/admin/workers/{wid}", headers=own)).status_code == 200
        assert (await c.get("/admin/workers", headers=router.admin_headers())).json() == []
        r = await c.post("/admin/workers", json={"region": "x"}, headers=join)
        assert r.status_code == 400 and "url" in r.json()["error"]["message"]


def test_refuses_public_bind_without_keys(tmp_path):
    from fedllm.serve.app import check_exposure
    from fedllm.testing.factories import make_settings

    check_exposure(make_settings(tmp_path, serve={"host": "127.0.0.1"}))
    with pytest.raises(ConfigError, match="requires API keys"):
        check_exposure(make_settings(tmp_path, serve={"host": "0.0.0.0"}))
    create_key(tmp_path / "keys", "ops")
    check_exposure(make_settings(tmp_path, serve={"host": "0.0.0.0"}))
