"""Publications that survive a router restart, versions that never move an alias back, history and rollback
(serve/publications.py), through the real router, fake workers and the CLI."""

from __future__ import annotations

import asyncio
import json

import httpx
from typer.testing import CliRunner

from fedllm.appliance.cli import app
from fedllm.core.adapter_registry import AdapterRegistry


def _paths(fake, path: str) -> list[str]:
    return [r["model"] for r in fake.received() if r["path"] == path]


async def _ask(c: httpx.AsyncClient, model: str) -> httpx.Response:
    return await c.post("/v1/chat/completions", json={"model": model})


async def test_publications_survive_a_router_restart(fake_factory, router_factory, tmp_path):
    home = tmp_path / "home"
    first = await router_factory([fake_factory("base")], home=home)
    async with httpx.AsyncClient(base_url=first.url, timeout=10) as c:
        for v in (1, 2):
            r = await c.post("/admin/adapters", json={"name": f"run-v{v}", "path": f"/a/{v}", "aliases": ["run-latest"],
                                                      "version": v}, headers=first.admin_headers())
            assert r.status_code == 200, r.text
    saved = json.loads((home / "router" / "publications.json").read_text())
    assert saved["aliases"] == {"run-latest": "run-v2"} and set(saved["adapters"]) == {"run-v1", "run-v2"}

    # A second router on the same home, with a fresh worker that never saw a publish.
    fresh = fake_factory("base")
    second = await router_factory([fresh], home=home, adapter_replicas=2)
    async with httpx.AsyncClient(base_url=second.url, timeout=10) as c:
        listed = {a["name"]: a["aliases"] for a in (await c.get("/admin/adapters", headers=second.admin_headers())).json()}
        assert listed == {"run-v1": [], "run-v2": ["run-latest"]}
        # Loaded on the worker as it comes up, without a request or a publish.
        for _ in range(200):
            if {"run-v1", "run-v2"} <= set(_paths(fresh, "/v1/load_lora_adapter")):
                break
            await asyncio.sleep(0.05)
        assert {"run-v1", "run-v2"} <= set(_paths(fresh, "/v1/load_lora_adapter"))
        alias, own = await _ask(c, "run-latest"), await _ask(c, "run-v1")
    assert alias.status_code == 200 and alias.json()["model"] == "run-v2"
    assert own.status_code == 200 and own.json()["model"] == "run-v1"


async def test_an_older_version_published_last_does_not_move_the_alias(fake_factory, router_factory):
    fake = fake_factory("base")
    router = await router_factory([fake])
    admin = router.admin_headers()
    async with httpx.AsyncClient(base_url=router.url, timeout=10) as c:
        newer = await c.post("/admin/adapters", json={"name": "run-v3", "path": "/a/3", "aliases": ["run-latest"], "version": 3}, headers=admin)
        older = await c.post("/admin/adapters", json={"name": "run-v2", "path": "/a/2", "aliases": ["run-latest"], "version": 2}, headers=admin)
        answer = await _ask(c, "run-latest")
        history = (await c.get("/admin/adapters/run-latest/history", headers=admin)).json()
    assert newer.json()["aliases"] == ["run-latest"] and older.json()["aliases"] == []
    assert answer.json()["model"] == "run-v3"
    assert [row["name"] for row in history["history"]] == ["run-v3"]


async def test_republishing_changed_files_reloads_them(fake_factory, router_factory, tmp_path):
    folder = tmp_path / "adapter"
    folder.mkdir()
    (folder / "adapter_model.safetensors").write_bytes(b"one")
    fake = fake_factory("base")
    router = await router_factory([fake])
    admin = router.admin_headers()
    body = {"name": "x", "path": str(folder)}
    async with httpx.AsyncClient(base_url=router.url, timeout=10) as c:
        await c.post("/admin/adapters", json=body, headers=admin)
        await c.post("/admin/adapters", json=body, headers=admin)  # unchanged: stays loaded
        assert _paths(fake, "/v1/unload_lora_adapter") == []
        (folder / "adapter_model.safetensors").write_bytes(b"two, longer")
        r = await c.post("/admin/adapters", json=body, headers=admin)
    assert r.status_code == 200, r.text
    assert _paths(fake, "/v1/unload_lora_adapter") == ["x"]
    assert _paths(fake, "/v1/load_lora_adapter") == ["x", "x"]


async def test_history_and_rollback(fake_factory, router_factory):
    fake = fake_factory("base", "--delay-s", "0.5")
    router = await router_factory([fake])
    admin = router.admin_headers()
    async with httpx.AsyncClient(base_url=router.url, timeout=20) as c:
        for v in (1, 2, 3):
            await c.post("/admin/adapters", json={"name": f"run-v{v}", "path": f"/a/{v}", "aliases": ["run-latest"], "version": v,
                                                  "by": f"federation round {v}"}, headers=admin)
        # A request in flight on v3 when the alias moves back finishes on v3.
        in_flight = asyncio.create_task(_ask(c, "run-latest"))
        while "run-v3" not in _paths(fake, "/v1/chat/completions"):
            await asyncio.sleep(0.02)
        back = await c.post("/admin/adapters/run-latest/rollback", json={}, headers=admin)
        after = await _ask(c, "run-latest")
        assert (await in_flight).json()["model"] == "run-v3"
        to_one = await c.post("/admin/adapters/run-latest/rollback", json={"to": 1}, headers=admin)
        missing = await c.post("/admin/adapters/run-latest/rollback", json={"to": 9}, headers=admin)
        no_alias = await c.post("/admin/adapters/nope/rollback", json={}, headers=admin)
        history = (await c.get("/admin/adapters/run-latest/history", headers=admin)).json()
        unknown = await c.get("/admin/adapters/nope/history", headers=admin)
        unauthenticated = await c.get("/admin/adapters/run-latest/history")
    assert back.json() == {"alias": "run-latest", "name": "run-v2", "from": "run-v3"}
    assert after.json()["model"] == "run-v2"
    assert to_one.json()["name"] == "run-v1"
    assert missing.status_code == 404 and "no published version 9" in missing.json()["error"]["message"]
    assert no_alias.status_code == 404 and unknown.status_code == 404 and unauthenticated.status_code == 401
    rows = history["history"]
    assert history["current"] == "run-v1"
    assert [(r["name"], r["version"], r["by"]) for r in rows[:3]] == [
        ("run-v1", 1, "federation round 1"), ("run-v2", 2, "federation round 2"), ("run-v3", 3, "federation round 3")]
    assert [(r["name"], r["reason"]) for r in rows[3:]] == [("run-v2", "rollback from run-v3"), ("run-v1", "rollback from run-v2")]
    assert all(r["at"].endswith("Z") for r in rows)


def _invoke(home, *args: str):
    return CliRunner().invoke(app, ["--home", str(home), *args])


async def test_history_and_rollback_commands(fake_factory, router_factory, tmp_path):
    home = tmp_path / "cli-home"
    registry = AdapterRegistry(home / "adapters")
    for meta in ({}, {"kind": "federated", "run": "legal", "round": 2}):
        src = tmp_path / "src"
        src.mkdir(exist_ok=True)
        (src / "adapter_config.json").write_text("{}")
        (src / "adapter_model.safetensors").write_bytes(b"")
        registry.register("legal", src, meta)
    router = await router_factory([fake_factory("base")], home=home)
    for ref in ("legal:1", "legal:2"):
        out = await asyncio.to_thread(_invoke, home, "adapters", "publish", ref, "--router", router.url)
        assert out.exit_code == 0, out.output
    shown = await asyncio.to_thread(_invoke, home, "adapters", "history", "legal", "--json", "--router", router.url)
    assert shown.exit_code == 0, shown.output
    data = json.loads(shown.stdout)
    assert data["current"] == "legal-v2" and [r["version"] for r in data["history"]] == [1, 2]
    assert [r["by"] for r in data["history"]] == ["admin", "federation legal round 2"]
    back = await asyncio.to_thread(_invoke, home, "adapters", "rollback", "legal", "--router", router.url)
    assert back.exit_code == 0 and "legal-latest now names legal-v1 (was legal-v2)" in back.output
    forward = await asyncio.to_thread(_invoke, home, "adapters", "rollback", "legal", "--to", "2", "--router", router.url)
    assert forward.exit_code == 0 and "now names legal-v2" in forward.output
    text = await asyncio.to_thread(_invoke, home, "adapters", "history", "legal-latest", "--router", router.url)
    assert "legal-latest -> legal-v2" in text.output and "rollback from legal-v1" in text.output
    bad = await asyncio.to_thread(_invoke, home, "adapters", "rollback", "legal", "--to", "7", "--router", router.url)
    assert bad.exit_code != 0 and "no published version '7'" in bad.output
