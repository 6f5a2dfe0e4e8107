"""The worker fleet as the router sees it: who is there, what they serve, and whether they are healthy.

Workers come from settings (static) and from registration (`POST /admin/workers`). A background task probes each
worker every `health_interval_s` (`GET /health`, then `GET /v1/models` to re-list its models and loaded adapters);
a failure seen while forwarding triggers an immediate probe. An unhealthy worker gets no traffic and is
re-admitted as soon as a probe succeeds; a joined worker unhealthy or silent for `worker_expiry_s` is removed.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Iterable

from serve.policy import Candidate

if TYPE_CHECKING:
    import aiohttp

    from appliance.core.sections.serve import ServeSettings

logger = logging.getLogger(__name__)

EWMA_ALPHA = 0.2


@dataclass
class Worker:
    """One worker's mutable state, owned by the registry (single event loop, so no locks)."""

    id: str
    url: str
    region: str = "local"
    capacity: int = 16
    static: bool = False
    models: set[str] = field(default_factory=set)
    adapters: set[str] = field(default_factory=set)
    healthy: bool = False
    draining: bool = False
    outstanding: int = 0
    ttft_ms: float = 0.0
    last_ok: float = field(default_factory=time.monotonic)
    last_heartbeat: float = field(default_factory=time.monotonic)
    adapter_used: dict[str, float] = field(default_factory=dict)  # adapter -> monotonic time of its last request
    declared_models: tuple[str, ...] = ()

    def candidate(self, resident: bool = True) -> Candidate:
        """The snapshot the policy sees."""
        return Candidate(self.id, self.region, self.outstanding, self.capacity, self.ttft_ms, self.healthy, self.draining, resident)

    def observe_ttft(self, ms: float) -> None:
        """Fold one time-to-first-byte measurement into the EWMA."""
        self.ttft_ms = ms if self.ttft_ms == 0.0 else (1 - EWMA_ALPHA) * self.ttft_ms + EWMA_ALPHA * ms

    def describe(self) -> dict[str, Any]:
        """The row of `GET /admin/workers` (docs/CONTRACTS.md)."""
        return {
            "id": self.id, "url": self.url, "region": self.region, "healthy": self.healthy, "draining": self.draining,
            "outstanding": self.outstanding, "latency_ms": round(self.ttft_ms, 3), "capacity": self.capacity,
            "models": sorted(self.models), "adapters": sorted(self.adapters), "static": self.static,
        }


class WorkerRegistry:
    """The fleet. `start()` runs the health loop; `probe()` checks one worker now."""

    def __init__(self, cfg: ServeSettings, session: aiohttp.ClientSession | None = None):
        self.cfg = cfg
        self.session = session
        self.workers: dict[str, Worker] = {}
        self._ids = itertools.count(1)
        self._task: asyncio.Task | None = None
        self._probing: dict[str, asyncio.Task] = {}

    # -- membership --
    def add(self, url: str, *, region: str = "local", models: Iterable[str] = (), capacity: int | None = None, static: bool = False) -> Worker:
        """Add a worker (or return the existing one with the same URL, updated). It is healthy once probed."""
        url = url.rstrip("/")
        for worker in self.workers.values():
            if worker.url == url:
                worker.region, worker.draining = region, False
                worker.capacity = capacity or worker.capacity
                worker.last_heartbeat = time.monotonic()
                return worker
        wid = f"w{next(self._ids)}"
        worker = Worker(wid, url, region, capacity or self.cfg.worker_capacity, static, models=set(models), declared_models=tuple(models))
        self.workers[wid] = worker
        logger.info("worker %s added: %s region=%s", wid, url, region)
        return worker

    def remove(self, worker_id: str) -> Worker | None:
        """Forget a worker; returns it, or None if unknown."""
        worker = self.workers.pop(worker_id, None)
        if worker is not None:
            logger.info("worker %s removed: %s", worker_id, worker.url)
        return worker

    def healthy(self) -> list[Worker]:
        """Workers that are healthy (draining ones included: they finish what they have)."""
        return [w for w in self.workers.values() if w.healthy]

    def serving(self, model: str) -> list[Worker]:
        """Workers that list `model` as a base model or a loaded adapter (healthy or not)."""
        return [w for w in self.workers.values() if model in w.models or model in w.adapters]

    # -- health --
    async def start(self) -> None:
        """Probe every worker once, then keep probing in the background."""
        await self.probe_all()
        self._task = asyncio.create_task(self._loop(), name="router-health")

    async def stop(self) -> None:
        """Stop the health loop and any probe in flight."""
        tasks = [t for t in [self._task, *self._probing.values()] if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.cfg.health_interval_s)
            try:
                await self.probe_all()
                self._expire()
            except Exception:  # the loop must survive anything one round throws
                logger.exception("health round failed")

    async def probe_all(self) -> None:
        """Probe all workers concurrently."""
        await asyncio.gather(*(self.probe(w) for w in list(self.workers.values())))

    def probe_soon(self, worker: Worker) -> None:
        """Schedule an immediate probe of `worker` (after a forwarding failure), at most one at a time."""
        running = self._probing.get(worker.id)
        if running is None or running.done():
            self._probing[worker.id] = asyncio.create_task(self.probe(worker))

    async def probe(self, worker: Worker) -> bool:
        """Check `/health` and re-list `/v1/models`; update health, models and adapters. Returns healthy."""
        import aiohttp

        timeout = aiohttp.ClientTimeout(total=max(2.0, min(10.0, self.cfg.health_interval_s * 2)))
        try:
            async with self.session.get(f"{worker.url}/health", timeout=timeout) as resp:
                ok = resp.status == 200
            if ok:
                async with self.session.get(f"{worker.url}/v1/models", timeout=timeout) as resp:
                    ok = resp.status == 200
                    listing = await resp.json(content_type=None) if ok else {}
                self._apply_listing(worker, listing)
        except (aiohttp.ClientError, asyncio.TimeoutError, ValueError) as exc:
            ok = False
            logger.debug("probe of %s failed: %s", worker.id, exc)
        if ok != worker.healthy:
            logger.log(logging.INFO if ok else logging.WARNING, "worker %s (%s) is now %s", worker.id, worker.url, "healthy" if ok else "unhealthy")
        worker.healthy = ok
        if ok:
            worker.last_ok = time.monotonic()
        return ok

    @staticmethod
    def _apply_listing(worker: Worker, listing: dict[str, Any]) -> None:
        models, adapters = set(worker.declared_models), set()
        for card in listing.get("data", []):
            if not isinstance(card, dict) or not isinstance(card.get("id"), str):
                continue
            (adapters if card.get("parent") else models).add(card["id"])
        worker.models, worker.adapters = models, adapters

    def _expire(self) -> None:
        now = time.monotonic()
        for worker in list(self.workers.values()):
            if worker.static:
                continue
            silent = now - max(worker.last_ok, worker.last_heartbeat) if not worker.healthy else 0.0
            if silent > self.cfg.worker_expiry_s:
                logger.warning("worker %s (%s) removed after %.0f s unhealthy", worker.id, worker.url, silent)
                self.remove(worker.id)
