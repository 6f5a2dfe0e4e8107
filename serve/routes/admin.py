"""The fleet admin API (docs/CONTRACTS.md): workers and adapters. Every route needs a bearer token.

Bodies come through `serve.deps.json_body` (never as plain pydantic parameters), so the token is checked before the
body is read, and the body is bounded.
"""

from __future__ import annotations

import time
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel, Field

from serve.deps import json_body, require_admin, require_admin_or_join
from serve.errors import RouterError

router = APIRouter(prefix="/admin")


class WorkerRegistration(BaseModel):
    """`POST /admin/workers`."""

    url: str = Field(..., description="Base URL of the worker's OpenAI server.")
    region: str = "local"
    models: list[str] = Field(default_factory=list)
    capacity: int | None = Field(None, ge=1)


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
    """Add a worker, probe it once, and return its id."""
    if not body.url.startswith(("http://", "https://")):
        raise RouterError(400, f"worker url {body.url!r} must start with http:// or https://", param="url")
    registry = request.app.state.registry
    worker = registry.add(body.url, region=body.region, models=body.models, capacity=body.capacity)
    await registry.probe(worker)
    return {"id": worker.id, "healthy": worker.healthy}


@router.post("/workers/{worker_id}/heartbeat", dependencies=[Depends(require_admin_or_join)])
async def heartbeat(worker_id: str, request: Request) -> dict[str, Any]:
    """Note that the worker is alive."""
    worker = _worker(request, worker_id)
    worker.last_heartbeat = time.monotonic()
    return {"id": worker.id, "healthy": worker.healthy}


@router.post("/workers/{worker_id}/drain", dependencies=[Depends(require_admin)])
async def drain(worker_id: str, request: Request) -> dict[str, Any]:
    """Stop sending new requests to the worker; requests in flight finish."""
    worker = _worker(request, worker_id)
    worker.draining = True
    return {"id": worker.id, "draining": True, "outstanding": worker.outstanding}


@router.delete("/workers/{worker_id}", dependencies=[Depends(require_admin_or_join)])
async def remove_worker(worker_id: str, request: Request) -> dict[str, Any]:
    """Forget the worker."""
    _worker(request, worker_id)
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
