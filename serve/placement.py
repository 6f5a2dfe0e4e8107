"""Adapter placement: which workers hold which LoRA adapters, loaded and unloaded by the router.

Publishing an adapter (`POST /admin/adapters`) loads it on `adapter_replicas` workers through vLLM's
`/v1/load_lora_adapter`. A request for a published adapter that no healthy worker holds loads it on the best
worker first (load on demand). When the workers holding an adapter are all at capacity it is loaded on one more,
up to `max_adapter_replicas`. Each worker keeps at most `max_adapters_per_worker` adapters: loading one more
unloads the least recently used one that has no request in flight. Aliases map other names onto an adapter.

Publishing a new version with an alias moves the alias to it in one step, once the new version is loaded (so a
request for the alias never meets a version that is not ready): `NAME-latest` always names the newest version
published. The old version keeps answering under its own name until it is unpublished or unloaded as least recently
used. An adapter is never unloaded while requests are in flight on it: unpublishing waits for them to finish.

Promoted versions (those an alias names) are on every eligible worker (`serve.replicate_promoted`): publishing with an
alias loads the version on every trusted worker of its base model (and region) before the alias moves, and
`fedllm.serve.replicas.ReplicaKeeper` loads it on workers that come up, join or become eligible later, before they take
traffic for it: while a worker that holds a promoted version is up, only holders get its requests (no load on the
request path). Each worker holds at most `Worker.max_adapters` (its declared max_loras, capped by
`max_adapters_per_worker`); a full worker unloads first a version no alias names, then a promoted one beyond its
room (`wanted`), its least recently used. Load attempts are
counted by where they happened: ahead (publish, the keeper, restore, spreading) or on the request path, a request
waiting on it (`loads` of `GET /admin/adapters`, metric `router_adapter_loads_when_total{when}`).

A publication may name `regions` (serve/residency.py): it is then placed and routed only on trusted workers whose
operator-assigned region is one of them, and answers 503 when none is up.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

from fedllm.serve.errors import RouterError, UpstreamError
from fedllm.serve.policy import RouteHints, rank
from fedllm.serve.publications import PublicationStore, fingerprint, newer
from fedllm.serve.residency import allowed, no_eligible_worker

if TYPE_CHECKING:
    import aiohttp

    from fedllm.core.sections.serve import ServeSettings
    from fedllm.serve.metrics import RouterMetrics
    from fedllm.serve.registry import Worker, WorkerRegistry

logger = logging.getLogger(__name__)


class NoRoom(UpstreamError):
    """A worker cannot load another adapter now: every resident one has requests in flight (try another worker)."""


class LoadRefused(UpstreamError):
    """A worker answered 4xx to loading an adapter (a path it cannot read, a rank too large): try another worker."""


@dataclass
class PublishedAdapter:
    """An adapter the router may place on workers."""

    name: str
    path: str
    aliases: list[str] = field(default_factory=list)
    base_model: str | None = None
    version: int | None = None  # the registry version, if the publish named one (aliases never move to an older one)
    seq: int = 0  # the order its publish began in (serve/publications.py)
    fingerprint: str | None = None  # its files' digest when the router can read them (a change reloads it)
    promoted_at: int = 0  # when an alias last moved to it (a counter of this router's moves; 0: before this start)
    regions: list[str] | None = None  # data residency: served only in these operator-assigned regions (None: anywhere)
    loads: dict[str, int] = field(
        default_factory=lambda: {"ahead": 0, "request": 0}
    )  # load attempts on workers, by where

    def describe(self, workers: list[str]) -> dict[str, Any]:
        """The row of `GET /admin/adapters`."""
        return {
            "name": self.name,
            "path": self.path,
            "aliases": self.aliases,
            "base_model": self.base_model,
            "version": self.version,
            "regions": self.regions,
            "workers": workers,
            "loads": dict(self.loads),
        }


class AdapterPlacement:
    """Published adapters, their aliases, and loading/unloading them on workers."""

    def __init__(
        self,
        cfg: ServeSettings,
        registry: WorkerRegistry,
        metrics: RouterMetrics,
        store: PublicationStore | None = None,
    ):
        self.cfg = cfg
        self.store = store or PublicationStore(None)
        self.registry = registry
        self.metrics = metrics
        self.published: dict[str, PublishedAdapter] = {}
        self.aliases: dict[str, str] = {}
        self._locks: dict[tuple[str, str], asyncio.Lock] = {}
        self._spreading: set[str] = set()
        self._retiring: set[asyncio.Task] = set()
        self._moves = 0  # alias moves so far (orders the promoted versions)
        self.on_change: Callable[[], None] | None = (
            None  # told of each publish, unpublish and alias move (fedllm.serve.replicas)
        )

    @property
    def session(self) -> aiohttp.ClientSession:
        return self.registry.http

    def resolve(self, model: str) -> str:
        """The adapter name behind an alias, else `model` itself."""
        return self.aliases.get(model, model)

    def holders(self, name: str) -> list[Worker]:
        """Workers that have `name` loaded."""
        return [w for w in self.registry.workers.values() if name in w.adapters]

    def hosts(self, adapter: PublishedAdapter) -> list[Worker]:
        """Routable trusted workers that could load `adapter`: static or local ones (joined ones too with
        `serve.place_adapters_on_joined`) that serve its base model (any model if the base is unknown), in one of its
        regions if it names some (operator-assigned regions only: fedllm.serve.residency)."""
        joined_ok, regions = self.cfg.place_adapters_on_joined, adapter.regions
        workers = [
            w
            for w in self.registry.workers.values()
            if w.routable and (w.static or joined_ok) and (regions is None or allowed(w, regions))
        ]
        if adapter.base_model:
            return [w for w in workers if adapter.base_model in w.models]
        return workers

    # -- publish / unpublish --
    def promoted(self) -> list[PublishedAdapter]:
        """The published adapters an alias names, the latest promoted first (a rollback promotes too), then the newest
        publish."""
        return sorted(
            (a for a in self.published.values() if a.aliases), key=lambda a: (a.promoted_at, a.seq), reverse=True
        )

    def wanted(self) -> dict[str, list[PublishedAdapter]]:
        """Worker id -> the promoted versions it should hold: those it may hold (`hosts`), latest promoted first, as
        many as it can hold (`Worker.max_adapters`). Empty without `serve.replicate_promoted`."""
        if not self.cfg.replicate_promoted:
            return {}
        out: dict[str, list[PublishedAdapter]] = {}
        for adapter in self.promoted():
            for worker in self.hosts(adapter):
                mine = out.setdefault(worker.id, [])
                if len(mine) < worker.max_adapters:
                    mine.append(adapter)
        return out

    def pinned(self, adapter: PublishedAdapter) -> bool:
        """Whether `adapter` is kept on every eligible worker: an alias names it (serve.replicate_promoted)."""
        return bool(adapter.aliases) and self.cfg.replicate_promoted

    def _changed(self) -> None:
        if self.on_change is not None:
            self.on_change()

    async def publish(
        self,
        name: str,
        path: str,
        aliases: list[str],
        base_model: str | None = None,
        *,
        version: int | None = None,
        by: str = "admin",
        reason: str = "published",
        regions: list[str] | None = None,
    ) -> list[str]:
        """Record `name`, load it on up to `adapter_replicas` of the best workers (every eligible one when an alias
        moves to it and `serve.replicate_promoted`), then move `aliases` to it. `regions` (checked by
        `fedllm.serve.residency.check_regions`) limits where it is placed and routed.

        Returns:
            The ids of the workers holding it.

        Raises:
            RouterError: an alias is the name of a published adapter, or `name` is an alias (409); `regions` given
                and no trusted worker of its base model has an operator-assigned region among them (409); every worker
                refused the adapter (400/502), in which case the aliases stay where they were.
        """
        for alias in aliases:
            if alias in self.published and alias != name:
                raise RouterError(
                    409, f"alias {alias!r} is the name of a published adapter; choose another alias", param="aliases"
                )
        if name in self.aliases:
            raise RouterError(
                409, f"{name!r} is an alias of adapter {self.aliases[name]!r}; publish under another name", param="name"
            )
        old = self.published.get(name)  # published again (a new path): it keeps its aliases
        adapter = PublishedAdapter(
            name,
            path,
            list(old.aliases) if old else [],
            base_model,
            version=version,
            seq=self.store.next_seq(),
            fingerprint=fingerprint(path),
            regions=regions,
            loads=dict(old.loads) if old else {"ahead": 0, "request": 0},
        )
        if regions and not self.hosts(adapter):
            raise no_eligible_worker(name, regions, base_model, list(self.registry.workers.values()))
        self.published[name] = adapter
        if old is not None and (old.path != path or old.fingerprint != adapter.fingerprint):
            await self._unload_everywhere(name)  # its files changed: the workers load them again
        elif old is not None and regions:
            await self._unload_outside(adapter)  # now limited to regions: off the workers of other regions
        eligible = {w.id for w in self.hosts(adapter)}
        loaded = [w.id for w in self.holders(name) if w.healthy and w.id in eligible]
        errors: list[str] = []
        if self.cfg.replicate_promoted and (bool(adapter.aliases) or self._would_move(adapter, aliases)):
            # Promoted: on every eligible worker that is up, at once, before the alias moves (the keeper does the rest).
            up = [w for w in self._ranked(adapter) if w.healthy and not w.draining and w.id not in loaded]
            for worker, error in zip(up, await asyncio.gather(*(self._try_load(w, adapter) for w in up))):
                if error is None:
                    loaded.append(worker.id)
                elif error:
                    errors.append(error)
        else:
            for worker in self._ranked(adapter):
                if len(loaded) >= self.cfg.adapter_replicas:
                    break
                if worker.id in loaded:
                    continue
                error = await self._try_load(worker, adapter)
                if error is None:
                    loaded.append(worker.id)
                elif error:
                    errors.append(error)
        if not loaded and errors:
            await self.unpublish(name)
            raise RouterError(502, f"no worker could load adapter {name!r}: {'; '.join(errors)}")
        self._move_aliases(adapter, aliases, by, reason)
        self.store.save(self)
        self._changed()
        logger.info("adapter %s published on %s", name, ", ".join(loaded) or "no worker yet (loads on demand)")
        return loaded

    async def _try_load(self, worker: Worker, adapter: PublishedAdapter) -> str | None:
        """Load `adapter` on `worker` ahead of traffic: None when it holds it, "" when it is busy (no room now: it
        loads there or elsewhere later), else the error."""
        try:
            await self.ensure_on(worker, adapter)
            return None
        except NoRoom as exc:
            logger.info("adapter %s not loaded on %s now: %s", adapter.name, worker.id, exc.reason)
            return ""
        except (UpstreamError, RouterError) as exc:
            return str(exc)

    def _would_move(self, adapter: PublishedAdapter, aliases: list[str]) -> bool:
        """Whether publishing `adapter` moves one of `aliases` (none names a newer publication)."""
        for alias in aliases:
            previous = self.published.get(self.aliases.get(alias, ""))
            if previous is None or previous is adapter or newer(adapter, previous):
                return True
        return False

    async def _unload_outside(self, adapter: PublishedAdapter) -> None:
        """Unload `adapter` from the workers that hold it but may not (another region, now), once idle there."""
        eligible = {w.id for w in self.hosts(adapter)}
        for worker in self.holders(adapter.name):
            if worker.id not in eligible:
                self._retire(worker, adapter.name)

    def drop_disallowed(self, worker: Worker) -> None:
        """After `worker`'s region changed: unload the adapters whose regions no longer allow it (once idle)."""
        for name in list(worker.adapters):
            adapter = self.published.get(name)
            if adapter is not None and adapter.regions is not None and not allowed(worker, adapter.regions):
                self._retire(worker, name)

    def _retire(self, worker: Worker, name: str) -> None:
        task = asyncio.create_task(self._unload_when_idle(worker, name, unless_allowed=True))
        self._retiring.add(task)
        task.add_done_callback(self._retiring.discard)

    def _move_aliases(self, adapter: PublishedAdapter, aliases: list[str], by: str, reason: str) -> None:
        """Point every alias at `adapter`, unless it names a newer publication already (a slower publish of an older
        version that finishes last)."""
        for alias in aliases:
            previous = self.published.get(self.aliases.get(alias, ""))
            if previous is not None and previous is not adapter and not newer(adapter, previous):
                logger.info("alias %s stays on %s: %s is older", alias, previous.name, adapter.name)
                continue
            self.move_alias(alias, adapter, by=by, reason=reason)

    def move_alias(self, alias: str, adapter: PublishedAdapter, *, by: str, reason: str) -> None:
        """Point `alias` at `adapter` and record the move (no await in here: a request sees the old target or the new
        one, and one in flight finishes on the version it resolved)."""
        previous = self.published.get(self.aliases.get(alias, ""))
        if previous is adapter:
            return
        if previous is not None:
            previous.aliases.remove(alias)
            logger.info("alias %s moves from %s to %s", alias, previous.name, adapter.name)
        self.aliases[alias] = adapter.name
        if alias not in adapter.aliases:
            adapter.aliases.append(alias)
        self._moves += 1
        adapter.promoted_at = self._moves
        self.store.moved(alias, adapter, previous.name if previous else None, by, reason)
        self.store.save(self)
        self._changed()

    async def _unload_everywhere(self, name: str) -> None:
        """Unload `name` from every holder, each once its requests in flight there are done (bounded wait)."""
        for worker in self.holders(name):
            deadline = time.monotonic() + self.cfg.request_timeout_s
            while worker.busy_with(name) and time.monotonic() < deadline:
                await asyncio.sleep(0.1)
            await self._unload(worker, name)

    async def place_restored(self, names: list[str]) -> None:
        """Load restored adapters on workers as they come up (up to `adapter_replicas` each), until each is placed on
        one at least or unpublished; requests load them on demand meanwhile."""
        waiting = list(names)
        while waiting:
            for name in list(waiting):
                adapter = self.published.get(name)
                if adapter is None or self.holders(name):
                    waiting.remove(name)
                    continue
                for worker in [w for w in self._ranked(adapter) if w.healthy][: self.cfg.adapter_replicas]:
                    try:
                        await self.ensure_on(worker, adapter)
                    except (UpstreamError, RouterError) as exc:
                        logger.info("restored adapter %s not loaded on %s yet: %s", name, worker.id, exc)
            await asyncio.sleep(self.cfg.health_interval_s)

    async def unpublish(self, name: str) -> bool:
        """Forget `name` and its aliases (no new request reaches it), and unload it everywhere: at once where it is
        idle, after its requests in flight finish elsewhere. Returns False if it was not published."""
        adapter = self.published.pop(name, None)
        for alias in [a for a, n in self.aliases.items() if n == name]:
            del self.aliases[alias]
        self.store.save(self)
        for worker in self.holders(name):
            if worker.busy_with(name):
                task = asyncio.create_task(self._unload_when_idle(worker, name))
                self._retiring.add(task)
                task.add_done_callback(self._retiring.discard)
            else:
                await self._unload(worker, name)
        self._changed()
        return adapter is not None

    async def _unload_when_idle(self, worker: Worker, name: str, unless_allowed: bool = False) -> None:
        """Unload `name` from `worker` once its requests there are done: unless it was published again meanwhile
        (or, with `unless_allowed`, unless it is published and `worker` may hold it again)."""
        deadline = time.monotonic() + self.cfg.request_timeout_s
        while worker.busy_with(name) and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        adapter = self.published.get(name)
        if adapter is None or (unless_allowed and worker.id not in {w.id for w in self.hosts(adapter)}):
            await self._unload(worker, name)

    def describe(self) -> list[dict[str, Any]]:
        """All published adapters with the workers holding them."""
        return [a.describe([w.id for w in self.holders(a.name)]) for a in self.published.values()]

    def forget_worker(self, worker: Worker) -> None:
        """Drop the load locks of a removed worker (a load in progress keeps its own reference)."""
        for key in [k for k in self._locks if k[0] == worker.id]:
            del self._locks[key]

    # -- on the request path --
    def _ranked(self, adapter: PublishedAdapter) -> list[Worker]:
        hosts = {w.id: w for w in self.hosts(adapter)}
        order = rank(
            "least_outstanding", [w.candidate(adapter.name in w.adapters) for w in hosts.values()], RouteHints()
        )
        return [hosts[c.id] for c in order]

    async def ensure_on(self, worker: Worker, adapter: PublishedAdapter, *, on_request: bool = False) -> None:
        """Make sure `worker` holds `adapter`, loading it (after an LRU unload if the worker is full: a version no
        alias names goes first). `on_request`: a request waits on this load (counted apart from loads ahead).

        Raises:
            UpstreamError: the worker failed (connection, timeout, 5xx) or refused the adapter (4xx, `LoadRefused`,
                e.g. a path it cannot read): try another.
        """
        lock = self._locks.setdefault((worker.id, adapter.name), asyncio.Lock())
        async with lock:
            if adapter.name in worker.adapters:
                return
            while len(worker.adapters) >= worker.max_adapters:
                idle = [a for a in worker.adapters if not worker.busy_with(a)]
                if not idle:  # every resident adapter is answering someone: this worker cannot take another now
                    raise NoRoom(worker.id, f"all {len(worker.adapters)} adapters loaded there have requests in flight")
                keep = {a.name for a in self.wanted().get(worker.id, [])}
                victim = min(idle, key=lambda a: (a in keep, self._is_pinned(a), worker.adapter_used.get(a, 0.0)))
                if not await self._unload(worker, victim):
                    raise UpstreamError(worker.id, f"could not unload adapter {victim!r} to make room")
            await self._load(worker, adapter, on_request)

    def _is_pinned(self, name: str) -> bool:
        adapter = self.published.get(name)
        return adapter is not None and self.pinned(adapter)

    def note_hot(self, name: str) -> None:
        """After routing to `name`: if every holder is at capacity, load it on one more worker in the background."""
        adapter = self.published.get(name)
        if adapter is None or name in self._spreading:
            return
        holders = [w for w in self.holders(name) if w.healthy and not w.draining]
        if len(holders) >= self.cfg.max_adapter_replicas or any(w.outstanding < w.capacity for w in holders):
            return
        spare = [w for w in self._ranked(adapter) if name not in w.adapters and w.healthy and not w.draining]
        if spare:
            self._spreading.add(name)
            task = asyncio.create_task(self._spread(spare[0], adapter))
            task.add_done_callback(lambda _t: self._spreading.discard(name))

    async def _spread(self, worker: Worker, adapter: PublishedAdapter) -> None:
        try:
            await self.ensure_on(worker, adapter)
            logger.info("adapter %s is hot: also loaded on %s", adapter.name, worker.id)
        except (UpstreamError, RouterError) as exc:
            logger.warning("could not spread hot adapter %s to %s: %s", adapter.name, worker.id, exc)

    # -- the worker API --
    async def _load(self, worker: Worker, adapter: PublishedAdapter, on_request: bool = False) -> None:
        when = "request" if on_request else "ahead"
        adapter.loads[when] += (
            1  # attempts, failed ones too: a request that waited on a load counts, whatever came of it
        )
        self.metrics.adapter_loads_when.labels(when).inc()
        status, text = await self._post(
            worker, "/v1/load_lora_adapter", {"lora_name": adapter.name, "lora_path": adapter.path}
        )
        if status == 200 or (status == 400 and "already been loaded" in text):
            worker.adapters.add(adapter.name)
            worker.adapter_used[adapter.name] = time.monotonic()  # a fresh load counts as a use for the LRU
            self.metrics.adapter_loads.labels("ok").inc()
            logger.info(
                "adapter %s loaded on %s (%s)",
                adapter.name,
                worker.id,
                "on the request path" if on_request else "ahead of traffic",
            )
            return
        self.metrics.adapter_loads.labels("failed").inc()
        if status >= 500:
            raise UpstreamError(worker.id, f"load_lora_adapter answered {status}: {text[:300]}")
        logger.warning("worker %s refused adapter %s (%s): %s", worker.id, adapter.name, status, text[:300])
        raise LoadRefused(worker.id, f"refused adapter {adapter.name!r} ({status}): {text[:300]}")

    async def _unload(self, worker: Worker, name: str) -> bool:
        """Unload `name` from `worker`; returns whether it is gone (a failure is logged)."""
        try:
            status, text = await self._post(worker, "/v1/unload_lora_adapter", {"lora_name": name})
        except UpstreamError as exc:
            logger.warning("unload of %s from %s failed: %s", name, worker.id, exc)
            return False
        if status not in (200, 404):
            logger.warning("unload of %s from %s answered %s: %s", name, worker.id, status, text[:200])
            return False
        worker.adapters.discard(name)
        worker.adapter_used.pop(name, None)
        logger.info("adapter %s unloaded from %s", name, worker.id)
        return True

    async def _post(self, worker: Worker, path: str, payload: dict[str, Any]) -> tuple[int, str]:
        import aiohttp

        try:
            timeout = aiohttp.ClientTimeout(total=self.cfg.adapter_load_timeout_s, connect=self.cfg.connect_timeout_s)
            async with self.session.post(
                worker.url + path, json=payload, headers=worker.headers, timeout=timeout
            ) as resp:
                return resp.status, await resp.text()
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            self.registry.probe_soon(worker)
            raise UpstreamError(worker.id, f"{path} failed: {exc!r}") from exc
