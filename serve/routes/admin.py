"""The fleet admin API (docs/CONTRACTS.md): workers and adapters. Every route needs a bearer token.

Bodies come through `serve.deps.json_body` (never as plain pydantic parameters), so the token is checked before the
body is read, and the body is bounded.
"""

from __future__ import annotations

import time
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel, Field

from serve.deps import json_body, require_admin, require_admin_or_join, require_worker_or_admin
from serve.errors import RouterError

router = APIRouter(prefix="/admin")


class WorkerRegistration(BaseModel):
    """`POST /admin/workers`."""

    url: str = Field(..., max_length=512, description="The worker's address, scheme://host:port (no path, query or user info).")
    region: str = Field("local", max_length=64, description="Its region claim: shown, not routed on (measured latency is).")
    models: list[str] = Field(default_factory=list, description="Models it serves; each must be in its /v1/models.")
    capacity: int | None = Field(None, ge=1)
    api_key: str | None = Field(None, min_length=16, description="The worker's own API key (required); the router sends it on every call.")


class AdapterPublication(BaseModel):
    """`POST /admin/adapters`."""

    name: str = Field(..., min_length=1)
    path: str = Field(..., min_length=1, description="PEFT folder, readable by the workers.")
    aliases: list[str] = Field(default_factory=list)
    base_model: str | None = None


def _worker(request: Request, worker_id: str):
    worker = request.app.state.registry.workers.get(worker_id)
    if worker is None:
        raise RouterError(404, f"no worker with id {worker_id!r}; GET /admin/workers lists them")
    return worker


@router.post("/workers", dependencies=[Depends(require_admin_or_join)])
async def register_worker(body: Annotated[WorkerRegistration, Depends(json_body(WorkerRegistration))], request: Request) -> dict[str, Any]:
    """Admit a worker after reading its `/v1/models`; answers its id and its own secret (shown only here)."""
    state = request.app.state
    worker, secret = await state.registry.join(body.url, region=body.region, models=body.models, capacity=body.capacity,
                                               api_key=body.api_key)
    await state.registry.probe(worker)
    state.canaries.on_join(worker)
    return {"id": worker.id, "secret": secret, "healthy": worker.healthy, "models": sorted(worker.models), "canary": worker.canary}


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
    """Lift a worker's quarantine (an operator's decision); it is checked again at the next canary round."""
    worker = _worker(request, worker_id)
    request.app.state.canaries.clear(worker)
    return {"id": worker.id, "quarantined": worker.quarantined, "canary": worker.canary}


@router.delete("/workers/{worker_id}", dependencies=[Depends(require_worker_or_admin)])
async def remove_worker(worker_id: str, request: Request) -> dict[str, Any]:
    """Forget a joined worker (its own secret, or the admin token). Static workers stay: they come from settings."""
    worker = _worker(request, worker_id)
    if worker.static:
        raise RouterError(409, f"worker {worker_id} comes from settings (serve.workers); remove it there and restart the router")
    request.app.state.registry.remove(worker_id)
    return {"id": worker_id, "removed": True}


@router.get("/workers", dependencies=[Depends(require_admin)])
async def list_workers(request: Request) -> list[dict[str, Any]]:
    """Every worker with its health, load and what it serves."""
    return [w.describe() for w in request.app.state.registry.workers.values()]


@router.post("/adapters", dependencies=[Depends(require_admin)])
async def publish_adapter(body: Annotated[AdapterPublication, Depends(json_body(AdapterPublication))], request: Request) -> dict[str, Any]:
    """Load a PEFT adapter on a bounded number of workers; `model: <name>` or an alias then answers."""
    workers = await request.app.state.placement.publish(body.name, body.path, body.aliases, body.base_model)
    return {"name": body.name, "aliases": body.aliases, "workers": workers}


@router.delete("/adapters/{name}", dependencies=[Depends(require_admin)])
async def unpublish_adapter(name: str, request: Request) -> dict[str, Any]:
    """Unload an adapter everywhere and forget it."""
    if not await request.app.state.placement.unpublish(name):
        raise RouterError(404, f"adapter {name!r} is not published; GET /admin/adapters lists them")
    return {"name": name, "removed": True}


@router.get("/adapters", dependencies=[Depends(require_admin)])
async def list_adapters(request: Request) -> list[dict[str, Any]]:
    """Published adapters and the workers holding them."""
    return request.app.state.placement.describe()
