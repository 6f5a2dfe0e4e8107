"""What the router holds while it runs (`GET /admin/runtime`): its asyncio tasks and the size of every table kept per
worker, so an operator or a soak (bench/soak_router.py) can see that nothing grows with the workers that came and
went."""

from __future__ import annotations

import asyncio
from typing import Any


def per_worker_tables(state: Any) -> dict[str, int]:
    """Entries of each per-worker table of the router whose `app.state` is `state` (0 for a part that is off)."""
    hedger = state.forwarder.hedger
    return {
        "workers": len(state.registry.workers),
        "metric samples": sum(
            1 for family in state.metrics.registry.collect() for sample in family.samples if "worker" in sample.labels
        ),
        "series cache": len(state.forwarder._series),
        "load locks": len(state.placement._locks),
        "probes": len(state.registry._probing),
        "canary checks": len(state.canaries._checks),
        "hedge windows": len(hedger.windows) if hedger else 0,
        "replica backoffs": len(state.replicas._backoff) if state.replicas is not None else 0,
    }


def runtime_stats(state: Any) -> dict[str, Any]:
    """The document of `GET /admin/runtime`: asyncio tasks alive, adapters published, and the per-worker tables."""
    return {
        "asyncio_tasks": len(asyncio.all_tasks()),
        "published_adapters": len(state.placement.published),
        "tables": per_worker_tables(state),
    }
