"""Canary checks: a worker that joined from outside is spot-checked against a trusted worker.

A joined worker could forge answers. So the router asks it a few ordinary-looking questions (`canary_prompts` of
them, at temperature 0 with `canary_max_tokens`) on a model or adapter that a trusted (static) worker also serves,
and asks the trusted worker the same; greedy decoding of the same weights gives the same text. A worker whose
answer differs is quarantined: it gets no traffic until an operator clears it (`POST /admin/workers/{id}/clear`).
Checks run when a worker joins (it takes no traffic until the first one passes) and every `canary_interval_s`.
A joined worker whose models no trusted worker serves cannot be checked: it is marked `unverified` and serves.

Workers on different hardware (CPU vs GPU, other kernels) may decode differently even at temperature 0; such a
fleet either keeps one trusted worker per kind or turns the checks off (`serve.canary_prompts: 0`).
"""

from __future__ import annotations

import asyncio
import logging
import random
from typing import TYPE_CHECKING, Any

from serve.errors import RouterError

if TYPE_CHECKING:
    from appliance.core.sections.serve import ServeSettings
    from serve.registry import Worker, WorkerRegistry

logger = logging.getLogger(__name__)

# Ordinary questions, so that a canary reads like any user's request.
CANARY_PROMPTS = (
    "What is the capital of France?",
    "Give me three tips for writing a clear email.",
    "Explain what a hash function is in one sentence.",
    "How many days are there in a leap year?",
    "Summarise the water cycle briefly.",
    "What does HTTP stand for?",
    "Suggest a name for a small bakery.",
    "Translate 'good morning' into Spanish.",
    "What is 12 times 7?",
    "Name two benefits of regular exercise.",
    "Write a haiku about autumn.",
    "What is the boiling point of water at sea level?",
)


def same_answer(a: str, b: str) -> bool:
    """Whether two canary answers agree (whitespace differences do not count)."""
    return " ".join(a.split()) == " ".join(b.split())


class CanaryChecker:
    """Runs canary checks on joined workers and quarantines those whose answers diverge."""

    def __init__(self, cfg: ServeSettings, registry: WorkerRegistry):
        self.cfg = cfg
        self.registry = registry
        self._checks: dict[str, asyncio.Task] = {}
        self._task: asyncio.Task | None = None
        self._rng = random.Random()

    @property
    def enabled(self) -> bool:
        return self.cfg.canary_prompts > 0

    # -- lifecycle --
    async def start(self) -> None:
        """Check joined workers every `canary_interval_s` in the background."""
        if self.enabled:
            self._task = asyncio.create_task(self._loop(), name="router-canaries")

    async def stop(self) -> None:
        tasks = [t for t in [self._task, *self._checks.values()] if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.cfg.canary_interval_s)
            for worker in list(self.registry.workers.values()):
                if not worker.static and not worker.quarantined and worker.healthy:
                    self.check_soon(worker)

    # -- events --
    def on_join(self, worker: Worker) -> None:
        """A worker joined: hold its traffic until a first check passes (or mark it unverified, or off)."""
        if worker.quarantined:
            return
        if not self.enabled:
            worker.canary = "off"
        elif not self._pairs(worker):
            worker.canary = "unverified"
        else:
            worker.canary = "pending"
            self.check_soon(worker)

    def clear(self, worker: Worker) -> None:
        """An operator lifted the quarantine; the next periodic round checks the worker again."""
        worker.quarantined = False
        worker.canary = "cleared"
        logger.warning("worker %s (%s) cleared by the operator", worker.id, worker.url)

    def forget(self, worker: Worker) -> None:
        """A worker was removed: drop (and stop) its check."""
        task = self._checks.pop(worker.id, None)
        if task is not None and not task.done() and task is not asyncio.current_task():
            task.cancel()

    def check_soon(self, worker: Worker) -> None:
        """Check `worker` in the background (at most one check per worker at a time)."""
        running = self._checks.get(worker.id)
        if running is None or running.done():
            self._checks[worker.id] = asyncio.create_task(self.check(worker), name=f"canary-{worker.id}")

    # -- the check --
    def _pairs(self, worker: Worker) -> list[tuple[str, Worker]]:
        """(model, trusted worker) pairs: what `worker` serves that a healthy trusted worker serves too."""
        pairs = []
        for model in sorted(worker.models | worker.adapters):
            reference = next((t for t in self.registry.trusted() if model in t.models or model in t.adapters), None)
            if reference is not None:
                pairs.append((model, reference))
        return pairs

    async def check(self, worker: Worker) -> bool:
        """Ask `worker` and a trusted worker the same canaries; quarantine `worker` if they differ. Returns passed."""
        pairs = self._pairs(worker)
        if not pairs:
            worker.canary = "unverified" if self.enabled else "off"
            return True
        model, reference = self._rng.choice(pairs)
        for prompt in self._rng.sample(CANARY_PROMPTS, min(self.cfg.canary_prompts, len(CANARY_PROMPTS))):
            try:
                expected = await self._ask(reference, model, prompt)
            except RouterError as exc:  # the reference failed: no verdict this time
                logger.warning("canary reference %s failed (%s); check of %s postponed", reference.id, exc.message, worker.id)
                return worker.canary != "pending"
            try:
                answer = await self._ask(worker, model, prompt)
            except RouterError as exc:
                answer = f"<no answer: {exc.message}>"
            if worker.quarantined or worker.id not in self.registry.workers:
                return False
            if not same_answer(answer, expected):
                worker.quarantined, worker.canary = True, "failed"
                logger.warning("worker %s (%s) QUARANTINED: its canary answer on %s differs from trusted worker %s's",
                               worker.id, worker.url, model, reference.id)
                return False
        worker.canary = "passed"
        logger.info("worker %s passed its canary check on %s", worker.id, model)
        return True

    async def _ask(self, worker: Worker, model: str, prompt: str) -> str:
        """One canary chat completion (temperature 0, `canary_max_tokens`); returns the answer's text.

        Raises:
            RouterError: the worker did not answer 200 with a chat completion.
        """
        import aiohttp

        body: dict[str, Any] = {"model": model, "messages": [{"role": "user", "content": prompt}],
                                "temperature": 0, "max_tokens": self.cfg.canary_max_tokens}
        timeout = aiohttp.ClientTimeout(total=self.cfg.request_timeout_s, connect=self.cfg.connect_timeout_s)
        try:
            async with self.registry.session.post(f"{worker.url}/v1/chat/completions", json=body, headers=worker.headers,
                                                  timeout=timeout) as resp:
                if resp.status != 200:
                    raise RouterError(502, f"answered {resp.status}")
                answer = await resp.json(content_type=None)
            return str(answer["choices"][0]["message"]["content"] or "")
        except (aiohttp.ClientError, asyncio.TimeoutError, ValueError, KeyError, IndexError, TypeError) as exc:
            raise RouterError(502, f"{type(exc).__name__}: {exc}") from exc
