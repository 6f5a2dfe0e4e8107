"""The coordinator's silo sessions: the socket, HELLO/WELCOME, heartbeats, enrolment checks and the messages silos send.

Every message is checked against the current enrolment (CURVE mode): a silo removed since keeps no session, and
`watch_enrolment` drops, within half a second, the session of a silo whose enrolment was removed. A message above the
bound is refused before any decoding. UPDATEs are checked here (round, manifest against the adapter the silo was sent,
shapes before decoding, finite values, size and norm bounds) and answered ERROR (a code of `protocol.ERROR_CODES`)
when bad or late; accepted ones go to the round in flight (`round_runner.RoundState`).
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from fedllm.core.errors import ProtocolError
from fedllm.core.types import StateDict
from fedllm.federation.runtime.timing import connection_timeout
from fedllm.federation.runtime.train_window import acknowledges
from fedllm.federation.wire import frames as wire
from fedllm.federation.wire.keys import Enrolment, load_keypair
from fedllm.federation.wire.payload import decode_payload
from fedllm.federation.wire.protocol import (
    ERROR_CODES,
    Bye,
    ErrorInfo,
    Header,
    Heartbeat,
    MsgType,
    UpdateResult,
    Welcome,
    make_header,
)
from fedllm.federation.wire.transport import Incoming, ServerTransport, check_plaintext_endpoint

if TYPE_CHECKING:
    from fedllm.federation.runtime.coordinator import Coordinator
    from fedllm.federation.runtime.round_runner import RoundState

logger = logging.getLogger(__name__)


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


class Sessions:
    """The coordinator's side of the silos' connections: `open()`, then `start_tasks()`; `close()` at the end."""

    def __init__(self, coord: Coordinator) -> None:
        self.coord = coord
        self.cfg = coord.cfg
        self.enrolment = None if self.cfg.plaintext else Enrolment(coord.settings.keys_dir)
        self.transport: ServerTransport | None = None
        self.message_limit = (
            0  # the largest message read (fedllm.federation.aggregation.bounds.message_bound), set by `open`
        )

    # ------------------------------------------------------------------ lifecycle
    async def open(self) -> str:
        """Bind the socket (its message bound follows the global adapter, so after the restore); returns its address."""
        self.transport = self._make_transport()
        return await self.transport.start()

    def start_tasks(self) -> list[asyncio.Task]:
        """The receive loop and (CURVE mode) the enrolment watch, started."""
        tasks = [asyncio.create_task(self._recv_loop(), name="coordinator-recv")]
        if self.enrolment is not None:
            tasks.append(asyncio.create_task(self._watch_enrolment(), name="coordinator-enrolment"))
        return tasks

    async def say_bye(self, reason: str) -> None:
        """BYE to every silo still connected (silos that said BYE are gone already)."""
        if self.transport is None:
            return
        for silo in self.coord.silos.values():
            if silo.last_seen > 0:
                await self.send(
                    silo.peer,
                    make_header(MsgType.BYE, Bye(reason=reason), run=self.cfg.run_name, round_id=self.coord.round),
                )

    def close(self) -> None:
        """Close the socket."""
        if self.transport is not None:
            self.transport.close()
            self.transport = None

    def _make_transport(self) -> ServerTransport:
        endpoint = self.cfg.bind_address or f"tcp://{self.cfg.bind_host}:{self.cfg.port}"
        check_plaintext_endpoint(endpoint, self.cfg.plaintext, "bind")
        keypair = None if self.cfg.plaintext else load_keypair(self.coord.settings.keys_dir, "coordinator")
        if keypair is None and not self.cfg.plaintext:
            from fedllm.core.errors import ConfigError

            raise ConfigError(
                "no coordinator key pair: run `appliance federation init` first (or set federation.plaintext for tests)"
            )
        enrolment = self.enrolment

        def lookup(public_key: str) -> str | None:
            return enrolment.name_of(public_key) if enrolment is not None else None

        from fedllm.federation.aggregation.bounds import message_bound

        # Messages above the bound get an ERROR naming it (`_handle`, before any decoding); the socket itself drops a
        # connection whose message exceeds twice the bound, so nothing bigger is ever read into memory.
        self.message_limit = message_bound(self.cfg.max_message_bytes, self.coord.global_state)
        return ServerTransport(
            endpoint,
            keypair=keypair,
            lookup=lookup,
            plaintext=self.cfg.plaintext,
            max_message_bytes=2 * self.message_limit,
            heartbeat_s=self.cfg.heartbeat_interval_s,
            heartbeat_timeout_s=connection_timeout(self.cfg, 2 * self.message_limit),
            receive_hwm=self.cfg.receive_hwm,
        )

    def online(self) -> list[str]:
        """Silos heard from within `silo_timeout_s`, sorted."""
        now = time.time()
        return sorted(
            s.id for s in self.coord.silos.values() if s.peer and now - s.last_seen <= self.cfg.silo_timeout_s
        )

    # ------------------------------------------------------------------ messages
    async def send(self, peer: bytes, header: Header, tensors: StateDict | None = None, *, encoded: Any = None) -> int:
        """Send one message to `peer`; returns the bytes sent (0 when it could not go)."""
        if self.transport is None or not peer:
            return 0
        frames = encoded.frames(header) if encoded is not None else wire.encode(header, tensors)
        ok = await self.transport.send(peer, frames)
        return sum(len(f) for f in frames) if ok else 0

    async def error(self, peer: bytes, code: str, message: str, round_id: int = -1) -> None:
        """ERROR `code` (one of protocol.ERROR_CODES) with a sentence of ours (never a raw exception) to one peer."""
        logger.warning("ERROR to %s: %s: %s", peer.hex()[:12], code, message)
        await self.send(
            peer,
            make_header(MsgType.ERROR, ErrorInfo(code=code, message=message), run=self.cfg.run_name, round_id=round_id),
        )

    async def _recv_loop(self) -> None:
        transport = self.transport
        assert transport is not None  # the loop starts after the socket is bound
        while True:
            msg = await transport.recv()
            try:
                await self._handle(msg)
            except Exception as exc:  # service boundary: one bad message never stops the coordinator
                logger.error("failed to handle a message from %s: %s", msg.peer.hex()[:12], exc, exc_info=True)
                await self.error(msg.peer, "internal", "the coordinator could not handle this message (see its log)")

    async def _handle(self, msg: Incoming) -> None:
        silo_id = None
        if self.enrolment is not None:
            # Checked on every message, not only at connect: a silo removed since keeps no session.
            silo_id = self.enrolment.name_of(msg.public_key) if msg.public_key else None
            if silo_id is None:
                await self.error(msg.peer, "not_enrolled", "this silo's key is not enrolled (any more)")
                return
        size = sum(len(f) for f in msg.frames)
        if size > self.message_limit:  # before any decoding of the payload
            if silo_id is None:
                silo_id = _plaintext_sender(msg.frames[0])  # plaintext (tests only): the header's word
            sender = self.coord.silos.get(silo_id) if silo_id else None
            if sender is not None and sender.peer == msg.peer:
                sender.last_seen = time.time()  # it is alive; its answer is refused, not lost
            rs = self.coord.current
            if silo_id is not None and rs is not None and silo_id in rs.selected and silo_id not in rs.answered:
                rs.rejected.setdefault(silo_id, "oversized")
                rs.changed.set()
            await self.error(
                msg.peer,
                "oversized",
                f"a message of {size} bytes exceeds this coordinator's limit of "
                f"{self.message_limit} bytes (federation.max_message_bytes)",
            )
            return
        try:
            header = wire.decode_header(msg.frames)
        except ProtocolError as exc:
            rs = self.coord.current
            if silo_id is not None and rs is not None and silo_id in rs.selected and silo_id not in rs.answered:
                rs.rejected.setdefault(silo_id, "malformed")  # an authenticated silo's broken answer ends its wait
                rs.changed.set()
            await self.error(msg.peer, "malformed", str(exc))
            return
        if silo_id is None:
            silo_id = header.silo_id  # plaintext (tests only): the header's word
        if not silo_id:
            await self.error(msg.peer, "unknown_silo", "message without a silo id", header.round_id)
            return
        silo = self.coord.silos.get(silo_id)
        known = silo is not None and silo.peer == msg.peer
        if silo is None:
            silo = self.coord.silos[silo_id] = SiloInfo(silo_id, msg.peer, time.time())
        silo.peer, silo.last_seen = msg.peer, time.time()
        if (
            self.coord.current is not None
            and self.coord.current.train_window is not None
            and acknowledges(header, self.coord.current.round_id)
        ):
            self.coord.current.train_window.release(
                silo_id
            )  # its TRAIN arrived (or it answered, or left): next one may go
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
            code = (
                code if code in ERROR_CODES else "silo_error"
            )  # a code only: the silo's own text stays out of records
            if code == "silo_policy":  # the silo's own settings refused the task: say which, so the operator can act
                logger.error(
                    "silo %s refused round %d by its own policy: %r",
                    silo_id,
                    header.round_id,
                    str(header.body.get("message", ""))[:300],
                )
            else:
                logger.warning("silo %s reported an error: %s", silo_id, code)
            rs = self.coord.current
            if rs and silo_id in rs.selected and header.round_id == rs.round_id and silo_id not in rs.answered:
                rs.rejected.setdefault(silo_id, code)
                rs.changed.set()
        else:
            await self.error(
                msg.peer, "unexpected", f"a coordinator does not accept {header.type.value}", header.round_id
            )
        if not known and header.type in (MsgType.UPDATE, MsgType.SECAGG, MsgType.ERROR):
            # Back on a new connection with an older message first (an update queued while its link was cut): that
            # is its return, as a heartbeat from a new connection would be, so it picks up the current round.
            await self._welcome(silo)

    async def _echo(self, silo: SiloInfo, header: Header) -> None:
        """Answer a silo's HEARTBEAT: it learns the coordinator is alive, and the offset of the clocks
        (fedllm.federation.runtime.timing)."""
        sent_at = header.body.get("sent_at")
        if sent_at is not None:
            await self.send(
                silo.peer,
                make_header(
                    MsgType.HEARTBEAT,
                    Heartbeat(echo=sent_at, sent_at=time.time()),
                    run=self.cfg.run_name,
                    round_id=self.coord.round,
                    silo_id=silo.id,
                ),
            )

    async def _welcome(self, silo: SiloInfo) -> None:
        welcome = Welcome(
            rounds_total=self.cfg.rounds,
            strategy=self.coord.strategy.name,
            heartbeat_interval_s=self.cfg.heartbeat_interval_s,
        )
        await self.send(
            silo.peer,
            make_header(MsgType.WELCOME, welcome, run=self.cfg.run_name, round_id=self.coord.round, silo_id=silo.id),
        )
        logger.info("silo %s is online", silo.id)
        rs = self.coord.current
        if rs is not None and rs.rejected.get(silo.id) == "unreachable":
            del rs.rejected[silo.id]  # its connection dropped as TRAIN went out; it is back, so it gets TRAIN again
        if (
            rs is not None
            and silo.id not in rs.answered
            and silo.id not in rs.rejected
            and time.time() < rs.deadline_of(silo.id)
            and (rs.secure is None or rs.secure.step == "advertise")
        ):
            rs.selected.add(silo.id)  # a silo that (re)connects mid-round picks up the current round
            await self.coord.rounds.send_train(rs, silo)

    async def _on_update(self, silo: SiloInfo, header: Header, frames: list[bytes], received_at: float) -> None:
        rs = self.coord.current
        size = sum(len(f) for f in frames)
        if rs is None or header.round_id != rs.round_id:
            await self.error(
                silo.peer,
                "stale_round",
                f"update for round {header.round_id}, current round is {rs.round_id if rs else 'none'}",
                header.round_id,
            )
            return
        rs.bytes_in += size
        refusal = self._refuse_update(silo.id, header, rs)
        if refusal is not None:  # not this silo's answer to this round: its first answer (if any) stands
            await self.error(silo.peer, *refusal, header.round_id)
            return
        checked = self._check_update(silo.id, header, frames, rs)
        if isinstance(checked, tuple):
            code, message = checked
            rs.rejected[silo.id] = code
            rs.changed.set()
            await self.error(silo.peer, code, message, header.round_id)
            return
        body = UpdateResult.model_validate(header.body)
        rs.updates[silo.id] = checked
        rs.answered[silo.id] = {
            "num_examples": body.num_examples,
            "metrics": body.metrics,
            "train_s": body.train_s,
            "bytes": size,
        }
        self._note_timings(rs, silo, body, received_at, size)
        silo.rounds += 1
        silo.examples += body.num_examples
        rs.changed.set()
        logger.info(
            "round %d: accepted the update of %s (%d examples, %d bytes)", rs.round_id, silo.id, body.num_examples, size
        )

    def _note_timings(self, rs: RoundState, silo: SiloInfo, body: UpdateResult, received_at: float, size: int) -> None:
        """The silo's download/train/upload of this round (fedllm.federation.runtime.timing), and its link's throughput
        for the transfer allowance of its next deadlines."""
        from fedllm.federation.runtime.timing import silo_timings, throughput_bps

        sent = rs.train_sent.get(silo.id)
        if sent is None:
            return
        t = silo_timings(
            train_sent=sent,
            update_received=received_at,
            train_received=body.received_at,
            update_sent=body.sent_at,
            train_s=body.train_s,
            offset_s=body.clock_offset_s,
            bytes_down=rs.bytes_down.get(silo.id, 0),
            bytes_up=size,
        )
        rs.timings[silo.id] = t
        silo.last_update_bytes = size
        if t["download_s"] is not None:
            silo.down_bps = throughput_bps(t["bytes_down"], t["download_s"])
            silo.up_bps = throughput_bps(size, t["upload_s"])

    async def _on_secagg(self, silo: SiloInfo, header: Header, frames: list[bytes]) -> None:
        rs = self.coord.current
        if rs is None or rs.secure is None or header.round_id != rs.round_id:
            await self.error(
                silo.peer,
                "stale_round",
                f"secure-aggregation message for round {header.round_id}, no secure round {header.round_id} is running",
                header.round_id,
            )
            return
        size = sum(len(f) for f in frames)
        rs.bytes_in += size
        limit = rs.secure.payload_limit()
        if header.payload_bytes > limit:  # before decoding: a masked vector is one word per adapter weight
            if silo.id in rs.secure.expected and silo.id not in rs.secure.answers[rs.secure.step]:
                rs.rejected.setdefault(silo.id, "oversized")
            rs.changed.set()
            await self.error(
                silo.peer,
                "oversized",
                f"a secure-aggregation payload of {header.payload_bytes} bytes "
                f"exceeds the {limit}-byte bound for this adapter",
                header.round_id,
            )
            return
        try:
            rs.secure.handle(silo.id, header, wire.decode_payload(header, frames), size)
        except ProtocolError as exc:
            code = getattr(exc, "code", "secagg")
            if (
                code != "duplicate"
                and silo.id in rs.secure.expected
                and silo.id not in rs.secure.answers[rs.secure.step]
            ):
                rs.rejected.setdefault(silo.id, code)  # a repeated step leaves the silo's first answers alone
            rs.changed.set()
            await self.error(silo.peer, code, str(exc), header.round_id)

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

        from fedllm.federation.wire.protocol import Hello

        try:
            hello = Hello.model_validate(body)
        except ValidationError as exc:
            logger.warning("silo %s: ignoring a malformed HELLO body: %s", silo.id, exc)
            return
        silo.lora_r, silo.lora_alpha = hello.lora_r, hello.lora_alpha
        silo.acks_train = hello.acks_train

    def _check_update(
        self, silo_id: str, header: Header, frames: list[bytes], rs: RoundState
    ) -> StateDict | tuple[str, str]:
        """The update, decoded (to the global adapter's shapes only) and checked; or (code, message) refusing it."""
        from fedllm.federation.aggregation.aggregate import InvalidUpdate, check_update, global_norm

        reference = rs.sent.get(silo_id, rs.global_state)  # the adapter this silo was sent (its own rank)
        limit = 3 * sum(t.numel() * 4 for t in reference.values()) + (1 << 20)
        if header.payload_bytes > limit:
            return (
                "oversized",
                f"payload of {header.payload_bytes} bytes exceeds the {limit}-byte bound for this adapter",
            )
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
            return (
                "bad_shape",
                f"tensor {wrong!r} is declared {declared[wrong]}, the global adapter has {shapes[wrong]}",
            )
        try:
            update = decode_payload(header, frames, expected_shapes=shapes)
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

    async def _watch_enrolment(self, interval_s: float = 0.5) -> None:
        """Drop, within `interval_s`, the session of a silo whose enrolment was removed
        (`appliance federation remove`)."""
        while True:
            await asyncio.sleep(interval_s)
            if self.enrolment is None:  # plaintext (tests only): no enrolment to watch
                return
            enrolled = self.enrolment.names()
            for silo in list(self.coord.silos.values()):
                if silo.id not in enrolled and silo.peer:
                    await self._drop_silo(silo)

    async def _drop_silo(self, silo: SiloInfo) -> None:
        logger.warning("silo %s was removed from the enrolment: dropping its session", silo.id)
        await self.send(
            silo.peer, make_header(MsgType.BYE, Bye(reason="removed"), run=self.cfg.run_name, round_id=self.coord.round)
        )
        silo.peer, silo.last_seen = b"", 0.0
        rs = self.coord.current
        if rs is not None and silo.id in rs.selected and silo.id not in rs.answered:
            rs.rejected.setdefault(silo.id, "not_enrolled")
            rs.updates.pop(silo.id, None)
            rs.changed.set()
        elif rs is not None and rs.secure is None and silo.id in rs.answered:
            self.coord.rounds.forget_answer(
                rs, silo.id
            )  # its update is not aggregated yet (`_accumulate`): it leaves with it


def _plaintext_sender(frame: bytes) -> str | None:
    """The silo id a plaintext header claims (its frame alone, at most protocol.MAX_HEADER_BYTES); None if
    unreadable."""
    from fedllm.federation.wire.protocol import HeaderError, load_header

    try:
        return load_header(frame).silo_id or None
    except HeaderError:
        return None
