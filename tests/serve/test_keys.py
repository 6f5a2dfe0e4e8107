"""API keys on a running router: always required beyond loopback, listed without secrets, revoked without a restart."""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest
from typer.testing import CliRunner

from fedllm.appliance.cli import app
from fedllm.core.errors import ConfigError
from fedllm.serve.keys import create_key, keys_path, load_keys, revoke_key

BODY = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}


def _bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


async def _until_status(client: httpx.AsyncClient, headers: dict, status: int, timeout_s: float = 10.0) -> httpx.Response:
    """Post until the router answers `status` (the key file is re-read about once a second), or fail."""
    deadline = time.monotonic() + timeout_s
    while True:
        r = await client.post("/v1/chat/completions", json=BODY, headers=headers)
        if r.status_code == status or time.monotonic() > deadline:
            return r
        await asyncio.sleep(0.1)


async def test_public_router_keeps_requiring_keys_when_the_key_file_is_emptied_or_deleted(fake_factory, router_factory, tmp_path):
    home = tmp_path / "public"
    key = create_key(home / "keys", "team-a")
    router = await router_factory([fake_factory("m")], home=home, host="0.0.0.0")
    async with httpx.AsyncClient(base_url=router.url) as c:
        assert (await c.post("/v1/chat/completions", json=BODY, headers=_bearer(key))).status_code == 200
        assert (await c.post("/v1/chat/completions", json=BODY)).status_code == 401
        for change in ("empty", "delete"):
            if change == "empty":
                keys_path(home / "keys").write_text('{"keys": []}\n')
            else:
                keys_path(home / "keys").unlink()
            # A request carrying any bearer token makes the router notice the change...
            r = await _until_status(c, _bearer(key), 401)
            assert r.status_code == 401
            # ... and from then on requests without a key are still refused, with a message saying what to do.
            for headers in ({}, _bearer("anything")):
                r = await c.post("/v1/chat/completions", json=BODY, headers=headers)
                assert r.status_code == 401, r.text
                assert "appliance keys create" in r.json()["error"]["message"]
            assert (await c.get("/v1/models")).status_code == 401


async def test_public_router_without_any_key_refuses_every_request(fake_factory, router_factory, tmp_path):
    router = await router_factory([fake_factory("m")], home=tmp_path / "nokeys", host="0.0.0.0")
    async with httpx.AsyncClient(base_url=router.url) as c:
        r = await c.post("/v1/chat/completions", json=BODY)
        assert r.status_code == 401 and "has no API key" in r.json()["error"]["message"]


async def test_loopback_router_without_keys_stays_open(fake_factory, router_factory, tmp_path):
    router = await router_factory([fake_factory("m")], home=tmp_path / "local")
    async with httpx.AsyncClient(base_url=router.url) as c:
        assert (await c.post("/v1/chat/completions", json=BODY)).status_code == 200


def _invoke(home, *args: str):
    return CliRunner().invoke(app, ["--home", str(home), *args])


async def test_keys_list_and_revoke_take_effect_on_a_running_router(fake_factory, router_factory, tmp_path):
    home = tmp_path / "revoke"
    first = create_key(home / "keys", "first", rpm=60)
    second = create_key(home / "keys", "second", tpm=5000)
    router = await router_factory([fake_factory("m")], home=home, host="0.0.0.0")

    listed = await asyncio.to_thread(_invoke, home, "keys", "list")
    assert listed.exit_code == 0, listed.output
    ids = {k.name: k.id for k in load_keys(home / "keys")}
    for name in ("first", "second"):
        assert name in listed.output and ids[name] in listed.output
    assert "60" in listed.output and "5000" in listed.output and "UTC" in listed.output
    assert first not in listed.output and second not in listed.output
    assert first[len("sk-fedllm-"):][:8] not in listed.output  # not even a head of the key

    async with httpx.AsyncClient(base_url=router.url) as c:
        for key in (first, second):
            assert (await c.post("/v1/chat/completions", json=BODY, headers=_bearer(key))).status_code == 200
        revoked = await asyncio.to_thread(_invoke, home, "keys", "revoke", ids["first"])  # by id
        assert revoked.exit_code == 0 and "first" in revoked.output, revoked.output
        assert (await _until_status(c, _bearer(first), 401)).status_code == 401
        assert (await c.post("/v1/chat/completions", json=BODY, headers=_bearer(second))).status_code == 200
        by_name = await asyncio.to_thread(_invoke, home, "keys", "revoke", "second")
        assert by_name.exit_code == 0, by_name.output
        assert (await _until_status(c, _bearer(second), 401)).status_code == 401
    unknown = _invoke(home, "keys", "revoke", "nobody")
    assert unknown.exit_code == 2 and "names no API key" in unknown.output


def test_revoke_refuses_an_unknown_key_and_keeps_the_others(tmp_path):
    create_key(tmp_path, "a")
    create_key(tmp_path, "b")
    with pytest.raises(ConfigError, match="names no API key"):
        revoke_key(tmp_path, "c")
    assert revoke_key(tmp_path, "a").name == "a"
    assert [k.name for k in load_keys(tmp_path)] == ["b"]
    assert oct(keys_path(tmp_path).stat().st_mode & 0o777) == "0o600"


@pytest.mark.parametrize("change", ["corrupt", "empty", "emptied", "delete"])
async def test_loopback_router_with_keys_keeps_requiring_them_whatever_happens_to_the_key_file(
        fake_factory, router_factory, tmp_path, caplog, change):
    # Arrange: the usual setup behind a TLS proxy on the same host: a loopback router with API keys.
    home = tmp_path / "loopback"
    key = create_key(home / "keys", "team-a")
    router = await router_factory([fake_factory("m")], home=home)
    async with httpx.AsyncClient(base_url=router.url) as c:
        assert (await c.post("/v1/chat/completions", json=BODY)).status_code == 401
        # Act: the key file is damaged, emptied or deleted while the router runs.
        path = keys_path(home / "keys")
        if change == "corrupt":
            path.write_text('{"keys": [{"name": "team-a", "hash": ')
        elif change == "empty":
            path.write_text("")
        elif change == "emptied":
            path.write_text('{"keys": []}\n')
        else:
            path.unlink()
        expected = 503 if change == "corrupt" else 401
        with_key = await _until_status(c, _bearer(key), expected)  # the router re-reads the file within a second
        noticed = await c.post("/v1/chat/completions", json=BODY)
        models = await c.get("/v1/models")

    # Assert: never 200 without a key (today: 200); a corrupt file refuses everyone, clearly, and is logged with its path.
    assert noticed.status_code == expected and models.status_code == expected
    assert with_key.status_code == expected
    message = noticed.json()["error"]["message"]
    if change == "corrupt":
        assert "key file cannot be read" in message
        logged = [r.getMessage() for r in caplog.records if r.name == "fedllm.serve.keys" and r.levelname == "ERROR"]
        assert len(logged) == 1 and str(path) in logged[0] and key not in logged[0]
    else:
        assert "has no API key" in message


async def test_require_keys_refuses_a_loopback_router_without_any_key(fake_factory, router_factory, tmp_path):
    router = await router_factory([fake_factory("m")], home=tmp_path / "strict", require_keys=True)
    async with httpx.AsyncClient(base_url=router.url) as c:
        r = await c.post("/v1/chat/completions", json=BODY)
    assert r.status_code == 401 and "has no API key" in r.json()["error"]["message"]


async def test_an_unreadable_key_file_refuses_every_request(fake_factory, router_factory, tmp_path):
    home = tmp_path / "unreadable"
    create_key(home / "keys", "team-a")
    keys_path(home / "keys").unlink()
    keys_path(home / "keys").mkdir()  # read_text fails with an OSError (chmod 0 would not stop root)
    router = await router_factory([fake_factory("m")], home=home)
    async with httpx.AsyncClient(base_url=router.url) as c:
        r = await c.post("/v1/chat/completions", json=BODY)
    assert r.status_code == 503 and "key file cannot be read" in r.json()["error"]["message"]
