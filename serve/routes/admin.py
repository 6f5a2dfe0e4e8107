"""The fleet admin API (docs/CONTRACTS.md): workers and adapters. Every route needs a bearer token.

Bodies come through `fedllm.serve.deps.json_body` (never as plain pydantic parameters), so the token is checked before
the body is read, and the body is bounded.
"""

from __future__ import annotations

import time
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel, Field

from fedllm.core.secrets import same_secret
from fedllm.serve.deps import bearer, json_body, require_admin, require_admin_or_join, require_worker_or_admin
from fedllm.serve.errors import RouterError
from fedllm.serve.publications import rollback
from fedllm.serve.quarantine import addresses_of
from fedllm.serve.residency import check_region, check_regions
from fedllm.serve.worker_address import normalised_address

router = APIRouter(prefix="/admin")


class WorkerRegistration(BaseModel):
    """`POST /admin/workers`."""

    url: str = Field(
        ..., max_length=512, description="The worker's address, scheme://host:port (no path, query or user info)."
    )
    region: str = Field(
        "local", max_length=64, description="Its region claim: shown, not routed on (measured latency is)."
    )
    models: list[str] = Field(default_factory=list, description="Models it serves; each must be in its /v1/models.")
    capacity: int | None = Field(None, ge=1)
    max_loras: int | None = Field(
        None,
        ge=1,
        le=1024,
        description="Adapters it can hold at once (its vLLM --max-loras); capped by serve.max_adapters_per_worker.",
    )
    api_key: str | None = Field(
        None, min_length=16, description="The worker's own API key (required); the router sends it on every call."
    )


class AdapterPublication(BaseModel):
    """`POST /admin/adapters`."""

    name: str = Field(..., min_length=1)
    path: str = Field(..., min_length=1, description="PEFT folder, readable by the workers.")
    aliases: list[str] = Field(default_factory=list)
    base_model: str | None = None
    version: int | None = Field(None, ge=0, description="Its registry version: an alias never moves to an older one.")
    by: str = Field("admin", max_length=128, description="Who publishes (history): admin, or the federation round.")
    held_back: dict[str, Any] | None = Field(
        None,
        description="A promotion gate held it back: {alias, loss, current_loss}; recorded in that alias's history.",
    )
    regions: list[str] | None = Field(
        None,
        description=(
            "Data residency: served only on trusted workers whose operator-assigned region is one of these "
            "(none: anywhere)."
        ),
    )


class RegionAssignment(BaseModel):
    """`POST /admin/workers/{id}/region`."""

    region: str = Field(
        ..., max_length=64, description="The region the operator puts the worker in (data residency trusts it)."
    )


class Rollback(BaseModel):
    """`POST /admin/adapters/{alias}/rollback`."""

    to: str | int | None = Field(None, description="A published adapter name or version; default the one before.")


def _worker(request: Request, worker_id: str):
    worker = request.app.state.registry.workers.get(worker_id)
    if worker is None:
        raise RouterError(404, f"no worker with id {worker_id!r}; GET /admin/workers lists them")
    return worker


@router.post("/workers", dependencies=[Depends(require_admin_or_join)])
async def register_worker(
    body: Annotated[WorkerRegistration, Depends(json_body(WorkerRegistration))], request: Request
) -> dict[str, Any]:
    """Admit a worker after reading its `/v1/models`; answers its id and its own secret (shown only here)."""
    state = request.app.state
    worker, secret = await state.registry.join(
        body.url,
        region=body.region,
        models=body.models,
        capacity=body.capacity,
        api_key=body.api_key,
        max_loras=body.max_loras,
    )
    await state.registry.probe(worker)
    state.canaries.on_join(worker)
    state.replicas.kick()  # the promoted versions it may hold load before it gets their traffic
    return {
        "id": worker.id,
        "secret": secret,
        "healthy": worker.healthy,
        "models": sorted(worker.models),
        "canary": worker.canary,
    }


@router.post("/workers/{worker_id}/heartbeat", dependencies=[Depends(require_worker_or_admin)])
async def heartbeat(worker_id: str, request: Request) -> dict[str, Any]:
    """Note that the worker is alive (its own secret, or the admin token)."""
    worker = _worker(request, worker_id)
    worker.last_heartbeat = time.monotonic()
    return {"id": worker.id, "healthy": worker.healthy, "draining": worker.draining, "quarantined": worker.quarantined}


@router.post("/workers/{worker_id}/drain", dependencies=[Depends(require_worker_or_admin)])
async def drain(worker_id: str, request: Request) -> dict[str, Any]:
    """Stop sending new requests to the worker; requests in flight finish. Only leaving undoes it."""
    worker = _worker(request, worker_id)
    worker.draining = True
    return {"id": worker.id, "draining": True, "outstanding": worker.outstanding}


@router.post("/workers/{worker_id}/clear", dependencies=[Depends(require_admin)])
async def clear(worker_id: str, request: Request) -> dict[str, Any]:
    """Lift a worker's quarantine (an operator's decision), its sticky record too; it is checked again among its
    traffic."""
    worker = _worker(request, worker_id)
    request.app.state.canaries.clear(worker)
    request.app.state.replicas.kick()
    return {"id": worker.id, "quarantined": worker.quarantined, "canary": worker.canary}


@router.post("/workers/{worker_id}/region", dependencies=[Depends(require_admin)])
async def assign_region(
    worker_id: str, body: Annotated[RegionAssignment, Depends(json_body(RegionAssignment))], request: Request
) -> dict[str, Any]:
    """The operator puts a joined worker in a region (its own claim is never trusted for data residency); adapters
    its new region does not allow are unloaded from it, those it now may hold are loaded."""
    worker = _worker(request, worker_id)
    if worker.static:
        raise RouterError(
            409,
            f"worker {worker_id} comes from settings: its region is serve.workers[].region (or "
            "worker.region for local workers); change it there and restart the router",
        )
    state = request.app.state
    worker.region, worker.region_assigned = check_region(body.region), True
    if state.registry.regions is not None:
        state.registry.regions.assign(worker.address, worker.region)  # it holds when the worker joins again
    state.placement.drop_disallowed(worker)
    state.replicas.kick()
    return {"id": worker.id, "region": worker.region, "region_assigned": True}


@router.get("/quarantine", dependencies=[Depends(require_admin)])
async def list_quarantine(request: Request) -> list[dict[str, Any]]:
    """The sticky quarantine records (serve/quarantine.py): workers refused until an operator clears them."""
    return [r.describe() for r in request.app.state.registry.quarantine.records]


@router.delete("/quarantine/{address:path}", dependencies=[Depends(require_admin)])
async def clear_quarantine(address: str, request: Request) -> dict[str, Any]:
    """Clear the quarantine of the worker at `address` (host:port or its URL), present or gone."""
    try:
        addresses = await addresses_of(address)
    except ValueError as exc:
        raise RouterError(400, f"{exc}; give the worker's host:port or URL", param="address") from exc
    state = request.app.state
    gone = state.registry.quarantine.clear(addresses)
    present = [w for w in state.registry.workers.values() if w.quarantined and addresses & w.addresses]
    for worker in present:
        state.canaries.clear(worker)
    if not gone and not present:
        raise RouterError(404, f"no quarantined worker at {address!r}; GET /admin/quarantine lists them")
    return {
        "address": normalised_address(address),
        "cleared": sorted({r.address for r in gone} | {w.address for w in present}),
    }


@router.delete("/workers/{worker_id}", dependencies=[Depends(require_worker_or_admin)])
async def remove_worker(worker_id: str, request: Request) -> dict[str, Any]:
    """Forget a joined worker (its own secret, or the admin token). Static workers stay: they come from settings."""
    worker = _worker(request, worker_id)
    if worker.static:
        raise RouterError(
            409, f"worker {worker_id} comes from settings (serve.workers); remove it there and restart the router"
        )
    if worker.quarantined and not same_secret(bearer(request), request.app.state.admin_token):
        raise RouterError(
            403, f"worker {worker_id} is quarantined and cannot remove itself; only the operator can (admin token)"
        )
    request.app.state.registry.remove(worker_id)
    return {"id": worker_id, "removed": True}


@router.get("/runtime", dependencies=[Depends(require_admin)])
async def runtime(request: Request) -> dict[str, Any]:
    """Asyncio tasks alive and the size of each per-worker table (serve/runtime_stats.py)."""
    from fedllm.serve.runtime_stats import runtime_stats

    return runtime_stats(request.app.state)


@router.get("/workers", dependencies=[Depends(require_admin)])
async def list_workers(request: Request) -> list[dict[str, Any]]:
    """Every worker with its health, load and what it serves."""
    return [w.describe() for w in request.app.state.registry.workers.values()]


@router.post("/adapters", dependencies=[Depends(require_admin)])
async def publish_adapter(
    body: Annotated[AdapterPublication, Depends(json_body(AdapterPublication))], request: Request
) -> dict[str, Any]:
    """Load a PEFT adapter on a bounded number of workers; `model: <name>` or an alias then answers."""
    placement = request.app.state.placement
    regions = check_regions(body.regions)
    workers = await placement.publish(
        body.name, body.path, body.aliases, body.base_model, version=body.version, by=body.by, regions=regions
    )
    moved = [a for a in body.aliases if placement.aliases.get(a) == body.name]
    if body.held_back and isinstance(body.held_back.get("alias"), str):
        alias = body.held_back["alias"]
        placement.store.held_back(
            alias, placement.published[body.name], placement.aliases.get(alias), body.by, body.held_back
        )
        placement.store.save(placement)
    return {"name": body.name, "aliases": moved, "workers": workers, "regions": regions}


@router.get("/adapters/{alias}/history", dependencies=[Depends(require_admin)])
async def adapter_history(alias: str, request: Request) -> dict[str, Any]:
    """Each move of an alias: the adapter and version it named, when, by whom, why."""
    placement = request.app.state.placement
    return placement.store.describe(alias, placement)


@router.post("/adapters/{alias}/rollback", dependencies=[Depends(require_admin)])
async def adapter_rollback(
    alias: str, body: Annotated[Rollback, Depends(json_body(Rollback))], request: Request
) -> dict[str, Any]:
    """Move an alias back at once (to `to`, else the version before); requests in flight finish where they started."""
    return rollback(request.app.state.placement, alias, body.to)


@router.delete("/adapters/{name}", dependencies=[Depends(require_admin)])
async def unpublish_adapter(name: str, request: Request) -> dict[str, Any]:
    """Unload an adapter everywhere and forget it."""
    if not await request.app.state.placement.unpublish(name):
        raise RouterError(404, f"adapter {name!r} is not published; GET /admin/adapters lists them")
    return {"name": name, "removed": True}


@router.get("/adapters", dependencies=[Depends(require_admin)])
async def list_adapters(request: Request) -> list[dict[str, Any]]:
    """Published adapters: aliases, regions, the workers holding them, and their loads (ahead / on the request path)."""
    return request.app.state.placement.describe()
