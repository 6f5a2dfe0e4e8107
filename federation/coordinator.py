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
"""

from __future__ import annotations

import asyncio
import logging
import math
import shutil
import tempfile
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from appliance.core.adapter_registry import AdapterRegistry, AdapterVersion
from appliance.core.atomic import append_jsonl
from appliance.core.errors import ProtocolError, RoundFailed
from appliance.core.net import connectable_host, is_loopback
from appliance.core.tracking import Tracker
from appliance.core.types import StateDict
from federation import codec, wire
from federation.checkpoint import Checkpoint, load_latest, prune_checkpoints, save_checkpoint
from federation.keys import Enrolment, load_keypair
from federation.gate_resume import before_round
from federation.heldout import previous_adapter, received_eval, with_gate
from federation.lineage import round_meta
from federation.local_training import round_schedule
from federation.protocol import (ERROR_CODES, Bye, ErrorInfo, Header, Heartbeat, MsgType, SecAggStep, TrainTask,
                                 UpdateResult, Welcome, make_header)
from federation.timing import connection_timeout
from federation.transport import Incoming, ServerTransport, check_plaintext_endpoint
from federation.train_payload import TrainPayloads
from federation.train_window import TrainWindow, acknowledges, train_wait_s
from federation.update_spool import UpdateSpool, open_round_spool, remove_spool

if TYPE_CHECKING:
    from appliance.core.settings import ApplianceSettings
    from federation.server_strategies import Strategy

logger = logging.getLogger(__name__)

Exporter = Callable[[StateDict, Path], None]  # writes a PEFT folder for a state dict
MAX_FAILED_ROUNDS = 3


@dataclass
class SiloInfo:
    """What the coordinator knows about one silo."""

    id: str
    peer: bytes
    last_seen: float
    rounds: int = 0
    examples: int = 0
    lora_r: int | None = None  # the rank it trains at (HELLO); None = the global rank
    lora_alpha: float | None = None
    down_bps: float | None = None  # throughput of its last measured TRAIN transfer (bytes/s, latency included)
    up_bps: float | None = None  # ... and of its last measured UPDATE transfer
    last_update_bytes: int | None = None
    acks_train: bool = False  # it acknowledges TRAINs as they arrive (HELLO): the TRAIN window waits for it


@dataclass
class RoundState:
    """The round in flight."""

    round_id: int
    selected: set[str]
    acc: Any
    global_state: StateDict
    deadline: float  # the latest of the selected silos' deadlines (each silo has its own: `deadlines`)
    started: float
    deadlines: dict[str, float] = field(default_factory=dict)  # silo -> its deadline (train allowance + its transfer allowance)
    allowances: dict[str, float] = field(default_factory=dict)  # silo -> its transfer allowance (s)
    train_sent: dict[str, float] = field(default_factory=dict)  # silo -> when its first TRAIN of the round went out
    bytes_down: dict[str, int] = field(default_factory=dict)  # silo -> size of the TRAIN it was sent
    timings: dict[str, dict[str, Any]] = field(default_factory=dict)  # silo -> federation.timing.silo_timings
    answered: dict[str, dict[str, Any]] = field(default_factory=dict)  # silo -> {"num_examples", "metrics", "train_s"}
    rejected: dict[str, str] = field(default_factory=dict)  # silo -> error code (protocol.ERROR_CODES)
    updates: Any = field(default_factory=dict)  # silo -> checked float32 update, weighed at the end (an update_spool.UpdateSpool: on disk)
    bytes_in: int = 0
    bytes_out: int = 0
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    secure: Any = None  # a secure_round.SecureRound when federation.secure_aggregation is on
    sent: dict[str, StateDict] = field(default_factory=dict)  # silo -> the adapter it was sent, when not the global one
    shares: dict[str, float] = field(default_factory=dict)  # silo -> its (capped) share of the aggregate
    norm_bound: float | None = None  # the round's update norm bound (federation.bounds.adaptive_norm_bound)
    norms: dict[str, float] = field(default_factory=dict)  # silo -> its update's L2 norm (secure: as advertised)
    clipped: dict[str, dict[str, float]] = field(default_factory=dict)  # silo -> {"norm", "clipped_to"}
    dropped: list[str] = field(default_factory=list)  # silos unenrolled after they answered: their updates left out
    train_payloads: TrainPayloads = field(default_factory=TrainPayloads)  # the global adapter encoded once per round
    train_window: TrainWindow | None = None  # TRAINs on the way at once (federation.train_window_bytes)

    def deadline_of(self, silo_id: str) -> float:
        """The silo's own deadline (the round's latest one for a silo not yet given one)."""
        return self.deadlines.get(silo_id, self.deadline)

    async def wait_for_change(self, max_wait_s: float = 0.25) -> None:
        """Sleep until something about the round changes (an answer, a silo leaving), the deadline, or `max_wait_s`."""
        self.changed.clear()
        try:
            await asyncio.wait_for(self.changed.wait(), timeout=min(max_wait_s, max(0.01, self.deadline - time.time())))
        except asyncio.TimeoutError:
            pass


class Coordinator:
    """Runs a federation. `await start()`, then `await wait_done()` or `await stop()`.

    Args:
        settings: the appliance settings (uses `federation`, `train`, the home layout).
        strategy: aggregation strategy (`federation.service.build_strategy(...)` or
            `federation.strategy_factory.make_strategy(...)`; product aggregation takes its lora_alpha there).
        initial_state: the round-0 global adapter; default `train.initial_adapter_state(settings.train, model)`.
        on_publish: callbacks `(AdapterVersion) -> None` called after each round's checkpoint (errors are logged).
        exporter: writes a PEFT folder for a state dict; default `train.save_adapter_dir` on the base model.
            Without a registry export (`exporter=False`) rounds are checkpointed but not registered.
    """

    def __init__(self, settings: "ApplianceSettings", strategy: "Strategy", *, initial_state: StateDict | None = None,
                 on_publish: list[Callable[[AdapterVersion], None]] | None = None,
                 exporter: Exporter | None | bool = None) -> None:
        self.settings, self.cfg, self.strategy = settings, settings.federation, strategy
        self.run_dir = settings.federation_dir / self.cfg.run_name
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.on_publish = list(on_publish or [])
        self._exporter = exporter
        self._initial_state = initial_state
        self.global_state: StateDict = {}
        self.round = 0  # last completed round
        # The newest round records (status, console, publisher); the whole history is the append-only rounds.jsonl.
        self.history: deque[dict[str, Any]] = deque(maxlen=self.cfg.history_in_memory)
        self.silos: dict[str, SiloInfo] = {}
        self.phase = "idle"
        self.current: RoundState | None = None
        self._transport: ServerTransport | None = None
        self._tasks: list[asyncio.Task] = []
        self._run_task: asyncio.Task | None = None
        self._tracker: Tracker | None = None
        self._status_runner = None
        self.status_url: str | None = None
        self.address: str | None = None
        self._registry = AdapterRegistry(settings.adapters_dir)
        self._enrolment = None if self.cfg.plaintext else Enrolment(settings.keys_dir)
        # The last secure round's masked vectors as received (audit, tests): {round: {silo: bytes}}, one round only.
        self.secure_inputs: dict[int, dict[str, bytes]] = {}
        self.message_limit = 0  # the largest message read (federation.bounds.message_bound), set at start
        if self.cfg.secure_aggregation:
            from federation.secure_round import check_strategy

            check_strategy(strategy, self.cfg)

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> str:
        """Load the last checkpoint (or the initial state), bind the socket and status endpoint, start the rounds."""
        self._restore()
        self._tracker = self._open_tracker()
        self._transport = self._make_transport()
        self.address = await self._transport.start()
        await self._start_status_server()
        self._tasks.append(asyncio.create_task(self._recv_loop(), name="coordinator-recv"))
        if self._enrolment is not None:
            self._tasks.append(asyncio.create_task(self._watch_enrolment(), name="coordinator-enrolment"))
        self._run_task = asyncio.create_task(self._run_rounds(), name="coordinator-rounds")
        return self.address

    async def wait_done(self, timeout_s: float | None = None) -> None:
        """Wait for the last round (or for the run to fail)."""
        await asyncio.wait_for(asyncio.shield(self._run_task), timeout_s)

    async def stop(self) -> None:
        """Say BYE to the silos, cancel the tasks and close the socket and status server."""
        if self._transport is not None:
            bye = Bye(reason="done" if self.phase == "done" else "stopping")
            for silo in self.silos.values():
                if silo.last_seen > 0:  # silos that said BYE are gone already
                    await self._send(silo.peer, make_header(MsgType.BYE, bye, run=self.cfg.run_name, round_id=self.round))
        for task in [*self._tasks, *([self._run_task] if self._run_task else [])]:
            task.cancel()
        if self._tracker is not None:
            self._tracker.close(ok=self.phase == "done")
            self._tracker = None
        for task in [*self._tasks, *([self._run_task] if self._run_task else [])]:
            try:
                await task
            except (asyncio.CancelledError, Exception):  # the tasks log their own failures
                pass
        self._tasks, self._run_task = [], None
        if self._status_runner is not None:
            await self._status_runner.cleanup()
            self._status_runner = None
        if self._transport is not None:
            self._transport.close()
            self._transport = None
        remove_spool(self.run_dir)  # a round cut short leaves no update files behind

    def _make_transport(self) -> ServerTransport:
        endpoint = self.cfg.bind_address or f"tcp://{self.cfg.bind_host}:{self.cfg.port}"
        check_plaintext_endpoint(endpoint, self.cfg.plaintext, "bind")
        keypair = None if self.cfg.plaintext else load_keypair(self.settings.keys_dir, "coordinator")
        if keypair is None and not self.cfg.plaintext:
            from appliance.core.errors import ConfigError

            raise ConfigError("no coordinator key pair: run `appliance federation init` first (or set federation.plaintext for tests)")
        enrolment = self._enrolment

        def lookup(public_key: str) -> str | None:
            return enrolment.name_of(public_key) if enrolment is not None else None

        from federation.bounds import message_bound

        # Messages above the bound get an ERROR naming it (`_handle`, before any decoding); the socket itself drops a
        # connection whose message exceeds twice the bound, so nothing bigger is ever read into memory.
        self.message_limit = message_bound(self.cfg.max_message_bytes, self.global_state)
        return ServerTransport(endpoint, keypair=keypair, lookup=lookup, plaintext=self.cfg.plaintext,
                               max_message_bytes=2 * self.message_limit, heartbeat_s=self.cfg.heartbeat_interval_s,
                               heartbeat_timeout_s=connection_timeout(self.cfg, 2 * self.message_limit),
                               receive_hwm=self.cfg.receive_hwm)

    def _restored_history(self, ckpt: Checkpoint) -> list[dict[str, Any]]:
        """The run's records from `rounds.jsonl`, plus the checkpointed round's own record when the crash came before
        it reached the log (an older checkpoint's full `history` is read as it is)."""
        from federation.checkpoint import read_round_log

        if "history" in ckpt.state:  # written before the history moved out of state.json
            return list(ckpt.state["history"])
        history = read_round_log(self.run_dir)
        last = ckpt.state.get("record")
        if isinstance(last, dict) and not any(r.get("round") == ckpt.round_id and "failed" not in r for r in history):
            history.append(last)
        return history

    def _restore(self) -> None:
        ckpt = load_latest(self.run_dir)
        if ckpt is not None:
            self.global_state, self.round = ckpt.global_state, ckpt.round_id
            self.strategy.load_state_dict(ckpt.strategy_state)
            self.history = deque(self._restored_history(ckpt), maxlen=self.cfg.history_in_memory)
            for sid, info in ckpt.state.get("silos", {}).items():
                self.silos[sid] = SiloInfo(sid, b"", 0.0, info.get("rounds", 0), info.get("examples", 0))
            logger.info("resuming run %s after round %d from %s", self.cfg.run_name, self.round, self.run_dir)
            self._register_missing()
            return
        if self._initial_state is None:
            import train

            self._initial_state = train.initial_adapter_state(self.settings.train, self.settings.models_dir / self.settings.model)
        self.global_state = {k: v.detach().clone().float() for k, v in self._initial_state.items()}

    # ------------------------------------------------------------------ messages
    async def _send(self, peer: bytes, header: Header, tensors: StateDict | None = None, *, encoded: Any = None) -> int:
        if self._transport is None or not peer:
            return 0
        frames = encoded.frames(header) if encoded is not None else wire.encode(header, tensors)
        ok = await self._transport.send(peer, frames)
        return sum(len(f) for f in frames) if ok else 0

    async def _error(self, peer: bytes, code: str, message: str, round_id: int = -1) -> None:
        """ERROR `code` (one of protocol.ERROR_CODES) with a sentence of ours (never a raw exception) to one peer."""
        logger.warning("ERROR to %s: %s: %s", peer.hex()[:12], code, message)
        await self._send(peer, make_header(MsgType.ERROR, ErrorInfo(code=code, message=message), run=self.cfg.run_name, round_id=round_id))

    async def _recv_loop(self) -> None:
        while True:
            msg = await self._transport.recv()
            try:
                await self._handle(msg)
            except Exception as exc:  # service boundary: one bad message never stops the coordinator
                logger.error("failed to handle a message from %s: %s", msg.peer.hex()[:12], exc, exc_info=True)
                await self._error(msg.peer, "internal", "the coordinator could not handle this message (see its log)")

    async def _handle(self, msg: Incoming) -> None:
        silo_id = None
        if self._enrolment is not None:
            # Checked on every message, not only at connect: a silo removed since keeps no session.
            silo_id = self._enrolment.name_of(msg.public_key) if msg.public_key else None
            if silo_id is None:
                await self._error(msg.peer, "not_enrolled", "this silo's key is not enrolled (any more)")
                return
        size = sum(len(f) for f in msg.frames)
        if size > self.message_limit:  # before any decoding of the payload
            if silo_id is None:
                silo_id = _plaintext_sender(msg.frames[0])  # plaintext (tests only): the header's word
            known = self.silos.get(silo_id) if silo_id else None
            if known is not None and known.peer == msg.peer:
                known.last_seen = time.time()  # it is alive; its answer is refused, not lost
            rs = self.current
            if silo_id is not None and rs is not None and silo_id in rs.selected and silo_id not in rs.answered:
                rs.rejected.setdefault(silo_id, "oversized")
                rs.changed.set()
            await self._error(msg.peer, "oversized", f"a message of {size} bytes exceeds this coordinator's limit of "
                                                     f"{self.message_limit} bytes (federation.max_message_bytes)")
            return
        try:
            header = wire.decode_header(msg.frames)
        except ProtocolError as exc:
            rs = self.current
            if silo_id is not None and rs is not None and silo_id in rs.selected and silo_id not in rs.answered:
                rs.rejected.setdefault(silo_id, "malformed")  # an authenticated silo's broken answer ends its wait
                rs.changed.set()
            await self._error(msg.peer, "malformed", str(exc))
            return
        if silo_id is None:
            silo_id = header.silo_id  # plaintext (tests only): the header's word
        if not silo_id:
            await self._error(msg.peer, "unknown_silo", "message without a silo id", header.round_id)
            return
        silo = self.silos.get(silo_id)
        known = silo is not None and silo.peer == msg.peer
        if silo is None:
            silo = self.silos[silo_id] = SiloInfo(silo_id, msg.peer, time.time())
        silo.peer, silo.last_seen = msg.peer, time.time()
        if self.current is not None and self.current.train_window is not None and acknowledges(header, self.current.round_id):
            self.current.train_window.release(silo_id)  # its TRAIN arrived (or it answered, or left): next one may go
        if header.type == MsgType.HELLO:
            self._note_lora(silo, header.body)
        if header.type == MsgType.HELLO or (header.type == MsgType.HEARTBEAT and not known):
            await self._welcome(silo)
        elif header.type == MsgType.HEARTBEAT:
            await self._echo(silo, header)
        elif header.type == MsgType.UPDATE:
            await self._on_update(silo, header, msg.frames, msg.received_at or time.time())
        elif header.type == MsgType.SECAGG:
            await self._on_secagg(silo, header, msg.frames)
        elif header.type == MsgType.BYE:
            silo.last_seen = 0.0
            logger.info("silo %s left: %s", silo_id, header.body.get("reason", ""))
        elif header.type == MsgType.ERROR:
            code = header.body.get("code", "")
            code = code if code in ERROR_CODES else "silo_error"  # a code only: the silo's own text stays out of records
            if code == "silo_policy":  # the silo's own settings refused the task: say which, so the operator can act
                logger.error("silo %s refused round %d by its own policy: %r", silo_id, header.round_id,
                             str(header.body.get("message", ""))[:300])
            else:
                logger.warning("silo %s reported an error: %s", silo_id, code)
            rs = self.current
            if rs and silo_id in rs.selected and header.round_id == rs.round_id and silo_id not in rs.answered:
                rs.rejected.setdefault(silo_id, code)
                rs.changed.set()
        else:
            await self._error(msg.peer, "unexpected", f"a coordinator does not accept {header.type.value}", header.round_id)
        if not known and header.type in (MsgType.UPDATE, MsgType.SECAGG, MsgType.ERROR):
            # Back on a new connection with an older message first (an update queued while its link was cut): that
            # is its return, as a heartbeat from a new connection would be, so it picks up the current round.
            await self._welcome(silo)

    async def _echo(self, silo: SiloInfo, header: Header) -> None:
        """Answer a silo's HEARTBEAT: it learns the coordinator is alive, and the offset of the clocks (federation.timing)."""
        sent_at = header.body.get("sent_at")
        if sent_at is not None:
            await self._send(silo.peer, make_header(MsgType.HEARTBEAT, Heartbeat(echo=sent_at, sent_at=time.time()),
                                                    run=self.cfg.run_name, round_id=self.round, silo_id=silo.id))

    async def _welcome(self, silo: SiloInfo) -> None:
        welcome = Welcome(rounds_total=self.cfg.rounds, strategy=self.strategy.name, heartbeat_interval_s=self.cfg.heartbeat_interval_s)
        await self._send(silo.peer, make_header(MsgType.WELCOME, welcome, run=self.cfg.run_name, round_id=self.round, silo_id=silo.id))
        logger.info("silo %s is online", silo.id)
        rs = self.current
        if rs is not None and rs.rejected.get(silo.id) == "unreachable":
            del rs.rejected[silo.id]  # its connection dropped as TRAIN went out; it is back, so it gets TRAIN again
        if rs is not None and silo.id not in rs.answered and silo.id not in rs.rejected and time.time() < rs.deadline_of(silo.id) \
                and (rs.secure is None or rs.secure.step == "advertise"):
            rs.selected.add(silo.id)  # a silo that (re)connects mid-round picks up the current round
            await self._send_train(rs, silo)

    async def _on_update(self, silo: SiloInfo, header: Header, frames: list[bytes], received_at: float) -> None:
        rs = self.current
        size = sum(len(f) for f in frames)
        if rs is None or header.round_id != rs.round_id:
            await self._error(silo.peer, "stale_round", f"update for round {header.round_id}, current round is {rs.round_id if rs else 'none'}", header.round_id)
            return
        rs.bytes_in += size
        refusal = self._refuse_update(silo.id, header, rs)
        if refusal is not None:  # not this silo's answer to this round: its first answer (if any) stands
            await self._error(silo.peer, *refusal, header.round_id)
            return
        checked = self._check_update(silo.id, header, frames, rs)
        if isinstance(checked, tuple):
            code, message = checked
            rs.rejected[silo.id] = code
            rs.changed.set()
            await self._error(silo.peer, code, message, header.round_id)
            return
        body = UpdateResult.model_validate(header.body)
        rs.updates[silo.id] = checked
        rs.answered[silo.id] = {"num_examples": body.num_examples, "metrics": body.metrics, "train_s": body.train_s, "bytes": size}
        self._note_timings(rs, silo, body, received_at, size)
        silo.rounds += 1
        silo.examples += body.num_examples
        rs.changed.set()
        logger.info("round %d: accepted the update of %s (%d examples, %d bytes)", rs.round_id, silo.id, body.num_examples, size)

    def _note_timings(self, rs: RoundState, silo: SiloInfo, body: UpdateResult, received_at: float, size: int) -> None:
        """The silo's download/train/upload of this round (federation.timing), and its link's throughput for the
        transfer allowance of its next deadlines."""
        from federation.timing import silo_timings, throughput_bps

        sent = rs.train_sent.get(silo.id)
        if sent is None:
            return
        t = silo_timings(train_sent=sent, update_received=received_at, train_received=body.received_at,
                         update_sent=body.sent_at, train_s=body.train_s, offset_s=body.clock_offset_s,
                         bytes_down=rs.bytes_down.get(silo.id, 0), bytes_up=size)
        rs.timings[silo.id] = t
        silo.last_update_bytes = size
        if t["download_s"] is not None:
            silo.down_bps = throughput_bps(t["bytes_down"], t["download_s"])
            silo.up_bps = throughput_bps(size, t["upload_s"])

    async def _on_secagg(self, silo: SiloInfo, header: Header, frames: list[bytes]) -> None:
        rs = self.current
        if rs is None or rs.secure is None or header.round_id != rs.round_id:
            await self._error(silo.peer, "stale_round", f"secure-aggregation message for round {header.round_id}, "
                              f"no secure round {header.round_id} is running", header.round_id)
            return
        size = sum(len(f) for f in frames)
        rs.bytes_in += size
        limit = rs.secure.payload_limit()
        if header.payload_bytes > limit:  # before decoding: a masked vector is one word per adapter weight
            if silo.id in rs.secure.expected and silo.id not in rs.secure.answers[rs.secure.step]:
                rs.rejected.setdefault(silo.id, "oversized")
            rs.changed.set()
            await self._error(silo.peer, "oversized", f"a secure-aggregation payload of {header.payload_bytes} bytes "
                                                      f"exceeds the {limit}-byte bound for this adapter", header.round_id)
            return
        try:
            rs.secure.handle(silo.id, header, wire.decode_payload(header, frames), size)
        except ProtocolError as exc:
            code = getattr(exc, "code", "secagg")
            if code != "duplicate" and silo.id in rs.secure.expected and silo.id not in rs.secure.answers[rs.secure.step]:
                rs.rejected.setdefault(silo.id, code)  # a repeated step leaves the silo's first answers alone
            rs.changed.set()
            await self._error(silo.peer, code, str(exc), header.round_id)

    async def _send_secagg(self, rs: RoundState, silo_id: str, step: str, data: dict[str, Any]) -> bool:
        header = make_header(MsgType.SECAGG, SecAggStep(step=step, data=data), run=self.cfg.run_name,
                             round_id=rs.round_id, silo_id=silo_id)
        sent = await self._send(self.silos[silo_id].peer, header)
        rs.bytes_out += sent
        return bool(sent)

    async def _run_secure(self, rs: RoundState) -> None:
        """Steps 1-5 of a secure round; the survivors' mean goes into the strategy's accumulator."""
        def alive(sid: str) -> bool:
            return time.time() - self.silos[sid].last_seen <= self.cfg.silo_timeout_s

        mean, survivors = await rs.secure.run(lambda sid, step, data: self._send_secagg(rs, sid, step, data), alive,
                                              self._shares, self._secure_bound)
        self.secure_inputs = {rs.round_id: dict(rs.secure.received)}  # the last round only: no growth over a run
        rs.norm_bound = rs.secure.norm_bound
        rs.norms = {s: i["update_norm"] for s, i in survivors.items() if i.get("update_norm") is not None}
        for sid, info in sorted(survivors.items()):
            # The secure mean once per survivor: the weighted mean is the secure mean, and the accumulator's count is
            # that of the plain path.
            rs.acc.add(sid, mean, 1.0)
            rs.shares[sid] = rs.secure.weights[sid]
            rs.answered[sid] = info
            self.silos[sid].rounds += 1
            self.silos[sid].examples += info["num_examples"]

    def _refuse_update(self, silo_id: str, header: Header, rs: RoundState) -> tuple[str, str] | None:
        """(code, message) when an UPDATE is not this silo's first, timely answer to this round."""
        if silo_id not in rs.selected:
            return "not_selected", f"silo {silo_id} was not selected for round {rs.round_id}"
        if silo_id in rs.answered or silo_id in rs.rejected:
            return "duplicate", f"silo {silo_id} already answered round {rs.round_id}; the first answer stands"
        if time.time() > rs.deadline_of(silo_id):
            return "late", f"round {rs.round_id}: the deadline of silo {silo_id} passed"
        return None

    def _note_lora(self, silo: SiloInfo, body: dict[str, Any]) -> None:
        """Remember the rank a silo trains at (HELLO's lora_r / lora_alpha; a malformed body keeps the global rank)."""
        from pydantic import ValidationError

        from federation.protocol import Hello

        try:
            hello = Hello.model_validate(body)
        except ValidationError as exc:
            logger.warning("silo %s: ignoring a malformed HELLO body: %s", silo.id, exc)
            return
        silo.lora_r, silo.lora_alpha = hello.lora_r, hello.lora_alpha
        silo.acks_train = hello.acks_train

    def _state_for(self, rs: RoundState, silo: SiloInfo) -> StateDict:
        """The adapter a silo trains from: the global one, or (product aggregation) its projection to the silo's rank."""
        state, scale = self.strategy.state_for_silo(rs.global_state, silo.lora_r, silo.lora_alpha)
        if state is not rs.global_state:
            rs.sent[silo.id] = state
            rs.acc.set_base(silo.id, state, scale)  # type: ignore[attr-defined]  # a ProductAccumulator
        return state

    def _check_update(self, silo_id: str, header: Header, frames: list[bytes], rs: RoundState) -> StateDict | tuple[str, str]:
        """The update, decoded (to the global adapter's shapes only) and checked; or (code, message) refusing it."""
        from federation.aggregate import InvalidUpdate, check_update, global_norm

        reference = rs.sent.get(silo_id, rs.global_state)  # the adapter this silo was sent (its own rank)
        limit = 3 * sum(t.numel() * 4 for t in reference.values()) + (1 << 20)
        if header.payload_bytes > limit:
            return "oversized", f"payload of {header.payload_bytes} bytes exceeds the {limit}-byte bound for this adapter"
        shapes = {k: list(v.shape) for k, v in reference.items()}
        body = UpdateResult.model_validate(header.body)  # validated with the header already (wire.decode_header)
        declared = body.encoding.get("shapes")
        if not isinstance(declared, dict) or not all(isinstance(v, list) for v in declared.values()):
            return "malformed", "the update's encoding declares no shapes"
        if declared.keys() != shapes.keys():
            extra, missing = sorted(declared.keys() - shapes.keys()), sorted(shapes.keys() - declared.keys())
            return "manifest", f"tensor names differ from the global adapter: extra {extra[:3]}, missing {missing[:3]}"
        wrong = next((k for k in sorted(shapes) if declared[k] != shapes[k]), None)
        if wrong is not None:  # refused before decoding: the sender does not choose what the coordinator allocates
            return "bad_shape", f"tensor {wrong!r} is declared {declared[wrong]}, the global adapter has {shapes[wrong]}"
        try:
            update = codec.decode(wire.decode_payload(header, frames), body.encoding, expected_shapes=shapes)
        except ProtocolError as exc:
            return "malformed", str(exc)
        try:
            check_update(silo_id, update, reference)
        except InvalidUpdate as exc:
            return exc.code, str(exc)
        norm = global_norm(update)
        if self.cfg.max_update_norm is not None and norm > self.cfg.max_update_norm:
            return "norm", f"update L2 norm {norm:.4g} exceeds federation.max_update_norm={self.cfg.max_update_norm}"
        return {k: v.float() for k, v in update.items()}

    def _shares(self, counts: dict[str, int]) -> dict[str, float]:
        """Each silo's share of the round: its claimed count, bounded by the one declared at enrolment, capped at
        `federation.max_silo_share` (`strategies.capped_weights`)."""
        from federation.aggregate import capped_weights

        bounded = {}
        for sid, n in counts.items():
            declared = self._enrolment.declared_examples(sid) if self._enrolment is not None else None
            bounded[sid] = min(n, declared) if declared is not None else n
        return capped_weights(bounded, self.cfg.max_silo_share)

    def _secure_bound(self, norms: dict[str, float]) -> float | None:
        """A secure round's norm bound, issued with the roster: from the norms the silos advertised."""
        from federation.bounds import adaptive_norm_bound

        return adaptive_norm_bound(norms, self.cfg)

    def _drop_unenrolled(self, rs: RoundState) -> None:
        """Leave out the answers of silos whose enrolment was removed after they answered (named in `dropped`)."""
        if self._enrolment is None:
            return
        enrolled = self._enrolment.names()
        for sid in sorted(set(rs.answered) - enrolled):
            self._forget_answer(rs, sid)

    def _forget_answer(self, rs: RoundState, sid: str) -> None:
        if sid in rs.answered and sid not in rs.dropped:
            logger.warning("round %d: silo %s was removed from the enrolment after it answered: its update is dropped",
                           rs.round_id, sid)
            rs.answered.pop(sid)
            rs.updates.pop(sid, None)
            rs.dropped.append(sid)
            rs.rejected[sid] = "not_enrolled"
            rs.changed.set()

    def _accumulate(self, rs: RoundState) -> None:
        """Clip the round's checked updates to its norm bound (federation.bounds), then add them to the strategy's
        accumulator with their capped shares: the bound and shares come from the norms and counts noted on arrival,
        and the updates are read back from the spool one at a time (federation.update_spool)."""
        from federation.bounds import adaptive_norm_bound

        self._drop_unenrolled(rs)
        rs.norms = rs.updates.norms()
        rs.norm_bound = adaptive_norm_bound(rs.norms, self.cfg)
        shares = rs.shares = self._shares({sid: rs.answered[sid]["num_examples"] for sid in rs.updates})
        for sid in sorted(rs.updates):
            update, clipped = rs.updates.load_clipped(sid, rs.norm_bound)
            if clipped is not None:
                rs.clipped[sid] = clipped
                logger.warning("round %d: the update of %s (L2 norm %.4g) was clipped to the round's bound %.4g",
                               rs.round_id, sid, clipped["norm"], clipped["clipped_to"])
            try:
                rs.acc.add(sid, update, shares[sid])
            except ValueError as exc:  # the strategy's own refusal (e.g. its accumulator's checks)
                logger.warning("round %d: strategy refused the update of %s: %s", rs.round_id, sid, exc)
                rs.answered.pop(sid)
                rs.rejected[sid] = getattr(exc, "code", "malformed")
        rs.updates.clear()

    async def _watch_enrolment(self, interval_s: float = 0.5) -> None:
        """Drop, within `interval_s`, the session of a silo whose enrolment was removed (`appliance federation remove`)."""
        while True:
            await asyncio.sleep(interval_s)
            enrolled = self._enrolment.names()
            for silo in list(self.silos.values()):
                if silo.id not in enrolled and silo.peer:
                    await self._drop_silo(silo)

    async def _drop_silo(self, silo: SiloInfo) -> None:
        logger.warning("silo %s was removed from the enrolment: dropping its session", silo.id)
        await self._send(silo.peer, make_header(MsgType.BYE, Bye(reason="removed"), run=self.cfg.run_name, round_id=self.round))
        silo.peer, silo.last_seen = b"", 0.0
        rs = self.current
        if rs is not None and silo.id in rs.selected and silo.id not in rs.answered:
            rs.rejected.setdefault(silo.id, "not_enrolled")
            rs.updates.pop(silo.id, None)
            rs.changed.set()
        elif rs is not None and rs.secure is None and silo.id in rs.answered:
            self._forget_answer(rs, silo.id)  # its update is not aggregated yet (`_accumulate`): it leaves with it

    # ------------------------------------------------------------------ rounds
    def online(self) -> list[str]:
        """Silos heard from within `silo_timeout_s`, sorted."""
        now = time.time()
        return sorted(s.id for s in self.silos.values() if s.peer and now - s.last_seen <= self.cfg.silo_timeout_s)

    async def _run_rounds(self) -> None:
        failed_in_row = 0
        try:
            while self.round < self.cfg.rounds:
                round_id = self.round + 1
                try:
                    await self._wait_for_silos(round_id)
                    await before_round(self)  # after a held-back round: start from the promoted version (gate_resume.py)
                    await self._run_round(round_id)
                    failed_in_row = 0
                except RoundFailed as exc:
                    failed_in_row += 1
                    logger.error("round %d failed: %s", round_id, exc)
                    self._record({"round": round_id, "failed": str(exc), "time": time.time()})
                    if failed_in_row >= MAX_FAILED_ROUNDS:
                        self.phase = "failed"
                        logger.error("stopping run %s after %d failed rounds in a row", self.cfg.run_name, failed_in_row)
                        return
            self.phase = "done"
            logger.info("run %s done after %d rounds", self.cfg.run_name, self.round)
        except asyncio.CancelledError:
            self.phase = "stopped"
            raise
        except Exception:
            self.phase = "failed"
            logger.exception("run %s failed", self.cfg.run_name)
            raise

    async def _wait_for_silos(self, round_id: int) -> None:
        self.phase = "waiting"
        deadline = time.monotonic() + self.cfg.start_timeout_s
        while len(self.online()) < self.cfg.min_silos:
            if time.monotonic() > deadline:
                raise RoundFailed(f"only {len(self.online())} of min_silos={self.cfg.min_silos} silos online after {self.cfg.start_timeout_s:.0f} s")
            await asyncio.sleep(0.05)

    async def _send_train(self, rs: RoundState, silo: SiloInfo, *, windowed: bool = False) -> None:
        method = codec.downlink_method(self.cfg.compression)
        encoded = rs.train_payloads.get(self._state_for(rs, silo), method, rs.global_state)  # one payload for all silos
        meta = encoded.meta
        dp_silo = self.cfg.dp_mode == "silo"
        secure = None
        if rs.secure is not None:
            from federation.secure_round import config_body

            secure = config_body(rs.secure.config)
        config = {**round_schedule(self.cfg.lr_schedule, rs.round_id, self.cfg.local_steps, self.cfg.rounds,
                                    self.cfg.local_optimizer),
                  **self.strategy.plan_round(rs.round_id)}
        deadline = self._silo_deadline(rs, silo, encoded.tensor_bytes)
        task = TrainTask(local_steps=self.cfg.local_steps, config=config, rounds_total=self.cfg.rounds,
                         compression=self.cfg.compression, encoding=meta, deadline_unix=deadline,
                         dp_clip_norm=self.cfg.dp_clip_norm if dp_silo else None,
                         dp_noise_multiplier=self.cfg.dp_noise_multiplier if dp_silo else 0.0,
                         secure_aggregation=secure)
        header = make_header(MsgType.TRAIN, task, run=self.cfg.run_name, round_id=rs.round_id, silo_id=silo.id)
        if windowed and rs.train_window is not None:  # not from the receive loop (`_welcome`): it brings the acks
            await rs.train_window.acquire(silo.id, len(encoded.payload), timeout_s=train_wait_s(
                rs.allowances.get(silo.id, 30.0), silo.acks_train, self.cfg.heartbeat_interval_s))
        sent = await self._send(silo.peer, header, encoded=encoded)
        rs.bytes_out += sent
        if not sent:
            rs.rejected[silo.id] = "unreachable"
            return
        rs.train_sent.setdefault(silo.id, time.time())  # a TRAIN sent again after a reconnect counts from the first
        rs.bytes_down[silo.id] = sent

    def _silo_deadline(self, rs: RoundState, silo: SiloInfo, train_bytes: int) -> float:
        """The silo's deadline of this round: the round's start + `round_deadline_s` (training) + its transfer
        allowance (the TRAIN's and its expected UPDATE's bytes over its link's measured throughput); set once."""
        from federation.timing import transfer_allowance_s

        if silo.id not in rs.deadlines:
            allowance = transfer_allowance_s(train_bytes, silo.last_update_bytes or train_bytes, down_bps=silo.down_bps,
                                             up_bps=silo.up_bps, assumed_mbit=self.cfg.assumed_link_mbit,
                                             slack=self.cfg.transfer_slack)
            rs.allowances[silo.id] = allowance
            rs.deadlines[silo.id] = rs.started + self.cfg.round_deadline_s + allowance
            rs.deadline = max(rs.deadlines.values())
        return rs.deadlines[silo.id]

    async def _run_round(self, round_id: int) -> None:
        selected = self.online()
        now = time.time()
        rs = RoundState(round_id, set(selected), self.strategy.start_round(round_id, self.global_state), self.global_state,
                        deadline=now + self.cfg.round_deadline_s, started=now)  # silos' own deadlines extend it (_send_train)
        rs.updates = open_round_spool(self.run_dir, round_id, rs.acc)  # checked updates wait on disk, not in RAM
        rs.train_window = TrainWindow(self.cfg.train_window_bytes)
        if self.cfg.secure_aggregation:
            from federation.secure_round import SecureRound, round_config

            rs.secure = SecureRound(round_config(self.cfg, round_id, len(selected)), self.global_state, rs, self.cfg.min_silos)
        self.current, self.phase = rs, "training"
        logger.info("round %d: TRAIN to %s%s", round_id, ", ".join(selected), " (secure aggregation)" if rs.secure else "")
        for sid in selected:
            await self._send_train(rs, self.silos[sid], windowed=True)
        if rs.secure is not None:
            try:
                await self._run_secure(rs)
            finally:
                self.current = None
        while rs.secure is None:
            # A silo whose TRAIN could not be delivered (its connection was being re-established) stays pending while
            # it is alive: when it reconnects it gets the TRAIN again (`_welcome`).
            pending = rs.selected - rs.answered.keys() - {s for s, why in rs.rejected.items() if why != "unreachable"}
            now = time.time()
            # A silo is silent while its update crosses a slow link (its heartbeats queue behind it): silence counts
            # against it only beyond silo_timeout_s + its transfer allowance.
            waiting = [s for s in pending if now < rs.deadline_of(s)
                       and now - self.silos[s].last_seen <= self.cfg.silo_timeout_s + rs.allowances.get(s, 0.0)]
            if not waiting:
                break
            await rs.wait_for_change()
        self.phase = "aggregating"
        self.current = None
        for sid in sorted(rs.selected - rs.answered.keys() - rs.rejected.keys()):
            logger.warning("round %d: no update from %s (%s)", round_id, sid,
                           "deadline passed" if time.time() >= rs.deadline_of(sid) else "went offline")
        if rs.secure is None:
            self._accumulate(rs)
        failures = sorted((rs.selected - rs.answered.keys()) | rs.rejected.keys())
        if len(rs.answered) < self.cfg.min_silos:
            failed = ", ".join(f"{s} ({rs.rejected.get(s, 'no answer')})" for s in failures) or "none"
            raise RoundFailed(f"{len(rs.answered)} valid update(s) < min_silos={self.cfg.min_silos}; failed: {failed}")
        self.global_state = self._aggregate(rs, failures)
        self.round = round_id
        record = self._round_record(rs, failures)
        self._checkpoint(record)  # first: a registered (and published) version always has its checkpoint on disk
        version = self._register(record)
        self._append_round_log(record)
        prune_checkpoints(self.run_dir, self.cfg.keep_checkpoints)
        if version is not None:
            self._notify(version)

    def _aggregate(self, rs: RoundState, failures: list[str]) -> StateDict:
        """The strategy's new global adapter, checked (finite, norm bound) before anything uses it.

        Raises:
            RoundFailed: the strategy kept the previous global, or the aggregate failed its checks (the strategy's
                state is then rolled back, so the round leaves no trace).
        """
        from federation.aggregate import check_aggregate

        saved = {k: v.clone() for k, v in self.strategy.state_dict().items()}
        new_state = self.strategy.finish_round(rs.round_id, self.global_state, rs.acc, failures)
        if isinstance(rs.updates, UpdateSpool):
            rs.updates.close()  # the round's spooled files (also a robust strategy's) are no longer needed
        if new_state is None:
            raise RoundFailed(f"strategy {self.strategy.name} kept the previous global adapter (see its log line)")
        from federation.bounds import aggregate_bound

        bound = aggregate_bound(self.cfg, self.strategy, rs.norm_bound)
        if rs.secure is not None and bound is not None and self.cfg.max_aggregate_norm is None:
            bound += rs.secure.quantisation_slack()  # the masked sum's rounding error
        reason = check_aggregate(new_state, self.global_state, bound)
        if reason is not None:
            self.strategy.load_state_dict(saved)
            raise RoundFailed(f"aggregate rejected, previous global adapter kept: {reason}")
        return {k: v.detach().float().contiguous() for k, v in new_state.items()}

    def _round_record(self, rs: RoundState, failures: list[str]) -> dict[str, Any]:
        total = sum(a["num_examples"] for a in rs.answered.values())
        keys = sorted({k for a in rs.answered.values() for k in a["metrics"]})
        metrics = {k: sum(a["metrics"][k] * a["num_examples"] for a in rs.answered.values() if k in a["metrics"]) /
                   max(1, sum(a["num_examples"] for a in rs.answered.values() if k in a["metrics"])) for k in keys}
        duration = time.time() - rs.started
        train_s = max((a["train_s"] for a in rs.answered.values()), default=0.0)
        epsilon = self.strategy.epsilon(self.cfg.dp_delta)
        if epsilon is not None:
            epsilon = float(epsilon) if math.isfinite(epsilon) else None  # no noise: no finite guarantee (JSON has no inf)
        return {"round": rs.round_id, "participants": sorted(rs.answered), "failures": failures, "examples": total,
                "metrics": metrics, "per_silo": {s: a["metrics"] for s, a in rs.answered.items()},
                "rejected": rs.rejected, "bytes_in": rs.bytes_in, "bytes_out": rs.bytes_out, "duration_s": duration,
                "train_s_max": train_s, "non_training_share": max(0.0, 1 - train_s / duration) if duration > 0 else 0.0,
                "epsilon": epsilon, "dp": self.cfg.dp_mode, "strategy": self.strategy.name, "adapter": None, "time": time.time(),
                "secure_aggregation": rs.secure is not None,
                "shares": {s: round(rs.shares[s], 6) for s in sorted(rs.answered) if s in rs.shares},
                "norm_bound": rs.norm_bound, "clipped": rs.clipped, "dropped": rs.dropped,
                "update_norms": {s: rs.norms[s] for s in sorted(rs.answered) if s in rs.norms},
                "timings": {s: rs.timings.get(s) or {"train_s": round(rs.answered[s]["train_s"], 3)} for s in sorted(rs.answered)},
                "deadlines_s": {s: round(d - rs.started, 3) for s, d in sorted(rs.deadlines.items())},
                "started_from": getattr(self, "started_from", None),  # the promoted version, after a held-back round
                "received_eval": received_eval({s: a["metrics"] for s, a in rs.answered.items()}, rs.shares,
                                               {s: a["num_examples"] for s, a in rs.answered.items()}, previous_adapter(self.history))}

    def _record(self, record: dict[str, Any]) -> None:
        self.history.append(record)
        append_jsonl(self.run_dir / "rounds.jsonl", record)

    def _open_tracker(self) -> Tracker:
        """TensorBoard files in federation/RUN/tb/ (and an MLflow run with tracking.mlflow_uri): one step per round."""
        from appliance.core.settings import redacted_dump

        dump = redacted_dump(self.settings)
        return Tracker(self.settings.tracking, self.run_dir / "tb", run_name=f"federation-{self.cfg.run_name}",
                       params={"federation": dump["federation"], "train": dump["train"], "strategy": self.strategy.name},
                       tags={"appliance.kind": "federation"})

    def _track(self, record: dict[str, Any]) -> None:
        if self._tracker is None:
            return
        per_silo = {f"silo/{silo}/{k}": v for silo, m in record.get("per_silo", {}).items() for k, v in m.items()}
        self._tracker.log({**record["metrics"], **per_silo, "participants": len(record["participants"]),
                           **{k: record.get(k) for k in ("examples", "bytes_in", "bytes_out", "duration_s", "non_training_share", "epsilon")}},
                          record["round"])

    def _checkpoint(self, record: dict[str, Any]) -> None:
        self.history.append(record)
        self._track(record)
        silos = {s.id: {"rounds": s.rounds, "examples": s.examples} for s in self.silos.values()}
        # The round's own record only: the history is the append-only rounds.jsonl, so state.json stays bounded.
        save_checkpoint(self.run_dir, Checkpoint(self.round, self.global_state, self.strategy.state_dict(),
                                                 {"record": record, "silos": silos, "run": self.cfg.run_name}))
        logger.info("round %d checkpointed: participants %s, metrics %s", self.round, record["participants"], record["metrics"])

    def _append_round_log(self, record: dict[str, Any]) -> None:
        append_jsonl(self.run_dir / "rounds.jsonl", record)

    def _register_missing(self) -> None:
        """After a restart: register the checkpointed round if the crash came between its checkpoint and its
        registration, and fill the adapter reference into its record."""
        if self._exporter is False or not self.history:
            return
        record = self.history[-1]
        numbers = self._registry.versions(self.cfg.run_name)
        latest = self._registry.get(f"{self.cfg.run_name}:{numbers[-1]}") if numbers else None
        if latest is not None and latest.meta.get("round") == self.round:
            record["adapter"] = latest.ref
            return
        logger.info("round %d was checkpointed but not registered: registering it now", self.round)
        version = self._register(record)
        if version is not None:
            self._notify(version)

    def _register(self, record: dict[str, Any]) -> AdapterVersion | None:
        """Export the global adapter as a PEFT folder and register it as the next version of the run."""
        exporter = self._exporter
        if exporter is False:
            return None
        if exporter is None:
            exporter = self._default_exporter
        staging = Path(tempfile.mkdtemp(prefix=".export.", dir=self.run_dir))
        try:
            exporter(self.global_state, staging)
            meta = round_meta(self, record)  # federation/lineage.py
            version = self._registry.register(self.cfg.run_name, staging, meta)
        except Exception as exc:  # publishing must never fail the federation
            logger.error("round %d: could not register the global adapter: %s", self.round, exc, exc_info=True)
            return None
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        record["adapter"] = version.ref
        return version

    def _notify(self, version: AdapterVersion) -> None:
        for callback in self.on_publish:
            try:
                callback(version)
            except Exception as exc:  # a callback's failure is its own business
                logger.error("on_publish callback %r failed for %s: %s", callback, version.ref, exc, exc_info=True)

    def _default_exporter(self, state: StateDict, out_dir: Path) -> None:
        import train

        train.save_adapter_dir(state, self.settings.train, self.settings.models_dir / self.settings.model, out_dir)

    # ------------------------------------------------------------------ status
    def status(self) -> dict[str, Any]:
        """The status document of docs/CONTRACTS.md."""
        now = time.time()
        rs = self.current
        return {
            "run": self.cfg.run_name, "round": rs.round_id if rs else self.round, "completed_rounds": self.round,
            "rounds_total": self.cfg.rounds, "phase": self.phase, "deadline": rs.deadline if rs else None,
            "strategy": self.strategy.name, "address": self.address,
            "silos": [{"id": s.id, "online": bool(s.peer) and now - s.last_seen <= self.cfg.silo_timeout_s,
                       "last_seen": s.last_seen or None, "rounds": s.rounds, "examples": s.examples}
                      for s in sorted(self.silos.values(), key=lambda s: s.id)],
            "rounds": with_gate(list(self.history), self.run_dir),  # each round's promotion gate decision (federation/heldout.py)
        }

    def _status_token(self) -> str | None:
        """The status token `/status` requires when bound beyond loopback (None on a loopback bind)."""
        if is_loopback(self.cfg.bind_host):
            return None
        from appliance.core.tokens import coordinator_status_token

        return coordinator_status_token(self.settings)

    async def _start_status_server(self) -> None:
        from aiohttp import web

        from appliance.core.secrets import same_secret
        from appliance.core.tls import server_context

        token = self._status_token()

        async def status(request: web.Request) -> web.Response:
            if token is not None:
                given = request.headers.get("Authorization", "").removeprefix("Bearer ").strip()
                if not given or not same_secret(given, token):
                    return web.json_response({"error": "the coordinator's /status needs its status token (keys/status_token, "
                                                       "Authorization: Bearer TOKEN) when it binds beyond loopback"},
                                             status=401)
            return web.json_response(self.status())

        async def health(_request: web.Request) -> web.Response:
            return web.json_response({"status": "ok"})

        app = web.Application()
        app.router.add_get("/status", status)
        app.router.add_get("/health", health)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        # HTTPS with federation.tls_cert/tls_key (appliance.core.tls), else plain HTTP.
        tls = server_context(self.cfg.tls_cert, self.cfg.tls_key) if self.cfg.tls_cert is not None else None
        site = web.TCPSite(runner, self.cfg.bind_host, self.cfg.status_port, ssl_context=tls)
        await site.start()
        self._status_runner = runner
        port = runner.addresses[0][1]
        self.status_url = f"{self.cfg.scheme}://{connectable_host(self.cfg.bind_host)}:{port}/status"


def _plaintext_sender(frame: bytes) -> str | None:
    """The silo id a plaintext header claims (its frame alone, at most protocol.MAX_HEADER_BYTES); None if unreadable."""
    from federation.protocol import HeaderError, load_header

    try:
        return load_header(frame).silo_id or None
    except HeaderError:
        return None

