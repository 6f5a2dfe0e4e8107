"""The worker fleet as the router sees it: who is there, what they serve, and whether they are healthy.

Workers come from settings (static) and from registration (`POST /admin/workers`). A background task probes each
worker every `health_interval_s` (`GET /health`, then `GET /v1/models` to re-list its models and loaded adapters);
a failure seen while forwarding triggers an immediate probe. An unhealthy worker gets no traffic and is
re-admitted as soon as a probe succeeds; a joined worker unhealthy or silent for `worker_expiry_s` is removed.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Iterable

from fedllm.core.secrets import hash_secret, same_secret
from fedllm.serve.errors import RouterError
from fedllm.serve.policy import Candidate
from fedllm.serve.quarantine import QuarantineBook, addresses_of
from fedllm.serve.residency import RegionBook
from fedllm.serve.worker_address import WorkerAddress, is_own_address, local_hosts, normalised_address, parse_worker_url

if TYPE_CHECKING:
    import aiohttp

    from fedllm.core.sections.serve import ServeSettings

logger = logging.getLogger(__name__)

EWMA_ALPHA = 0.2
ROUND_TRIP_WINDOW = 16  # round trips kept per worker for its distance (the shortest of them)


def new_worker_id() -> str:
    """A random worker id (never a counter: ids must not repeat after a router restart)."""
    return f"w-{secrets.token_hex(5)}"


def upstream_headers(api_key: str | None) -> dict[str, str]:
    """The headers of every call to a worker: JSON, and its API key when it has one."""
    headers = {"content-type": "application/json"}
    if api_key:
        headers["authorization"] = f"Bearer {api_key}"
    return headers


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
    round_trips: deque[float] = field(default_factory=lambda: deque(maxlen=ROUND_TRIP_WINDOW))  # recent, ms
    measured_since_probe: bool = False  # a request measured its latency since the last health probe
    probe_timeouts: int = 0  # consecutive periodic probes that timed out (one alone is not proof it is down)
    last_ok: float = field(default_factory=time.monotonic)
    last_heartbeat: float = field(default_factory=time.monotonic)
    adapter_used: dict[str, float] = field(default_factory=dict)  # adapter -> monotonic time of its last request
    inflight: dict[str, int] = field(default_factory=dict)  # model or adapter -> requests in flight on it
    declared_models: tuple[str, ...] = ()
    secret_hash: str | None = None  # a joined worker's own secret (heartbeat, drain, leave), hashed
    headers: dict[str, str] = field(default_factory=lambda: upstream_headers(None))  # sent with every call to it
    quarantined: bool = False  # failed a canary check: no traffic until an operator clears it
    canary: str = (
        "off"  # trusted (static) | off | pending | passed | unverified | failed | cleared (fedllm.serve.canary)
    )
    canary_passes: int = 0  # canary checks passed since it joined (or was cleared)
    unverified: set[str] = field(
        default_factory=set
    )  # models no trusted worker serves: no traffic (serve.allow_unverified)
    hold: str = ""  # why it gets no traffic at all besides health and quarantine ("" = none)
    address: str = ""  # normalised host:port (fedllm.serve.worker_address)
    addresses: frozenset[str] = frozenset()  # every host:port it is known by (its resolved IPs too): quarantine keys
    key_hash: str | None = None  # hash of its own API key: a quarantine key
    max_adapters: int = 4  # adapters it holds at once: its declared max_loras, at most serve.max_adapters_per_worker
    region_assigned: bool = (
        False  # the operator set its region (static, or confirmed): data residency trusts it (fedllm.serve.residency)
    )

    @property
    def routable(self) -> bool:
        """Whether it may be given requests at all: not quarantined, and not held (fedllm.serve.canary)."""
        return not self.quarantined and not self.hold

    def owns(self, token: str) -> bool:
        """Whether `token` is this worker's own secret (constant time)."""
        return self.secret_hash is not None and same_secret(hash_secret(token), self.secret_hash)

    def candidate(self, resident: bool = True) -> Candidate:
        """The snapshot the policy sees."""
        return Candidate(
            self.id,
            self.region,
            self.outstanding,
            self.capacity,
            self.ttft_ms,
            self.healthy and self.routable,
            self.draining,
            resident,
            self.static or self.region_assigned,
            self.distance_ms,
        )

    def begin(self, model: str) -> None:
        """A request for `model` starts on this worker (an adapter with requests in flight is never unloaded)."""
        self.outstanding += 1
        self.inflight[model] = self.inflight.get(model, 0) + 1

    def end(self, model: str) -> None:
        """A request for `model` is over on this worker."""
        self.outstanding -= 1
        self.inflight[model] -= 1

    def busy_with(self, model: str) -> bool:
        """Whether requests for `model` are in flight here."""
        return self.inflight.get(model, 0) > 0

    def observe_ttft(self, ms: float) -> None:
        """Fold one time-to-first-byte measurement into the EWMA."""
        self.ttft_ms = ms if self.ttft_ms == 0.0 else (1 - EWMA_ALPHA) * self.ttft_ms + EWMA_ALPHA * ms
        self.measured_since_probe = True
        self.round_trips.append(ms)

    def observe_probe(self, ms: float) -> None:
        """A health probe's round trip. While requests measure the worker, they alone set its latency; a worker no
        request has measured since the last probe (the policy prefers others) has a stale estimate, and one slow
        request would otherwise keep it out for good: the probe's time then folds into the EWMA, so it is tried and
        measured by requests again once it is near again."""
        if self.ttft_ms != 0.0 and not self.measured_since_probe:
            self.ttft_ms = (1 - EWMA_ALPHA) * self.ttft_ms + EWMA_ALPHA * ms
        self.measured_since_probe = False
        self.round_trips.append(ms)

    @property
    def distance_ms(self) -> float | None:
        """The shortest of its recent round trips (probes and requests), None before the first."""
        return min(self.round_trips) if self.round_trips else None

    def describe(self) -> dict[str, Any]:
        """The row of `GET /admin/workers` (docs/CONTRACTS.md)."""
        return {
            "id": self.id,
            "url": self.url,
            "region": self.region,
            "region_assigned": self.region_assigned,
            "max_adapters": self.max_adapters,
            "healthy": self.healthy,
            "draining": self.draining,
            "outstanding": self.outstanding,
            "latency_ms": round(self.ttft_ms, 3),
            "distance_ms": None if self.distance_ms is None else round(self.distance_ms, 3),
            "capacity": self.capacity,
            "models": sorted(self.models),
            "adapters": sorted(self.adapters),
            "static": self.static,
            "quarantined": self.quarantined,
            "canary": self.canary,
            "unverified": sorted(self.unverified),
            "no_traffic": "quarantined: its canary answers differed from a trusted worker's"
            if self.quarantined
            else (self.hold or None),
        }


class WorkerRegistry:
    """The fleet. `start()` runs the health loop; `probe()` checks one worker now."""

    def __init__(self, cfg: ServeSettings, session: aiohttp.ClientSession | None = None):
        self.cfg = cfg
        self.session = session
        self.workers: dict[str, Worker] = {}
        self._task: asyncio.Task | None = None
        self._probing: dict[str, asyncio.Task] = {}
        self.quarantine: QuarantineBook | None = None  # sticky quarantine records (set by the app)
        self.regions: RegionBook | None = None  # the operator's region assignments of joined workers (set by the app)
        self.on_remove: list[
            Callable[[Worker], None]
        ] = []  # called with each removed worker (fedllm.serve.app wires them)
        self._local_hosts: frozenset[str] | None = None

    @property
    def http(self) -> aiohttp.ClientSession:
        """The session for calls to workers (the router's lifespan sets `session` before the first call)."""
        if self.session is None:
            raise RuntimeError("the worker registry has no HTTP session: the router's lifespan sets one at startup")
        return self.session

    # -- membership --
    def add_static(
        self,
        url: str,
        *,
        region: str = "local",
        models: Iterable[str] = (),
        api_key: str | None = None,
        max_loras: int | None = None,
    ) -> Worker:
        """Add a worker named in settings: trusted (its region too), never expired or removed. It is healthy once
        probed."""
        worker = Worker(
            new_worker_id(),
            url.rstrip("/"),
            region,
            self.cfg.worker_capacity,
            static=True,
            declared_models=tuple(models),
            headers=upstream_headers(api_key),
            canary="trusted",
            address=_address_or_blank(url),
            max_adapters=self.adapter_slots(max_loras),
            region_assigned=True,
        )
        self.workers[worker.id] = worker
        logger.info("static worker %s: %s region=%s", worker.id, worker.url, region)
        return worker

    def adapter_slots(self, max_loras: int | None) -> int:
        """Adapters a worker holds at once: what it declares (its vLLM --max-loras), never more than
        `serve.max_adapters_per_worker` (the default when it declares nothing)."""
        ceiling = self.cfg.max_adapters_per_worker
        return min(max_loras, ceiling) if max_loras else ceiling

    def check_join(self, url: str, api_key: str | None, capacity: int | None) -> WorkerAddress:
        """The join rules that need no network (docs/CONTRACTS.md, "Join rules"); returns the normalised address.

        Raises:
            RouterError: 400 a URL that is not scheme://host:port, no API key, plain HTTP beyond loopback (unless
                `serve.allow_plain_http_workers`), the router's own address, a capacity over
                `serve.max_worker_capacity`; 409 the fleet already has `serve.max_workers` workers.
        """
        try:
            address = parse_worker_url(url)
        except ValueError as exc:
            raise RouterError(400, str(exc), param="url") from None
        if not api_key:
            raise RouterError(
                400,
                "a worker joins with its own API key (api_key): the router sends it on every call, "
                "and the worker's gate refuses calls without it",
                param="api_key",
            )
        if address.scheme == "http" and not address.loopback and not self.cfg.allow_plain_http_workers:
            raise RouterError(
                400,
                f"refusing plain http:// for the worker at {address.key}: its API key and every prompt "
                "would cross the network in clear; serve it over https:// (tls_cert/tls_key) or set "
                "serve.allow_plain_http_workers: true",
                param="url",
            )
        if self._is_own(address):
            raise RouterError(
                400, f"{address.key} is this router's own address; a worker must be another server", param="url"
            )
        if capacity is not None and capacity > self.cfg.max_worker_capacity:
            raise RouterError(
                400,
                f"capacity {capacity} is over this router's ceiling of {self.cfg.max_worker_capacity} "
                "(serve.max_worker_capacity)",
                param="capacity",
            )
        replacing = any(_address_key(w.url) == address.key for w in self.workers.values())
        if not replacing and len(self.workers) >= self.cfg.max_workers:
            raise RouterError(
                409,
                f"the fleet is full: {len(self.workers)} workers (serve.max_workers); remove one or raise the limit",
            )
        return address

    def _is_own(self, address: WorkerAddress) -> bool:
        if self._local_hosts is None:
            self._local_hosts = local_hosts()
        return is_own_address(address, self.cfg.host, self.cfg.port, self._local_hosts)

    async def join(
        self,
        url: str,
        *,
        region: str = "local",
        models: Iterable[str] = (),
        capacity: int | None = None,
        api_key: str | None = None,
        max_loras: int | None = None,
    ) -> tuple[Worker, str]:
        """Admit a worker that registered itself, after reading what it serves; returns it and its new secret.

        The join rules (`check_join`) come first. Its models are those its `/v1/models` lists; every declared one must
        be among them, and its list is fixed from now on (the declared ones, else those listed now). Joining again
        under any spelling of the address of a joined worker replaces that entry but keeps its draining and quarantine
        marks, and the region an operator assigned it (its new claim does not replace that). A quarantined worker (by
        address or API key) cannot join. No answer of the worker is echoed to the caller (it is logged).

        Raises:
            RouterError: see `check_join`; 400 the worker does not serve a declared model or lists none; 403 it is
                quarantined (serve/quarantine.py); 409 the address is a static worker; 502 its `/v1/models` could not
                be read (unreachable, wrong API key).
        """
        address = self.check_join(url, api_key, capacity)
        url = address.url
        previous = next(
            (w for w in self.workers.values() if w.address == address.key or _address_key(w.url) == address.key), None
        )
        if previous is not None and previous.static:
            raise RouterError(409, f"{address.key} is the static worker {previous.id} (serve.workers); it cannot join")
        headers = upstream_headers(api_key)
        try:
            addresses = await addresses_of(url)
        except ValueError as exc:
            raise RouterError(400, str(exc), param="url") from exc
        key_hash = hash_secret(api_key) if api_key else None
        record = self.quarantine.match(addresses, key_hash) if self.quarantine is not None else None
        if record is not None:
            raise RouterError(
                403,
                f"this worker ({record.address}) is quarantined since its canary answers differed from a "
                "trusted worker's; it cannot join until an operator clears it "
                f"(`appliance fleet unquarantine {record.address}`)",
            )
        try:
            listing = await self._fetch_models(url, headers)
        except RouterError as exc:
            logger.warning("join of %s refused: %s", url, exc.message)
            raise RouterError(
                502,
                f"cannot verify the worker at {address.key}: its GET /v1/models did not answer a model "
                "list with the API key given (is it running, and is this its key?)",
            ) from exc
        seen = {card["id"] for card in _cards(listing) if not card.get("parent")}
        declared = tuple(models)
        missing = [m for m in declared if m not in seen]
        if missing or not seen:
            logger.warning("join of %s refused: declared %s, its /v1/models lists %s", url, declared, sorted(seen))
            raise RouterError(
                400,
                f"the worker at {address.key} does not serve "
                f"{', '.join(missing) if missing else 'any model'} (its /v1/models)",
                param="models",
            )
        secret = secrets.token_urlsafe(32)
        # Its model list is fixed here: what it declared, else what it lists now (a change needs a new join).
        worker = Worker(
            new_worker_id(),
            url,
            region,
            capacity or self.cfg.worker_capacity,
            declared_models=declared or tuple(sorted(seen)),
            secret_hash=hash_secret(secret),
            headers=headers,
            address=address.key,
            addresses=frozenset(addresses),
            key_hash=key_hash,
            max_adapters=self.adapter_slots(max_loras),
        )
        if previous is not None:  # a worker cannot shed its marks by joining again
            worker.draining, worker.quarantined = previous.draining, previous.quarantined
            if previous.region_assigned:  # the operator's assignment stands; a new claim does not replace it
                worker.region, worker.region_assigned = previous.region, True
            worker.canary = "failed" if previous.quarantined else worker.canary
            self.remove(previous.id)
        assigned = self.regions.lookup(address.key) if self.regions is not None else None
        if assigned is not None:  # the operator put the worker at this address in a region (fedllm.serve.residency)
            worker.region, worker.region_assigned = assigned, True
        self._apply_listing(worker, listing)
        self.workers[worker.id] = worker
        logger.info("worker %s joined: %s region=%s models=%s", worker.id, url, region, ",".join(sorted(worker.models)))
        return worker, secret

    def remove(self, worker_id: str) -> Worker | None:
        """Forget a worker and every piece of state kept for it (its probe, then each `on_remove` hook: metrics
        series, locks, latency tables); returns it, or None if unknown."""
        worker = self.workers.pop(worker_id, None)
        if worker is not None:
            probe = self._probing.pop(worker_id, None)
            if probe is not None and not probe.done() and probe is not asyncio.current_task():
                probe.cancel()
            for forget in self.on_remove:
                forget(worker)
            logger.info("worker %s removed: %s", worker_id, worker.url)
        return worker

    def healthy(self) -> list[Worker]:
        """Workers that are healthy and routable (draining ones included: they finish what they have)."""
        return [w for w in self.workers.values() if w.healthy and w.routable]

    def serving(self, model: str) -> list[Worker]:
        """Routable workers that list `model` as a base model or a loaded adapter (healthy or not)."""
        return [
            w
            for w in self.workers.values()
            if (model in w.models or model in w.adapters) and w.routable and model not in w.unverified
        ]

    def trusted(self) -> list[Worker]:
        """Healthy static workers: the reference answers of canary checks come from them."""
        return [w for w in self.workers.values() if w.static and w.healthy]

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
            self._probing[worker.id] = asyncio.create_task(self.probe(worker, suspect=True))

    async def probe(self, worker: Worker, suspect: bool = False) -> bool:
        """Check `/health` and re-list `/v1/models`; update health, latency, models and adapters. Returns healthy.

        A refused connection or a bad answer marks the worker unhealthy at once. A timeout does so only when it
        confirms something: a forwarding failure (`suspect`, from `probe_soon`) or the previous probe's timeout; a
        lone periodic probe that timed out on a busy machine leaves a worker that answers requests in service."""
        import aiohttp

        timed_out = False
        try:
            sent = time.perf_counter()
            async with self.http.get(f"{worker.url}/health", timeout=self._probe_timeout()) as resp:
                ok = resp.status == 200
            if ok:
                worker.observe_probe((time.perf_counter() - sent) * 1000)
                self._apply_listing(worker, await self._fetch_models(worker.url, worker.headers))
        except asyncio.TimeoutError as exc:
            ok, timed_out = False, True
            logger.debug("probe of %s timed out: %s", worker.id, exc)
        except (aiohttp.ClientError, ValueError, RouterError) as exc:
            ok = False
            logger.debug("probe of %s failed: %s", worker.id, exc)
        worker.probe_timeouts = worker.probe_timeouts + 1 if timed_out else 0
        if timed_out and worker.healthy and not suspect and worker.probe_timeouts < 2:
            logger.info(
                "probe of worker %s (%s) timed out once; it stays in service until a second one", worker.id, worker.url
            )
            return True
        if ok != worker.healthy:
            logger.log(
                logging.INFO if ok else logging.WARNING,
                "worker %s (%s) is now %s",
                worker.id,
                worker.url,
                "healthy" if ok else "unhealthy",
            )
        worker.healthy = ok
        if ok:
            worker.last_ok = time.monotonic()
        return ok

    def _probe_timeout(self):
        import aiohttp

        return aiohttp.ClientTimeout(total=max(2.0, min(10.0, self.cfg.health_interval_s * 2)))

    async def _fetch_models(self, url: str, headers: dict[str, str]) -> dict[str, Any]:
        """The worker's `/v1/models` answer.

        Raises:
            RouterError: it did not answer 200 with JSON (the message says what it answered).
        """
        import aiohttp

        try:
            async with self.http.get(f"{url}/v1/models", headers=headers, timeout=self._probe_timeout()) as resp:
                if resp.status != 200:
                    hint = " (wrong or missing worker API key)" if resp.status == 401 else ""
                    raise RouterError(502, f"GET /v1/models answered {resp.status}{hint}")
                listing = await resp.json(content_type=None)
        except (aiohttp.ClientError, asyncio.TimeoutError, ValueError) as exc:
            raise RouterError(502, f"GET /v1/models failed: {type(exc).__name__}: {exc}") from exc
        if not isinstance(listing, dict):
            raise RouterError(502, "GET /v1/models did not answer a JSON object")
        return listing

    @staticmethod
    def _apply_listing(worker: Worker, listing: dict[str, Any]) -> None:
        """Models: what the worker lists (only the declared ones, if it declared some; a joined worker's are fixed at
        join). Adapters: what it lists; for a joined worker only among those the router itself loaded there (it cannot
        attract traffic for others)."""
        models: set[str] = set()
        adapters: set[str] = set()
        for card in _cards(listing):
            (adapters if card.get("parent") else models).add(card["id"])
        if worker.declared_models:
            models &= set(worker.declared_models)
        if not worker.static:
            adapters &= worker.adapters
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


def _address_key(url: str) -> str:
    """The normalised host:port of a worker's URL (the URL itself for a static one that is not scheme://host:port)."""
    try:
        return normalised_address(url)
    except ValueError:
        return url


def _cards(listing: dict[str, Any]) -> list[dict[str, Any]]:
    """The well-formed model cards of a `/v1/models` answer."""
    data = listing.get("data")
    return [c for c in data if isinstance(c, dict) and isinstance(c.get("id"), str)] if isinstance(data, list) else []


def _address_or_blank(url: str) -> str:
    """The normalised address of a static worker's URL ("" when it cannot be read: settings validate it elsewhere)."""
    try:
        return normalised_address(url)
    except ValueError:
        return ""
