"""The hot path: authenticate, check limits, pick a worker, forward the body as bytes, relay the answer.

It is raw ASGI (no framework layers): `Forwarder.handle(scope, receive, send, path)` is called by the app for
`POST /v1/chat/completions`, `POST /v1/completions` and `POST /v1/responses`, and answers errors itself in OpenAI's
shape.

Retries happen only before the client has seen a byte: connection errors, timeouts and 5xx answers move on to the
next worker in the policy's order (bounded by `max_retries`, with doubling backoff). Once a stream has started,
a broken upstream ends it with an explicit SSE error event (`data: {"error": {...}}`) and a log line.
With `serve.hedge: on` (`serve/hedging.py`) a request waits for its answer's first chunk before anything is sent, and
one that is late is raced against the next worker; the loser's connection is closed. The attempt loop (retries and
hedging alike) is `serve/attempts.py`, the bytes of a stream (SSE framing, usage) `serve/sse.py`; this module admits,
routes and delivers.

A client that disconnects aborts the upstream request, streamed or not: once the body is read, one task waits on
`receive()` (which returns only `http.disconnect` from then on), started only if the request is still waiting
after `DISCONNECT_WATCH_DELAY_S` (so fast answers pay a timer, not a task). Until the answer starts, its completion
cancels the request's own task, which closes the upstream connection (the worker aborts the generation) wherever the
request is waiting: the worker's headers, a non-streamed body, a retry's backoff. During a stream the relay checks
it between chunks. Either way it counts in `router_client_aborts_total` and in `router_requests_total` with status
499, and logs one line without the prompt. Prompts and keys are never logged.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Awaitable, Callable, Mapping

from fedllm.serve.attempts import AllFailed, Attempts, Opened
from fedllm.serve.errors import RouterError
from fedllm.serve.hedging import Hedger
from fedllm.serve.keys import ApiKey, KeyStore
from fedllm.serve.limits import RateLimiter, prompt_estimate, token_budget
from fedllm.serve.policy import RouteHints, rank
from fedllm.serve.protocol import RequestFields, error_body, read_fields, sse_error_event
from fedllm.serve.residency import unavailable
from fedllm.serve.sse import (
    SSE_HEADERS,
    STREAM_ENDS,
    complete_events,
    prefixed,
    take_usage,
    usage_total,
    with_usage_asked,
)

_loads: Callable[[bytes], Any]  # orjson's and json's functions differ in signature; these are the uses here
_dumps: Callable[[Any], bytes]
try:  # orjson is several times faster than json on the hot path; json is the fallback
    from orjson import dumps as _dumps
    from orjson import loads as _loads
except ImportError:  # pragma: no cover
    from json import loads as _loads

    def _json_dumps(obj: object) -> bytes:
        import json

        return json.dumps(obj).encode()

    _dumps = _json_dumps


if TYPE_CHECKING:
    import aiohttp

    from fedllm.core.sections.serve import ServeSettings
    from fedllm.serve.metrics import RouterMetrics
    from fedllm.serve.placement import AdapterPlacement, PublishedAdapter
    from fedllm.serve.registry import Worker, WorkerRegistry

logger = logging.getLogger(__name__)

Send = Callable[[dict[str, Any]], Awaitable[None]]
Receive = Callable[[], Awaitable[dict[str, Any]]]

DISCONNECT_WATCH_DELAY_S = 0.05  # a request still waiting on its worker after this long starts watching its client
_WANTED = {b"authorization", b"content-length", b"x-region", b"x-session-id"}
_CAP_FIELD = {"/v1/responses": "max_output_tokens"}  # the completion cap's name where it is not max_tokens


class ClientWatch:
    """Watches one request's client for a disconnect once its body has been read.

    While armed, a disconnect cancels the task that created the watch (the request's own task), so whatever the
    request awaits upstream is abandoned and its connection closed; `forward` turns that cancellation into a client
    abort. `disarm()` before the first byte of the answer is sent: from then on `gone` is only polled.

    The watching task starts only after `delay_s`: a request answered sooner (the common fast case) costs a timer,
    not a task, and a client that leaves is noticed at most `delay_s` late, which is nothing next to a generation.
    """

    __slots__ = ("task", "_receive", "_target", "_armed", "_timer", "fired", "worker")

    def __init__(self, receive: Receive, delay_s: float = DISCONNECT_WATCH_DELAY_S) -> None:
        self._receive = receive
        self._target = asyncio.current_task()
        self._armed = True
        self.fired = False
        self.worker: Worker | None = None  # the worker being tried, for the abort's log line and metrics
        self.task: asyncio.Task | None = None
        self._timer: asyncio.TimerHandle | None = asyncio.get_running_loop().call_later(delay_s, self._start)

    def _start(self) -> None:
        self._timer = None
        self.task = asyncio.ensure_future(_until_disconnect(self._receive))
        self.task.add_done_callback(self._on_done)

    def _on_done(self, task: asyncio.Future) -> None:
        if self._armed and not task.cancelled() and task.exception() is None and self._target is not None:
            self.fired = True
            self._target.cancel()

    @property
    def gone(self) -> bool:
        """Whether the client has disconnected (as far as the watch has seen)."""
        task = self.task
        return task is not None and task.done() and not task.cancelled() and task.exception() is None

    def disarm(self) -> None:
        """Stop cancelling the request on a disconnect (the answer is about to be sent)."""
        self._armed = False

    def close(self) -> None:
        """Stop watching (the request is over)."""
        self._armed = False
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self.task is not None:
            self.task.cancel()


async def _until_disconnect(receive: Receive) -> None:
    """Returns when the client disconnects (after the body, ASGI's `receive()` yields nothing else)."""
    while (await receive())["type"] != "http.disconnect":
        pass


def request_headers(scope: Mapping[str, Any]) -> dict[str, str]:
    """The few request headers the router reads, lower-case names."""
    return {k.decode(): v.decode("latin-1") for k, v in scope["headers"] if k in _WANTED}


async def send_error(send: Send, exc: RouterError) -> None:
    """Answer `exc` as an OpenAI error body (with Retry-After for 429)."""
    body = error_body(exc.status, exc.message, param=exc.param)
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if exc.retry_after_s is not None:
        headers.append((b"retry-after", str(max(1, math.ceil(exc.retry_after_s))).encode()))
    await send({"type": "http.response.start", "status": exc.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class Forwarder:
    """Forwards OpenAI requests to workers. One per app; fleet state lives in the registry and placement."""

    def __init__(
        self,
        cfg: ServeSettings,
        registry: WorkerRegistry,
        placement: AdapterPlacement,
        metrics: RouterMetrics,
        keys: KeyStore,
    ):
        self.cfg = cfg
        self.registry = registry
        self.placement = placement
        self.metrics = metrics
        self.keys = keys
        self.limiter = RateLimiter()
        self.counter = 0
        self._series: dict[tuple[str, str, str, int], tuple[Any, Any, Any]] = {}
        self.hedger = (
            Hedger(cfg.hedge_percentile, cfg.hedge_min_delay_s, cfg.hedge_max_extra) if cfg.hedge == "on" else None
        )
        self.attempts = Attempts(cfg, registry, placement, metrics, self.hedger)

    @property
    def on_routed(self) -> Callable[[Worker, str, bool], None] | None:
        """Told of each request sent to a joined worker, with its path and streaming (fedllm.serve.canary)."""
        return self.attempts.on_routed

    @on_routed.setter
    def on_routed(self, callback: Callable[[Worker, str, bool], None] | None) -> None:
        self.attempts.on_routed = callback

    # -- the ASGI entry --
    async def handle(self, scope: Mapping[str, Any], receive: Receive, send: Send, path: str) -> None:
        """Serve one completion request on raw ASGI; every failure is answered in OpenAI's error shape."""
        try:
            await self.forward(scope, receive, send, path)
        except RouterError as exc:
            await send_error(send, exc)
        except Exception:  # the service boundary: log it, answer 500, never leak the request
            logger.exception("unexpected error while forwarding %s", path)
            try:
                await send_error(send, RouterError(500, "internal router error; see the router's log"))
            except RuntimeError:  # the response had already started: the server closes the connection
                pass

    # -- admission --
    def authenticate(self, headers: Mapping[str, str]) -> ApiKey | None:
        """The caller's key record; None when keys are not required (a loopback router without keys).

        Raises:
            RouterError: 401 when keys are required (fedllm.serve.keys: a public bind, serve.require_keys, or a router
                that has had keys) and the request carries none or a wrong one, or none exists at all; 503 while the key
                file cannot be read or parsed.
        """
        keys = self.keys
        keys.refresh()
        if not keys.required:
            return None
        scheme, _, presented = headers.get("authorization", "").partition(" ")
        if keys.broken is not None:
            self.metrics.error("auth")
            raise RouterError(
                503,
                "this router's API key file cannot be read, so it accepts no request until its operator "
                "fixes it (see the router's log)",
            )
        key = keys.lookup(presented.strip()) if scheme.lower() == "bearer" and presented else None
        if key is None:
            self.metrics.error("auth")
            if keys.empty:
                raise RouterError(
                    401,
                    "this router requires API keys and has no API key, so it accepts no request: "
                    "create one with `appliance keys create --name NAME` and send `Authorization: Bearer <key>`",
                )
            raise RouterError(
                401,
                "missing or invalid API key: send `Authorization: Bearer <key>` "
                "(create one with `appliance keys create`)",
            )
        return key

    async def read_request(self, headers: Mapping[str, str], receive: Receive) -> tuple[bytes, dict, RequestFields]:
        """The raw body, its parsed form, and the routed fields.

        Raises:
            RouterError: 413 body too large, 400 invalid JSON / missing model / token budget (the larger of
                max_tokens and max_completion_tokens, times n or best_of) over `serve.max_tokens_cap`.
        """
        limit = self.cfg.max_body_bytes
        declared = headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            self.metrics.error("too_large")
            raise RouterError(
                413, f"request body of {declared} bytes exceeds the limit of {limit} bytes (serve.max_body_bytes)"
            )
        body = b""
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise RouterError(400, "the client disconnected while sending its request")
            body += message.get("body", b"")
            if len(body) > limit:
                self.metrics.error("too_large")
                raise RouterError(413, f"request body exceeds the limit of {limit} bytes (serve.max_body_bytes)")
            if not message.get("more_body"):
                break
        try:
            data = _loads(body)
        except ValueError as exc:
            self.metrics.error("bad_request")
            raise RouterError(400, "the request body is not valid JSON") from exc
        try:
            fields = read_fields(data)
        except ValueError as exc:
            self.metrics.error("bad_request")
            raise RouterError(400, str(exc), param="model" if "model" in str(exc) else None) from exc
        cap = self.cfg.max_tokens_cap
        if fields.max_tokens is not None and fields.max_tokens * fields.choices > cap:
            self.metrics.error("bad_request")
            asked = f"max_tokens={fields.max_tokens}" + (f" times n={fields.choices}" if fields.choices > 1 else "")
            raise RouterError(
                400,
                f"{asked} exceeds this router's cap of {cap} tokens per request (serve.max_tokens_cap)",
                param="max_tokens",
            )
        if fields.max_tokens is None and token_budget(None, fields.choices, self.cfg.default_max_tokens) > cap:
            self.metrics.error("bad_request")
            raise RouterError(
                400,
                f"{fields.choices} completions (n times prompts) without max_tokens exceed this router's cap "
                f"of {cap} tokens per request; set max_tokens (serve.max_tokens_cap)",
                param="n",
            )
        return body, data, fields

    def admit(self, key: ApiKey | None, fields: RequestFields, prompt_tokens: int = 0) -> int:
        """Charge the key's buckets with the request's token budget (settled once its usage is known): `prompt_tokens`
        (an estimate) plus its completion cap (`serve.default_max_tokens` when it names none) times its completions.

        Returns:
            The token budget charged (0 without a key or limits).

        Raises:
            RouterError: 429 with Retry-After when the key is over its requests or tokens per minute.
        """
        if key is None or not (key.rpm or key.tpm):
            return 0
        charge = token_budget(fields.max_tokens, fields.choices, self.cfg.default_max_tokens, prompt_tokens)
        wait = self.limiter.admit(key.name, key.rpm, key.tpm, charge, time.monotonic())
        if wait > 0:
            self.metrics.error("rate_limit")
            raise RouterError(
                429, f"rate limit of key {key.name!r} reached; retry in {math.ceil(wait)} s", retry_after_s=wait
            )
        return charge

    # -- routing --
    def choose(
        self, model: str, headers: Mapping[str, str], fields: RequestFields
    ) -> tuple[list[Worker], PublishedAdapter | None]:
        """Workers to try, best first, and the published adapter behind `model` if any.

        A promoted version (an alias names it) goes only to workers holding it while one of them is up: the others
        are loading it ahead of their traffic (serve/replicas.py). An adapter limited to regions goes only to workers
        of those regions (serve/residency.py).

        Raises:
            RouterError: 404 unknown model, 503 no healthy worker can serve it (for an adapter limited to regions:
                naming it and its regions).
        """
        adapter = self.placement.published.get(model)
        if adapter is not None:
            hosts = self.placement.hosts(adapter)
            if adapter.regions is not None and not any(w.healthy and not w.draining for w in hosts):
                self.metrics.error("no_worker")
                raise unavailable(model, adapter.regions, fields.model)
            if self.placement.pinned(adapter):
                ready = [w for w in hosts if model in w.adapters and w.healthy and not w.draining]
                hosts = ready or hosts  # none up holds it yet: load on demand, as for any version
            candidates = [w.candidate(model in w.adapters) for w in hosts]
        else:
            hosts = self.registry.serving(model)
            if not hosts:
                if not self.registry.healthy():
                    self.metrics.error("no_worker")
                    raise RouterError(503, "no healthy worker is available; check `appliance fleet`")
                self.metrics.error("unknown_model")
                raise RouterError(
                    404, f"the model `{model}` does not exist; GET /v1/models lists the served models", param="model"
                )
            if len(hosts) == 1:  # nothing to choose between: skip the policy (the common single-worker case)
                worker = hosts[0]
                if worker.healthy and not worker.draining:
                    return [worker], None
                self.metrics.error("no_worker")
                raise RouterError(503, f"no healthy worker serves `{model}` right now; check `appliance fleet`")
            candidates = [w.candidate() for w in hosts]
        hints = RouteHints(
            region=headers.get("x-region") or self.cfg.region,
            affinity_key=headers.get("x-session-id") or fields.user or fields.prefix,
        )
        self.counter += 1
        ranked = rank(self.cfg.policy, candidates, hints, self.counter, self.cfg.affinity_load_factor)
        if not ranked:
            self.metrics.error("no_worker")
            raise RouterError(503, f"no healthy worker serves `{model}` right now; check `appliance fleet`")
        by_id = {w.id: w for w in hosts}
        tries = 1 + self.cfg.max_retries + (self.hedger is not None)  # a hedge does not use up a retry
        return [by_id[c.id] for c in ranked[:tries]], adapter

    async def forward(self, scope: Mapping[str, Any], receive: Receive, send: Send, path: str) -> None:
        """Admit, route and relay one request (raises RouterError for the client)."""
        started = time.perf_counter()
        headers = request_headers(scope)
        key = self.authenticate(headers)
        body, data, fields = await self.read_request(headers, receive)
        metered = key is not None and bool(key.tpm)
        prompt_tokens = prompt_estimate(len(body)) if metered else 0
        charged = self.admit(key, fields, prompt_tokens)
        model = self.placement.resolve(fields.model)
        # A tpm-limited stream is settled from its usage chunk: ask the worker for it, and hide it from a client
        # that did not ask for it.
        # (A Responses stream always ends with the response and its usage: nothing to ask for.)
        strip_usage = fields.stream and metered and not fields.stream_usage and path not in STREAM_ENDS
        # A metered request without a completion cap gets the one it was charged for: the worker cannot exceed it.
        cap = (
            (_CAP_FIELD.get(path, "max_tokens"), self.cfg.default_max_tokens)
            if metered and fields.max_tokens is None
            else None
        )
        if model != fields.model or cap is not None or (strip_usage and "stream_options" in data):
            # The worker knows only the adapter's own name (an alias), must be asked for usage or given a cap:
            # re-encode this body.
            body = _dumps(_rewritten(data, model if model != fields.model else None, strip_usage, cap))
        elif strip_usage:
            body = with_usage_asked(body)
        workers, adapter = self.choose(model, headers, fields)
        ctx = RequestContext(
            path,
            model,
            body,
            fields,
            started,
            key,
            charged,
            ClientWatch(receive),
            send,
            adapter,
            strip_usage,
            prompt_tokens,
        )
        try:
            await self._try_workers(ctx, workers)
        except asyncio.CancelledError:
            if not ctx.watch.fired:
                raise  # not the client: the server is shutting down
            task = asyncio.current_task()
            assert task is not None  # a coroutine awaiting here runs in a task (the ASGI server's)
            task.uncancel()
            self._client_abort(path, model, ctx.watch.worker)
        finally:
            ctx.watch.close()

    async def _try_workers(self, ctx: RequestContext, workers: list[Worker]) -> None:
        """Deliver the first answer to start among `workers` (`fedllm.serve.attempts`: retries, hedging); raises
        RouterError 502 when all fail before the first byte."""
        try:
            opened = await self.attempts.first_answer(ctx, workers)
        except AllFailed as exc:
            self._all_failed(ctx, len(exc.reasons), exc.reasons)
            return
        ctx.watch.worker = opened.worker
        await self._deliver(ctx, opened)

    def _all_failed(self, ctx: RequestContext, tried: int, reasons: list[str]) -> None:
        ctx.watch.disarm()
        self.metrics.error("upstream")
        self.metrics.requests.labels(ctx.path, ctx.model, "-", "502").inc()
        # The reasons name workers' addresses and their errors: the router's log has them, the client does not.
        logger.warning(
            "%s for %s failed on %d worker(s) before any answer: %s", ctx.path, ctx.model, tried, "; ".join(reasons)
        )
        raise RouterError(
            502, f"the request failed on {tried} worker(s) before any answer; the router's log has the details"
        )

    async def _deliver(self, ctx: RequestContext, opened: Opened) -> None:
        """Send an answer that has started (`_open`) to the client: the point of no return."""
        worker, resp, model = opened.worker, opened.resp, ctx.model
        if adapter_used := model in worker.adapters:
            worker.adapter_used[model] = time.monotonic()
        ctx.watch.disarm()
        if adapter_used:
            self.placement.note_hot(model)
        if opened.payload is None:
            await self._relay(ctx, resp, worker, opened.sent, opened.first, opened.ttft_s)
            return
        payload = opened.payload
        worker.end(model)
        assert opened.ttft_s is not None  # Attempts.open times every answer it reads whole (`payload` is set)
        worker.observe_ttft(opened.ttft_s * 1000)
        content_type = resp.headers.get("content-type", "application/json").encode()
        await ctx.send(
            {
                "type": "http.response.start",
                "status": resp.status,
                "headers": [(b"content-type", content_type), (b"content-length", str(len(payload)).encode())],
            }
        )
        await ctx.send({"type": "http.response.body", "body": payload})
        self._observe(ctx.path, model, worker, resp.status, ctx.started, opened.ttft_s, time.perf_counter())
        if ctx.metered and resp.status == 200:
            self._settle(ctx, usage_total(payload))

    async def _relay(
        self,
        ctx: RequestContext,
        resp: aiohttp.ClientResponse,
        worker: Worker,
        sent: float,
        first: bytes | None = None,
        ttft: float | None = None,
    ) -> None:
        """Relay an SSE stream chunk by chunk; a break ends it with an error event; a client that leaves aborts it.

        `first` is the stream's first chunk when it was already read (a hedged race), `ttft` the seconds it took.

        A stream charged to a tpm-limited key is relayed event by event (a partial event waits for its end) so that
        its usage chunk can be read, and dropped when the router asked for it on the client's behalf.
        """
        import aiohttp

        send, watch = ctx.send, ctx.watch
        metered = ctx.metered
        pending = b""  # metered only: the start of an event whose end has not arrived yet
        used: int | None = None
        relayed = 0  # metered only: data events relayed (each carries at least one generated token)
        tail = b""
        ends = STREAM_ENDS.get(ctx.path)  # None: the stream ends with [DONE]
        finished = False
        status = 502
        if ttft is not None:
            worker.observe_ttft(ttft * 1000)
        try:
            await send({"type": "http.response.start", "status": 200, "headers": SSE_HEADERS})
            try:
                async for chunk in resp.content.iter_any() if first is None else prefixed(first, resp):
                    if ttft is None:
                        ttft = time.perf_counter() - sent
                        worker.observe_ttft(ttft * 1000)
                    if watch.gone:
                        status = 499
                        return
                    if metered:
                        if pending or not chunk.endswith(b"\n\n"):  # most chunks are whole events: no copy then
                            chunk, pending = complete_events(pending + chunk)
                        if b'"usage"' in chunk:
                            chunk, found = take_usage(chunk, ctx.strip_usage)
                            used = found if found is not None else used
                        if not chunk:
                            continue
                        relayed += chunk.count(b"data: {")
                    if ends is not None and not finished:
                        window = tail + chunk
                        finished = any(end in window for end in ends)
                    tail = (tail + chunk)[-32:]
                    await send({"type": "http.response.body", "body": chunk, "more_body": True})
                if pending:
                    tail = (tail + pending)[-32:]
                    await send({"type": "http.response.body", "body": pending, "more_body": True})
                if not (finished or b"[DONE]" in tail):
                    raise aiohttp.ClientPayloadError("the worker ended the stream without its final event")
                status = 200
            except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
                logger.warning("stream from worker %s broke after the first byte: %s", worker.id, exc)
                self.metrics.error("stream_broken")
                self.registry.probe_soon(worker)
                await send(
                    {
                        "type": "http.response.body",
                        "more_body": True,
                        "body": sse_error_event(
                            f"the worker's stream broke before it finished ({type(exc).__name__}); "
                            "the answer is incomplete"
                        ),
                    }
                )
            await send({"type": "http.response.body", "body": b""})
        finally:
            if status == 200:
                resp.release()
            else:
                resp.close()  # closes the upstream connection: the worker aborts the generation
            worker.end(ctx.model)
            if metered:
                # Without a usage chunk (the client left, the stream broke), from what was relayed: the prompt's
                # estimate and a token per event; the worker aborted the rest.
                self._settle(ctx, used if used is not None else min(ctx.charged, ctx.prompt_tokens + relayed))
            if status == 499:
                self._client_abort(ctx.path, ctx.model, worker)
            else:
                self._observe(ctx.path, ctx.model, worker, status, ctx.started, ttft, time.perf_counter())

    # -- bookkeeping --
    def _observe(
        self, path: str, model: str, worker: Worker, status: int, started: float, ttft_s: float | None, now: float
    ) -> None:
        series = self._series.get((path, model, worker.id, status))
        if series is None:
            m = self.metrics
            series = (
                m.requests.labels(path, model, worker.id, str(status)),
                m.latency.labels(path, model, worker.id),
                m.ttft.labels(model, worker.id),
            )
            self._series[(path, model, worker.id, status)] = series
        series[0].inc()
        series[1].observe(now - started)
        if ttft_s is not None:
            series[2].observe(ttft_s)

    def _client_abort(self, path: str, model: str, worker: Worker | None) -> None:
        """Count and log a request whose client left before its answer was complete (its upstream is closed)."""
        worker_id = worker.id if worker is not None else "-"
        self.metrics.client_aborts.labels(path).inc()
        self.metrics.requests.labels(path, model, worker_id, "499").inc()
        logger.info(
            "client disconnected from %s (model %s, worker %s); aborted the upstream request", path, model, worker_id
        )

    def forget_worker(self, worker: Worker) -> None:
        """Drop the cached metric series and hedging windows of a removed worker."""
        for key in [k for k in self._series if k[2] == worker.id]:
            del self._series[key]
        self.metrics.forget_worker(worker.id)
        if self.hedger is not None:
            self.hedger.forget(worker.id)

    def outstanding(self) -> None:
        """Copy each worker's in-flight count into the gauge (called when /metrics is scraped)."""
        for worker in self.registry.workers.values():
            self.metrics.outstanding.labels(worker.id).set(worker.outstanding)

    def _settle(self, ctx: RequestContext, used: int | None) -> None:
        """Correct the key's token bucket with the tokens the request really used (None: unknown, keep the charge)."""
        if used is not None and ctx.metered and ctx.key is not None:  # metered implies a key; the check narrows it
            self.limiter.settle(ctx.key.name, ctx.key.tpm, ctx.charged, used, time.monotonic())


@dataclass(slots=True)
class RequestContext:
    """One completion request on its way through the router: what every step after admission needs."""

    path: str  # /v1/chat/completions, /v1/completions or /v1/responses
    model: str  # the name workers know (an alias resolved)
    body: bytes  # the bytes sent to workers
    fields: RequestFields
    started: float  # perf_counter() when the request arrived
    key: ApiKey | None
    charged: int  # the token budget charged up front (0 without a key or limits)
    watch: ClientWatch
    send: Send
    adapter: PublishedAdapter | None = None  # the published adapter behind `model`, if any
    strip_usage: bool = False  # the router asked for the stream's usage chunk; the client did not: not relayed
    prompt_tokens: int = (
        0  # metered only: the prompt's tokens as estimated up front (fedllm.serve.limits.prompt_estimate)
    )

    @property
    def metered(self) -> bool:
        """Whether the request is settled against its real usage (its key has a tokens-per-minute limit)."""
        return self.key is not None and bool(self.key.tpm)


def _rewritten(
    data: dict[str, Any], model: str | None, ask_usage: bool, cap: tuple[str, int] | None = None
) -> dict[str, Any]:
    """The request with its model renamed, the stream's usage chunk asked for and/or a completion cap (field, value)."""
    out = dict(data)
    if cap is not None:
        out[cap[0]] = cap[1]
    if model is not None:
        out["model"] = model
    if ask_usage:
        options = data.get("stream_options")
        out["stream_options"] = {**(options if isinstance(options, dict) else {}), "include_usage": True}
    return out
