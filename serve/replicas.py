"""Every eligible replica: the version behind each alias is loaded on every trusted worker that may hold it, before
that worker takes traffic for it.

`ReplicaKeeper` reconciles the fleet with the promoted versions (`AdapterPlacement.promoted`): on each publish,
unpublish or alias move, each join or operator action it is told of (`kick`), and every `serve.health_interval_s`
besides (a worker that came up, was cleared, or lost its adapters on a restart). For each healthy, routable worker
that is not draining it loads, ahead of traffic, the promoted versions it lacks among those it may hold
(`AdapterPlacement.hosts`: trusted, its base model, its operator-assigned region when the publication names regions),
latest promoted first, at most `Worker.max_adapters` of them (`AdapterPlacement.wanted`; to make room a worker unloads
what it should not hold first, so the keeper never evicts one of these for another). Meanwhile the forwarder sends a
promoted version's requests only to workers that hold it (serve/forwarding.py), so no request waits on such a load while
a holder is up. Other versions stay on demand. A load that fails is retried with a doubling delay (up to `MAX_RETRY_S`).
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING

from fedllm.serve.errors import RouterError, UpstreamError

if TYPE_CHECKING:
    from fedllm.core.sections.serve import ServeSettings
    from fedllm.serve.placement import AdapterPlacement, PublishedAdapter
    from fedllm.serve.registry import Worker, WorkerRegistry

logger = logging.getLogger(__name__)

MAX_RETRY_S = 60.0


class ReplicaKeeper:
    """Keeps the promoted versions loaded on every eligible worker (serve.replicate_promoted)."""

    def __init__(self, cfg: ServeSettings, registry: WorkerRegistry, placement: AdapterPlacement):
        self.cfg = cfg
        self.registry = registry
        self.placement = placement
        self._wake = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._backoff: dict[tuple[str, str], tuple[float, float]] = {}  # (worker, adapter) -> (next try, delay)
        placement.on_change = self.kick

    def start(self) -> None:
        """Reconcile in the background from now on."""
        self._task = asyncio.create_task(self._loop(), name="router-replicas")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

    def forget(self, worker: Worker) -> None:
        """A worker was removed: drop its retry delays."""
        for key in [k for k in self._backoff if k[0] == worker.id]:
            del self._backoff[key]

    def kick(self) -> None:
        """Reconcile soon (something changed: a promotion, a join, a region, a cleared quarantine)."""
        self._wake.set()

    async def _loop(self) -> None:
        while True:
            try:
                await asyncio.wait_for(self._wake.wait(), timeout=self.cfg.health_interval_s)
            except asyncio.TimeoutError:
                pass  # no wake-up within a health interval: a periodic pass all the same (workers that came back)
            self._wake.clear()
            try:
                await self.reconcile()
            except Exception:  # the loop must survive anything one round throws
                logger.exception("replica round failed")

    async def reconcile(self) -> None:
        """Load the missing promoted versions on every eligible worker (concurrently across workers)."""
        wanted = self.placement.wanted()
        jobs = []
        for worker in list(self.registry.workers.values()):
            if not (worker.healthy and worker.routable and not worker.draining):
                continue
            missing = [a for a in wanted.get(worker.id, []) if a.name not in worker.adapters and self._due(worker, a)]
            if missing:
                jobs.append(self._fill(worker, missing))
        await asyncio.gather(*jobs)

    def _due(self, worker: Worker, adapter: PublishedAdapter) -> bool:
        retry = self._backoff.get((worker.id, adapter.name))
        return retry is None or time.monotonic() >= retry[0]

    async def _fill(self, worker: Worker, adapters: list[PublishedAdapter]) -> None:
        for adapter in adapters:
            if self.placement.published.get(adapter.name) is not adapter or worker.id not in self.registry.workers:
                continue  # unpublished or replaced meanwhile, or the worker left
            key = (worker.id, adapter.name)
            try:
                await self.placement.ensure_on(worker, adapter)
                self._backoff.pop(key, None)
                logger.info("promoted adapter %s is on worker %s ahead of its traffic", adapter.name, worker.id)
            except (UpstreamError, RouterError) as exc:
                delay = min(MAX_RETRY_S, 2 * self._backoff.get(key, (0.0, self.cfg.health_interval_s / 2))[1])
                self._backoff[key] = (time.monotonic() + delay, delay)
                logger.warning(
                    "could not load promoted adapter %s on worker %s (retry in %.1f s): %s",
                    adapter.name,
                    worker.id,
                    delay,
                    exc,
                )
