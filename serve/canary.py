"""Canary checks: a worker that joined from outside is spot-checked against a trusted worker.

A joined worker could forge answers. So the router asks it, now and then, a question it also asks a trusted (local
or static) worker serving the same model or adapter: greedy decoding (temperature 0, the same `seed`) of the same
weights gives the same text. A worker whose answer differs is quarantined: it gets no traffic, and the quarantine
sticks to its key and address until an operator clears it (serve/quarantine.py).

A canary must not be recognisable. Its conversation is drawn from a pool (serve/canary_pool.py: a large built-in
one, mixed with the operator's private `serve.canary_prompts_file`), with a system prompt or not, a random
`max_tokens` (up to `serve.canary_max_tokens`) and a random `seed`, sent as the router sends user requests (same
headers and JSON), on the path and streaming of the user request that triggered it (serve/canary_shapes.py: chat,
completions or responses). It is sent at random times among real traffic, never as a burst on joining:

- each user request routed to a joined worker triggers a check of it with probability `serve.canary_rate`
  (`serve.canary_pending_rate` until it has passed `serve.canary_passes` checks), after a random delay of up to
  `serve.canary_delay_s`;
- besides, each joined worker is checked at random times (a Poisson process, one check per `canary_interval_s` on
  average), so a worker that gets little traffic is checked too.

A new joined worker therefore takes traffic at once (state `pending`) and is checked among it; a worker that forges
every answer it does not recognise as a canary is caught, with probability 1 - 1e-6, within
ln(1e-6) / ln(1 - canary_pending_rate) of its user requests (49 at the default 0.25); one that turns to forging
after it passed is caught within ln(1e-6) / ln(1 - canary_rate) (270 at the default 0.05). A worker that serves a model
no trusted worker serves cannot be checked: that model gets no traffic from it (`unverified`) unless
`serve.allow_unverified` is true.

Workers on different hardware (CPU vs GPU, other kernels) may decode differently even at temperature 0; such a
fleet either keeps one trusted worker per kind or turns the checks off (`serve.canary_prompts: 0`).
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import random
from typing import TYPE_CHECKING, Any

from fedllm.serve.canary_pool import CanaryPool, Messages
from fedllm.serve.canary_shapes import CHAT, PATHS, answer_text, build
from fedllm.serve.errors import RouterError

if TYPE_CHECKING:
    from fedllm.core.sections.serve import ServeSettings
    from fedllm.serve.quarantine import QuarantineBook
    from fedllm.serve.registry import Worker, WorkerRegistry

logger = logging.getLogger(__name__)

MIN_CANARY_TOKENS = 8  # the smallest max_tokens drawn for a canary
TICK_S = 1.0  # the random timer's resolution
UNVERIFIED_REASON = (
    "no trusted worker serves {models}, so its answers cannot be checked (serve.allow_unverified is false)"
)


def same_answer(a: str, b: str) -> bool:
    """Whether two canary answers agree (whitespace differences do not count)."""
    return " ".join(a.split()) == " ".join(b.split())


def requests_to_catch(rate: float, miss: float = 1e-6) -> int:
    """User requests within which a worker forging every non-canary answer is caught with probability 1 - `miss`."""
    return math.ceil(math.log(miss) / math.log(1 - rate)) if 0 < rate < 1 else (1 if rate >= 1 else 0)


class CanaryChecker:
    """Runs canary checks on joined workers and quarantines those whose answers diverge."""

    def __init__(
        self,
        cfg: ServeSettings,
        registry: WorkerRegistry,
        book: QuarantineBook | None = None,
        rng: random.Random | None = None,
    ):
        self.cfg = cfg
        self.registry = registry
        self.book = book
        self._rng = rng or random.SystemRandom()
        self.pool = CanaryPool(cfg.canary_prompts_file, self._rng)
        self._checks: dict[str, asyncio.Task] = {}
        self._task: asyncio.Task | None = None

    @property
    def enabled(self) -> bool:
        return self.cfg.canary_prompts > 0

    # -- lifecycle --
    async def start(self) -> None:
        """Check joined workers at random times in the background, and keep their unverified models current."""
        self._task = asyncio.create_task(self._loop(), name="router-canaries")

    async def stop(self) -> None:
        tasks = [t for t in [self._task, *self._checks.values()] if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def idle(self) -> None:
        """Wait until no check is running (tests)."""
        while running := [t for t in self._checks.values() if not t.done()]:
            await asyncio.gather(*running, return_exceptions=True)

    async def _loop(self) -> None:
        tick = min(TICK_S, self.cfg.canary_interval_s / 4)
        while True:
            await asyncio.sleep(tick)
            try:
                for worker in list(self.registry.workers.values()):
                    if worker.static or worker.quarantined:
                        continue
                    self.review(worker)
                    if self.enabled and worker.healthy and self._rng.random() < tick / self.cfg.canary_interval_s:
                        self.check_soon(worker)
            except Exception:  # the loop must survive anything one round throws
                logger.exception("canary round failed")

    # -- events --
    def on_join(self, worker: Worker) -> None:
        """A worker joined: it is checked among its traffic from now on (no first burst); unverifiable models are
        held."""
        if worker.quarantined:
            return
        worker.canary = "pending" if self.enabled else "off"
        self.review(worker)

    def on_routed(self, worker: Worker, path: str = CHAT, stream: bool = False) -> None:
        """A user request (on `path`, streamed or not) is being sent to joined `worker`: maybe check it soon, with a
        canary of the same shape (serve.canary_rate)."""
        if not self.enabled or worker.quarantined:
            return
        rate = self.cfg.canary_rate if worker.canary == "passed" else self.cfg.canary_pending_rate
        if self._rng.random() < rate:
            self.check_soon(worker, path if path in PATHS else CHAT, stream)

    def review(self, worker: Worker) -> None:
        """Hold the models of `worker` that no trusted worker serves (unless serve.allow_unverified)."""
        trusted = [t for t in self.registry.workers.values() if t.static]
        unverified = {
            m for m in worker.models | worker.adapters if not any(m in t.models or m in t.adapters for t in trusted)
        }
        worker.unverified = set() if self.cfg.allow_unverified else unverified
        served = worker.models | worker.adapters
        nothing_checkable = bool(served) and unverified >= served
        worker.hold = (
            UNVERIFIED_REASON.format(models=", ".join(sorted(unverified)))
            if nothing_checkable and worker.unverified
            else ""
        )
        if nothing_checkable and worker.canary == "pending" and self.enabled:
            worker.canary = "unverified"
        elif worker.canary == "unverified" and not nothing_checkable:
            worker.canary = "pending"

    def clear(self, worker: Worker) -> None:
        """An operator lifted the quarantine; the worker is checked again among its traffic (as a new one)."""
        worker.quarantined = False
        worker.canary, worker.canary_passes = "cleared", 0
        if self.book is not None:
            self.book.clear(set(worker.addresses), worker.key_hash)
        logger.warning("worker %s (%s) cleared by the operator", worker.id, worker.url)

    def forget(self, worker: Worker) -> None:
        """A worker was removed: drop (and stop) its check."""
        task = self._checks.pop(worker.id, None)
        if task is not None and not task.done() and task is not asyncio.current_task():
            task.cancel()

    def check_soon(self, worker: Worker, path: str | None = None, stream: bool | None = None) -> None:
        """Check `worker` in the background after a random delay (at most one check per worker at a time); canaries
        on `path`, streamed or not (drawn when not given)."""
        running = self._checks.get(worker.id)
        if running is None or running.done():
            self._checks[worker.id] = asyncio.create_task(
                self.check(worker, delay=True, path=path, stream=stream), name=f"canary-{worker.id}"
            )

    def quarantine(self, worker: Worker, reason: str) -> None:
        """Take `worker` out of traffic, and remember its key and addresses (serve/quarantine.py)."""
        worker.quarantined, worker.canary = True, "failed"
        logger.warning("worker %s (%s) QUARANTINED: %s", worker.id, worker.url, reason)
        if self.book is not None:
            try:
                self.book.add(
                    set(worker.addresses),
                    worker.address,
                    worker.key_hash,
                    worker_id=worker.id,
                    url=worker.url,
                    reason=reason,
                )
            except OSError as exc:  # it stays quarantined while this router runs
                logger.error(
                    "cannot save the quarantine of worker %s to %s (%s): it would not survive a restart",
                    worker.id,
                    self.book.path,
                    exc,
                )

    # -- the check --
    def _pairs(self, worker: Worker) -> list[tuple[str, Worker]]:
        """(model, trusted worker) pairs: what `worker` serves that a healthy trusted worker serves too."""
        pairs = []
        for model in sorted(worker.models | worker.adapters):
            reference = next((t for t in self.registry.trusted() if model in t.models or model in t.adapters), None)
            if reference is not None:
                pairs.append((model, reference))
        return pairs

    async def check(
        self, worker: Worker, *, delay: bool = False, path: str | None = None, stream: bool | None = None
    ) -> bool:
        """Ask `worker` and a trusted worker the same canaries (on `path`, streamed or not; drawn when not given);
        quarantine `worker` if they differ. Returns passed."""
        for _ in range(self.cfg.canary_prompts):
            if delay:
                await asyncio.sleep(self._rng.uniform(0, self.cfg.canary_delay_s))
            pairs = self._pairs(worker)
            if not pairs or worker.quarantined or worker.id not in self.registry.workers:
                return not worker.quarantined
            model, reference = self._rng.choice(pairs)
            body = self.request(model, path=path, stream=stream)
            try:
                expected = await self._ask(reference, body)
            except RouterError as exc:  # the reference failed: no verdict this time
                logger.warning(
                    "canary reference %s failed (%s); check of %s postponed", reference.id, exc.message, worker.id
                )
                return True
            try:
                answer = await self._ask(worker, body)
            except RouterError as exc:
                answer = f"<no answer: {exc.message}>"
            if worker.quarantined or worker.id not in self.registry.workers:
                return False
            if not same_answer(answer, expected):
                self.quarantine(worker, f"its canary answer on {model} differs from trusted worker {reference.id}'s")
                return False
        worker.canary_passes += 1
        if worker.canary_passes >= self.cfg.canary_passes and worker.canary in ("pending", "cleared"):
            worker.canary = "passed"
            logger.info("worker %s passed %d canary checks", worker.id, worker.canary_passes)
        return True

    def request(
        self, model: str, messages: Messages | None = None, *, path: str | None = None, stream: bool | None = None
    ) -> tuple[str, dict[str, Any]]:
        """A canary: its path and body. A drawn conversation (or `messages`), a random max_tokens and seed,
        temperature 0; on `path` and streamed or not as given (as the triggering user request was), else drawn."""
        path = path or self._rng.choice(PATHS)
        stream = self._rng.random() < 0.5 if stream is None else stream
        max_tokens = self._rng.randint(min(MIN_CANARY_TOKENS, self.cfg.canary_max_tokens), self.cfg.canary_max_tokens)
        return path, build(path, model, messages or self.pool.draw(), max_tokens, self._rng.randrange(2**31), stream)

    async def _ask(self, worker: Worker, canary: tuple[str, dict[str, Any]]) -> str:
        """Send one canary as the router forwards user requests (same path, headers, JSON); returns the answer's text.

        Raises:
            RouterError: the worker did not answer 200 with an answer of the path's shape.
        """
        import aiohttp

        path, body = canary
        data = json.dumps(body, separators=(",", ":") if self._rng.random() < 0.5 else None)
        timeout = aiohttp.ClientTimeout(total=self.cfg.request_timeout_s, connect=self.cfg.connect_timeout_s)
        try:
            async with self.registry.http.post(
                f"{worker.url}{path}", data=data, headers=worker.headers, timeout=timeout
            ) as resp:
                if resp.status != 200:
                    raise RouterError(502, f"answered {resp.status}")
                return answer_text(path, await resp.read(), bool(body.get("stream")))
        except (aiohttp.ClientError, asyncio.TimeoutError, ValueError) as exc:
            raise RouterError(502, f"{type(exc).__name__}: {exc}") from exc
