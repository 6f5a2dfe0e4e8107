"""The federation coordinator: enrolled silos connect to it, and it runs rounds of federated LoRA.

A round: wait until `min_silos` silos are online, send each a TRAIN (global adapter + the strategy's plan),
collect UPDATEs until every selected silo answered, went offline, or the deadline passed; check each update
(round, manifest against the global adapter, shapes before decoding, finite values, size and norm bounds) and answer
ERROR (a code of `protocol.ERROR_CODES`) to bad or late ones; weigh the accepted ones by example count, bounded by the
count declared at enrolment and by `max_silo_share`; aggregate with the strategy; check the aggregate (finite, norm
bound); checkpoint atomically; then register the new global adapter in the adapter registry and call the
`on_publish` callbacks. A restarted coordinator resumes after its last checkpointed round (and registers it if the
crash came before). In CURVE mode every message is checked against the current enrolment: a removed silo is dropped
within a second.

`Coordinator` holds the run's state and composes four parts, one job each: `Sessions` (the socket, HELLO/enrolment,
the silos' messages: federation/runtime/sessions.py), `RoundRunner` (rounds and deadlines:
federation/runtime/round_runner.py), `Recorder` (checkpoint, tracker, adapter registry, publish, round log:
federation/runtime/recorder.py) and `StatusServer` (`/status`, `/health`: federation/runtime/status_server.py).
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from typing import TYPE_CHECKING, Any, Callable, Literal

from fedllm.core.adapter_registry import AdapterRegistry, AdapterVersion
from fedllm.core.types import StateDict
from fedllm.federation.aggregation.update_spool import remove_spool
from fedllm.federation.publishing.heldout import with_gate
from fedllm.federation.runtime.recorder import Exporter, Recorder
from fedllm.federation.runtime.round_runner import RoundRunner, RoundState
from fedllm.federation.runtime.sessions import Sessions, SiloInfo
from fedllm.federation.runtime.status_server import StatusServer

if TYPE_CHECKING:
    from fedllm.core.settings import ApplianceSettings
    from fedllm.federation.aggregation.server_strategies import Strategy

__all__ = ["Coordinator", "Exporter", "RoundState", "SiloInfo"]


class Coordinator:
    """Runs a federation. `await start()`, then `await wait_done()` or `await stop()`.

    Args:
        settings: the appliance settings (uses `federation`, `train`, the home layout).
        strategy: aggregation strategy (`fedllm.federation.runtime.service.build_strategy(...)` or
            `fedllm.federation.aggregation.strategy_factory.make_strategy(...)`; product aggregation takes its
            lora_alpha there).
        initial_state: the round-0 global adapter; default `train.initial_adapter_state(settings.train, model)`.
        on_publish: callbacks `(AdapterVersion) -> None` called after each round's checkpoint (errors are logged).
        exporter: writes a PEFT folder for a state dict; default `train.save_adapter_dir` on the base model.
            Without a registry export (`exporter=False`) rounds are checkpointed but not registered.
    """

    def __init__(
        self,
        settings: ApplianceSettings,
        strategy: Strategy,
        *,
        initial_state: StateDict | None = None,
        on_publish: list[Callable[[AdapterVersion], None]] | None = None,
        exporter: Exporter | None | Literal[False] = None,
    ) -> None:
        self.settings, self.cfg, self.strategy = settings, settings.federation, strategy
        self.run_dir = settings.federation_dir / self.cfg.run_name
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.on_publish = list(on_publish or [])
        self.global_state: StateDict = {}
        self.round = 0  # last completed round
        # The newest round records (status, console, publisher); the whole history is the append-only rounds.jsonl.
        self.history: deque[dict[str, Any]] = deque(maxlen=self.cfg.history_in_memory)
        self.silos: dict[str, SiloInfo] = {}
        self.phase = "idle"
        self.current: RoundState | None = None
        self.started_from: str | None = (
            None  # the promoted version this round started from (federation/publishing/gate_resume.py)
        )
        self.address: str | None = None
        # The last secure round's masked vectors as received (audit, tests): {round: {silo: bytes}}, one round only.
        self.secure_inputs: dict[int, dict[str, bytes]] = {}
        self.sessions = Sessions(self)
        self.rounds = RoundRunner(self)
        self.recorder = Recorder(self, exporter, initial_state)
        self.status_server = StatusServer(settings, self.status)
        self._tasks: list[asyncio.Task] = []
        self._run_task: asyncio.Task | None = None
        if self.cfg.secure_aggregation:
            from fedllm.federation.aggregation.secure_round import check_strategy

            check_strategy(strategy, self.cfg)

    @property
    def message_limit(self) -> int:
        """The largest message read (fedllm.federation.aggregation.bounds.message_bound), set at start."""
        return self.sessions.message_limit

    @property
    def registry(self) -> AdapterRegistry:
        """The adapter registry each round's global adapter is registered in."""
        return self.recorder.registry

    @property
    def status_url(self) -> str | None:
        """The `/status` URL, once started."""
        return self.status_server.status_url

    @property
    def rounds_task(self) -> asyncio.Task | None:
        """The task running the rounds (done when the run is: finished, failed or stopped); None before `start`."""
        return self._run_task

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> str:
        """Load the last checkpoint (or the initial state), bind the socket and status endpoint, start the rounds."""
        self.recorder.restore()
        self.recorder.open_tracker()
        self.address = await self.sessions.open()
        await self.status_server.start()
        self._tasks.extend(self.sessions.start_tasks())
        self._run_task = asyncio.create_task(self.rounds.run(), name="coordinator-rounds")
        return self.address

    async def wait_done(self, timeout_s: float | None = None) -> None:
        """Wait for the last round (or for the run to fail)."""
        if self._run_task is None:
            raise RuntimeError("the coordinator was not started")
        await asyncio.wait_for(asyncio.shield(self._run_task), timeout_s)

    async def stop(self) -> None:
        """Say BYE to the silos, cancel the tasks and close the socket and status server."""
        await self.sessions.say_bye("done" if self.phase == "done" else "stopping")
        for task in [*self._tasks, *([self._run_task] if self._run_task else [])]:
            task.cancel()
        self.recorder.close(ok=self.phase == "done")
        for task in [*self._tasks, *([self._run_task] if self._run_task else [])]:
            try:
                await task
            except (asyncio.CancelledError, Exception):  # the tasks log their own failures
                pass
        self._tasks, self._run_task = [], None
        await self.status_server.stop()
        self.sessions.close()
        remove_spool(self.run_dir)  # a round cut short leaves no update files behind

    def online(self) -> list[str]:
        """Silos heard from within `silo_timeout_s`, sorted."""
        return self.sessions.online()

    # ------------------------------------------------------------------ status
    def status(self) -> dict[str, Any]:
        """The status document of docs/CONTRACTS.md."""
        now = time.time()
        rs = self.current
        return {
            "run": self.cfg.run_name,
            "round": rs.round_id if rs else self.round,
            "completed_rounds": self.round,
            "rounds_total": self.cfg.rounds,
            "phase": self.phase,
            "deadline": rs.deadline if rs else None,
            "strategy": self.strategy.name,
            "address": self.address,
            "silos": [
                {
                    "id": s.id,
                    "online": bool(s.peer) and now - s.last_seen <= self.cfg.silo_timeout_s,
                    "last_seen": s.last_seen or None,
                    "rounds": s.rounds,
                    "examples": s.examples,
                }
                for s in sorted(self.silos.values(), key=lambda s: s.id)
            ],
            "rounds": with_gate(
                list(self.history), self.run_dir
            ),  # each round's promotion gate decision (federation/publishing/heldout.py)
        }
