"""The attempt loop: find the first answer to start among a request's workers, retrying and hedging.

`Attempts.first_answer(ctx, workers)` tries the workers in the policy's order. Retries happen only before the client
has seen a byte: a connection error, a timeout or a 5xx answer moves on to the next worker (bounded by
`serve.max_retries`, with doubling backoff). With `serve.hedge: on` (`serve/hedging.py`) trying a worker is a race:
the answer's first chunk is awaited before anything is sent, and a first byte later than the worker's learned delay
starts the next worker too (once per request); the first answer to start wins and the loser's connection is closed
(the worker aborts it). Without hedging only a stream's headers are awaited. Nothing here sends to the client: the
forwarder delivers the answer returned (`serve/forwarding.py`).
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

from fedllm.serve.errors import UpstreamError

if TYPE_CHECKING:
    import aiohttp

    from fedllm.core.sections.serve import ServeSettings
    from fedllm.serve.forwarding import RequestContext
    from fedllm.serve.hedging import Hedger
    from fedllm.serve.metrics import RouterMetrics
    from fedllm.serve.placement import AdapterPlacement
    from fedllm.serve.registry import Worker, WorkerRegistry

logger = logging.getLogger("fedllm.serve.forwarding")  # one logger for the hot path, as before the split


class AllFailed(Exception):
    """Every worker tried failed before its first byte; `reasons` names each failure (for the router's log only)."""

    def __init__(self, reasons: list[str]) -> None:
        super().__init__("; ".join(reasons))
        self.reasons = reasons


@dataclass(slots=True)
class Opened:
    """An answer that has started on one worker (`Attempts.open`) and not yet been sent to the client."""

    worker: Worker
    resp: aiohttp.ClientResponse
    sent: float  # perf_counter() when the request was sent to the worker
    ttft_s: float | None = None  # seconds to the first byte read (None: only the headers were awaited)
    payload: bytes | None = None  # a non-streamed answer, read whole
    first: bytes | None = None  # a stream's first chunk, when it was awaited


class Attempts:
    """Sends a request to workers until an answer starts. One per forwarder."""

    def __init__(
        self,
        cfg: ServeSettings,
        registry: WorkerRegistry,
        placement: AdapterPlacement,
        metrics: RouterMetrics,
        hedger: Hedger | None,
    ) -> None:
        self.cfg = cfg
        self.registry = registry
        self.placement = placement
        self.metrics = metrics
        self.hedger = hedger
        self.timeout: aiohttp.ClientTimeout | None = None
        # Told of each request sent to a joined worker, with its path and streaming (fedllm.serve.canary).
        self.on_routed: Callable[[Worker, str, bool], None] | None = None

    async def first_answer(self, ctx: RequestContext, workers: list[Worker]) -> Opened:
        """The first answer to start among `workers`, tried in order (each try a hedged race with `serve.hedge: on`).

        `ctx.watch.worker` follows the worker being tried. Raises AllFailed when every try failed before its first
        byte; a cancellation (the client left) closes every upstream connection still open.
        """
        if self.timeout is None:
            import aiohttp

            cfg = self.cfg
            self.timeout = aiohttp.ClientTimeout(
                total=None, connect=cfg.connect_timeout_s, sock_read=cfg.request_timeout_s
            )
        race = _Race(self, ctx) if self.hedger is not None and len(workers) > 1 else None
        queue = list(workers)
        reasons: list[str] = []
        try:
            for attempt in range(1 + self.cfg.max_retries):
                worker = queue.pop(0)
                ctx.watch.worker = worker
                if attempt:
                    self.metrics.retries.inc()
                    await asyncio.sleep(self.cfg.retry_backoff_s * 2 ** (attempt - 1))
                try:
                    if race is None:
                        return await self.open(ctx, worker, first_chunk=False)
                    opened = await race.run(worker, queue, reasons, lead=attempt == 0)
                    if opened is not None:
                        return opened
                except UpstreamError as exc:
                    more = bool(queue) and attempt < self.cfg.max_retries
                    logger.warning(
                        "worker %s failed before the first byte (%s); %s",
                        worker.id,
                        exc.reason,
                        "trying another" if more else "no more workers to try",
                    )
                    reasons.append(str(exc))
                if not queue:
                    break
        except asyncio.CancelledError:
            if race is not None and race.hedge is not None:
                self.metrics.hedges.labels("aborted").inc()
            raise
        if race is not None and race.hedge is not None:
            self.metrics.hedges.labels("failed").inc()
        raise AllFailed(reasons)

    async def open(self, ctx: RequestContext, worker: Worker, first_chunk: bool) -> Opened:
        """Send the request to `worker` and wait for its answer to start: the whole body of a non-streamed answer,
        a stream's headers (or, with `first_chunk`, its first chunk too). Nothing is sent to the client.

        The request's adapter is loaded on `worker` first if it lacks it (shielded: a client that leaves must not
        abandon a load that later requests will need). The worker counts the request in flight from the send on;
        delivering or `discard` ends that. On any failure or cancellation the upstream connection is closed (the
        worker aborts the generation) and the count is returned.

        Raises:
            UpstreamError: the worker failed before its first byte (connection error, timeout, 5xx, broken answer).
        """
        import aiohttp

        model = ctx.model
        if ctx.adapter is not None and model not in worker.adapters:
            await asyncio.shield(self.placement.ensure_on(worker, ctx.adapter, on_request=True))
        worker.begin(model)
        sent = time.perf_counter()
        resp = None
        try:
            try:
                if not worker.static and self.on_routed is not None:  # a joined worker: maybe a canary check soon
                    self.on_routed(worker, ctx.path, ctx.fields.stream)
                resp = await self.registry.http.post(
                    worker.url + ctx.path, data=ctx.body, headers=worker.headers, timeout=self.timeout
                )
            except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
                if isinstance(exc, aiohttp.ClientConnectorError):
                    worker.healthy = False  # refused/unreachable: no more traffic until a probe says otherwise
                self.registry.probe_soon(worker)
                raise UpstreamError(worker.id, f"{type(exc).__name__}: {exc}") from exc
            if resp.status >= 500:
                status, text = resp.status, await _safe_text(resp)
                resp = None  # released by _safe_text
                self.registry.probe_soon(worker)
                raise UpstreamError(worker.id, f"answered {status}: {text[:200]}")
            if not (ctx.fields.stream and resp.status == 200):
                try:
                    payload = await resp.read()
                except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
                    self.registry.probe_soon(worker)
                    raise UpstreamError(worker.id, f"broke before the answer was complete: {exc!r}") from exc
                resp.release()
                return Opened(worker, resp, sent, time.perf_counter() - sent, payload=payload)
            if not first_chunk:
                return Opened(worker, resp, sent)
            try:
                chunk = await resp.content.readany()
            except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
                self.registry.probe_soon(worker)
                raise UpstreamError(worker.id, f"stream broke before its first byte: {exc!r}") from exc
            if not chunk:
                raise UpstreamError(worker.id, "the stream ended before its first byte")
            return Opened(worker, resp, sent, time.perf_counter() - sent, first=chunk)
        except BaseException:
            if resp is not None:
                resp.close()  # closes the upstream connection: the worker aborts the generation
            worker.end(model)
            raise

    @staticmethod
    def discard(ctx: RequestContext, opened: Opened) -> None:
        """Drop an answer that started but lost the race: close its connection (the worker aborts it)."""
        opened.resp.close()
        opened.worker.end(ctx.model)

    @staticmethod
    def may_hedge(ctx: RequestContext, worker: Worker) -> bool:
        """Whether `worker` may take a hedge now: routable, below its capacity, and holding the adapter if any."""
        return (
            worker.healthy
            and worker.routable
            and not worker.draining
            and worker.outstanding < worker.capacity
            and (ctx.adapter is None or ctx.model in worker.adapters)
        )


class _Race:
    """One request's hedging: each try of a worker races a hedge on the next worker, at most once per request."""

    def __init__(self, attempts: Attempts, ctx: RequestContext) -> None:
        assert attempts.hedger is not None
        self.attempts = attempts
        self.hedger = attempts.hedger
        self.ctx = ctx
        self.hedge: asyncio.Future | None = None  # the request's hedge, once started
        self.hedger.request()

    async def run(self, worker: Worker, queue: list[Worker], reasons: list[str], lead: bool) -> Opened | None:
        """Try `worker`; if its first byte is later than its learned delay, start `queue[0]` too (once per request,
        when that worker can take it and the budget allows), and return the first answer to start. The other
        attempt is cancelled, which closes its upstream connection (the worker aborts it) and ends its count. Nothing
        reaches the client before the race is decided, so a request is never doubled once its first byte is out.

        Returns None when every attempt of this try failed before its first byte (each failure logged, its reason
        appended to `reasons`). `lead`: this is the request's first try, whose wait teaches the hedger and the policy
        when it loses.
        """
        attempts, hedger, ctx = self.attempts, self.hedger, self.ctx
        loop = asyncio.get_running_loop()
        running: dict[asyncio.Future, tuple[Worker, float]] = {}  # attempt -> its worker, loop time it started
        winner: tuple[asyncio.Future, Opened] | None = None

        def launch(target: Worker) -> asyncio.Future:
            task = asyncio.ensure_future(attempts.open(ctx, target, first_chunk=True))
            running[task] = (target, loop.time())
            return task

        first = launch(worker)
        delay = hedger.delay_s((worker.id, ctx.fields.stream))
        hedge_at = None if delay is None or self.hedge is not None else loop.time() + delay
        try:
            while running:
                timeout = None if hedge_at is None or not queue else max(0.0, hedge_at - loop.time())
                done, _ = await asyncio.wait(running, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
                if not done:  # the first byte is late: hedge, once, if the next worker can take it and budget allows
                    hedge_at = None
                    if attempts.may_hedge(ctx, queue[0]) and hedger.take():
                        logger.info(
                            "worker %s has not answered after its hedge delay; hedging on %s", worker.id, queue[0].id
                        )
                        self.hedge = launch(queue.pop(0))
                    continue
                unexpected = None
                for task in done:
                    failed, _ = running.pop(task)
                    exc = task.exception()
                    if exc is None and winner is None:
                        winner = (task, task.result())
                    elif exc is None:
                        attempts.discard(ctx, task.result())
                    elif isinstance(exc, UpstreamError):
                        logger.warning("worker %s failed before the first byte (%s)", failed.id, exc.reason)
                        reasons.append(str(exc))
                    else:
                        unexpected = exc
                if unexpected is not None:
                    if winner is not None:
                        attempts.discard(ctx, winner[1])
                        winner = None
                    raise unexpected
                if winner is not None:
                    break
        finally:
            for task, (loser, started) in running.items():
                task.cancel()  # the loser: its connection is closed as it unwinds (the worker aborts the request)
                _unwinding.add(task)
                task.add_done_callback(_unwound)
                if winner is not None and lead and task is first:  # at least this slow: tell the hedger and the policy
                    waited = loop.time() - started
                    hedger.observe((loser.id, ctx.fields.stream), waited)
                    loser.observe_ttft(waited * 1000)
        if winner is None:
            return None
        task, opened = winner
        if self.hedge is not None:
            attempts.metrics.hedges.labels("won" if task is self.hedge else "lost").inc()
        assert opened.ttft_s is not None  # the race opens with first_chunk=True: every answer it returns is timed
        hedger.observe((opened.worker.id, ctx.fields.stream), opened.ttft_s)
        return opened


_unwinding: set[asyncio.Future] = set()  # cancelled race losers, held until they have closed their connections


def _unwound(task: asyncio.Future) -> None:
    _unwinding.discard(task)
    if not task.cancelled():
        task.exception()  # retrieved: a loser that failed as it was cancelled is no error of the request


async def _safe_text(resp: aiohttp.ClientResponse) -> str:
    import aiohttp

    try:
        return await resp.text()
    except (aiohttp.ClientError, asyncio.TimeoutError, OSError, UnicodeDecodeError):
        return ""
    finally:
        resp.release()
