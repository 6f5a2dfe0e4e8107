"""Worker membership against the real router: join, heartbeat and leave through `RouterRegistration`."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from appliance.core.router_client import RouterClient, ServiceUnavailable
from serve.worker_launcher import RouterRegistration


async def _workers(router) -> list[dict]:
    async with httpx.AsyncClient() as client:
        return (await client.get(f"{router.url}/admin/workers", headers=router.admin_headers(), timeout=5)).json()


async def test_registration_heartbeats_and_deregisters(fake_factory, router_factory):
    # Arrange: a router with no worker, and a fake worker joining it with the join token.
    router = await router_factory()
    fake = fake_factory("m")
    membership = RouterRegistration(RouterClient(router.url), router.join_token, fake.url, "eu", ["m"])

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
