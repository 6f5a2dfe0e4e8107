"""OpenAI-compatible routes besides the forwarded completions (see `fedllm.serve.forwarding`): models, health,
metrics."""

from __future__ import annotations

import time

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from fedllm.core.net import is_loopback
from fedllm.serve.deps import require_admin
from fedllm.serve.protocol import ModelCard, ModelList


async def list_models(request: Request) -> Response:
    """`GET /v1/models`: base models of healthy workers, their loaded adapters, published adapters and aliases."""
    state = request.app.state
    state.forwarder.authenticate(request.headers)
    registry, placement = state.registry, state.placement
    cards: dict[str, ModelCard] = {}
    created = int(time.time())
    for worker in registry.healthy():
        for model in sorted(worker.models - worker.unverified):
            cards.setdefault(model, ModelCard(id=model, created=created, root=model))
    for worker in registry.healthy():
        for adapter in sorted(worker.adapters):
            parent = next(iter(sorted(worker.models)), None)
            cards.setdefault(adapter, ModelCard(id=adapter, created=created, root=adapter, parent=parent))
    for adapter in placement.published.values():
        cards.setdefault(
            adapter.name, ModelCard(id=adapter.name, created=created, root=adapter.name, parent=adapter.base_model)
        )
        for alias in adapter.aliases:
            cards.setdefault(alias, ModelCard(id=alias, created=created, root=adapter.name, parent=adapter.base_model))
    return JSONResponse(ModelList(data=list(cards.values())).model_dump())


async def health(request: Request) -> Response:
    """`GET /health`: the router is up; says how many workers are healthy."""
    registry = request.app.state.registry
    healthy = len(registry.healthy())
    return JSONResponse(
        {
            "status": "ok" if healthy else "no_healthy_workers",
            "workers": len(registry.workers),
            "workers_healthy": healthy,
        }
    )


async def metrics(request: Request) -> Response:
    """`GET /metrics` in Prometheus' text format; beyond loopback only with the admin token (worker ids, models and
    adapter names, traffic per key are the operator's business)."""
    state = request.app.state
    if not is_loopback(state.settings.serve.host):
        require_admin(request)
    state.metrics.workers_healthy.set(len(state.registry.healthy()))
    state.forwarder.outstanding()
    return Response(state.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")
