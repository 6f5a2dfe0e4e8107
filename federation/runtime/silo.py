"""The silo agent: connects out to the coordinator, trains each round it is given, sends back only the delta.

`SiloClient(settings, trainer)` works with any `SiloTrainer` (get/set the adapter state, fit, evaluate). The
built-in `EngineTrainer` trains with the appliance's engine (`train.fit_adapter`); `examples/custom_trainer.py`
shows a user's own HF Trainer + peft loop behind the same interface. The private data never leaves the trainer:
an UPDATE carries the adapter delta (`local - global`), its example count and scalar metrics, nothing else.
"""

from __future__ import annotations

import asyncio
import logging
import math
import socket
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, Sequence, runtime_checkable

from fedllm.core.errors import ConfigError, ProtocolError
from fedllm.core.types import StateDict
from fedllm.federation.aggregation.bounds import SILO_MAX_MESSAGE_BYTES
from fedllm.federation.runtime.timing import ClockOffset, connection_timeout
from fedllm.federation.wire import frames as wire
from fedllm.federation.wire.keys import load_keypair
from fedllm.federation.wire.payload import EncodedPayload, decode_payload, encode_payload
from fedllm.federation.wire.protocol import (
    Bye,
    ErrorInfo,
    Heartbeat,
    Hello,
    MsgType,
    SecAggStep,
    TrainTask,
    UpdateResult,
    make_header,
)
from fedllm.federation.wire.transport import ClientTransport, check_plaintext_endpoint

if TYPE_CHECKING:
    from fedllm.core.sections import TrainSettings
    from fedllm.core.settings import ApplianceSettings

logger = logging.getLogger(__name__)


@runtime_checkable
class SiloTrainer(Protocol):
    """What a silo needs from a training loop. Keys are the adapter-name-free peft state-dict keys.

    A trainer may subclass this protocol to take the defaults of its attributes (None: the global adapter's LoRA
    shape); `SiloClient` refuses an object that does not offer every member.
    """

    lora_r: int | None = None
    """The LoRA rank this trainer trains at, announced in HELLO (product aggregation then sends the global adapter
    projected to it); None: the global adapter's rank."""

    lora_alpha: float | None = None
    """This trainer's LoRA alpha (its scale is `lora_alpha / lora_r`), announced with `lora_r`; None: unknown."""

    def get_state(self) -> StateDict:
        """The current adapter weights."""

    def set_state(self, state: StateDict) -> None:
        """Load adapter weights (the round's global adapter)."""

    def fit(self, steps: int, config: dict[str, Any]) -> tuple[int, dict[str, float]]:
        """Train `steps` optimizer steps from the current state; returns (examples seen or held, scalar metrics).

        `config` is the strategy's round plan, e.g. `{"prox_mu": 0.01}` for FedProx.
        """

    def evaluate(self) -> dict[str, float]:
        """Metrics of the current state on local held-out data (may be empty)."""


def state_delta(local: StateDict, base: StateDict) -> StateDict:
    """`local - base` in float32, key by key (the update a silo sends).

    Raises:
        ConfigError: the trainer's state has other keys than the global adapter.
    """
    if local.keys() != base.keys():
        missing, extra = sorted(base.keys() - local.keys()), sorted(local.keys() - base.keys())
        raise ConfigError(
            f"trainer state keys differ from the global adapter: missing {missing[:3]}, extra {extra[:3]}"
        )
    return {k: local[k].detach().float().cpu() - base[k].detach().float().cpu() for k in base}


class SiloClient:
    """A silo: `await start()`, then it trains every round the coordinator sends until `stop()` or the run ends.

    Args:
        settings: appliance settings (`federation.coordinator`, `federation.coordinator_key`, `silo_id`, keys dir).
        trainer: the local training loop.
        keypair: this silo's CURVE key pair; default: the one in `keys/federation/` (`appliance silo keygen`).
    """

    def __init__(self, settings: "ApplianceSettings", trainer: SiloTrainer, *, keypair=None) -> None:
        self.settings, self.cfg, self.trainer = settings, settings.federation, trainer
        if not isinstance(trainer, SiloTrainer):
            missing = [
                m
                for m in ("get_state", "set_state", "fit", "evaluate", "lora_r", "lora_alpha")
                if not hasattr(trainer, m)
            ]
            raise ConfigError(
                f"the silo's trainer {type(trainer).__name__} is not a fedllm.federation.runtime.silo.SiloTrainer: "
                "it lacks "
                f"{', '.join(missing)} (subclass SiloTrainer for the defaults of lora_r and lora_alpha)"
            )
        if not self.cfg.coordinator:
            raise ConfigError("a silo needs federation.coordinator (--coordinator tcp://HOST:PORT)")
        self.silo_id = self.cfg.silo_id or socket.gethostname()
        check_plaintext_endpoint(self.cfg.coordinator, self.cfg.plaintext, "connect to")
        if not self.cfg.plaintext and keypair is None:
            keypair = load_keypair(settings.keys_dir, "silo")
            if keypair is None:
                raise ConfigError(
                    "no silo key pair: run `appliance silo keygen` and have the coordinator enroll the public key"
                )
        self._keypair = keypair
        self._transport: ClientTransport | None = None
        self._tasks: list[asyncio.Task] = []
        self._ef_state: dict = {}  # top-k error feedback, kept across rounds (codec updates it in place)
        self.rounds_done: list[int] = []
        self.last_error: dict[str, Any] | None = None
        self.welcomed = asyncio.Event()
        self.finished = asyncio.Event()  # the run is over for this silo: done, refused or removed (see `refused`)
        self.refused: str | None = None  # why the coordinator will not talk to this silo (names the key and the fix)
        self.sent_frames: list[bytes] = []  # the last UPDATE's frames, for inspection (tests, audits)
        self._sent_for: tuple[str, int] | None = None  # (run, round) of `sent_frames`
        self._secure: dict[int, dict[str, Any]] = {}  # round -> {"client", "delta", "num_examples", "run", "silo_id"}
        self.secure_masked_update: StateDict = {}  # the last weighted delta this silo masked (tests, audits)
        self._clock = ClockOffset()  # coordinator clock - ours, from HEARTBEAT echoes (round timings)
        self._quiet_since = time.monotonic()  # when the coordinator's last message arrived
        self._inbox: asyncio.Queue[tuple[float, list[bytes]]] = asyncio.Queue()  # (arrival time, frames), for `_loop`
        self._last_round: int | None = None  # set once this silo had the TRAIN of the run's last round
        self.ended_by_silence = False  # finished because the coordinator fell silent after the last round (BYE lost)
        self.policy_refusals: list[str] = []  # why this silo's own policy refused TRAINs (federation.silo_require_*)

    @property
    def address(self) -> str:
        """The coordinator endpoint this silo connects to."""
        if not self.cfg.coordinator:
            raise ConfigError("a silo needs federation.coordinator (--coordinator tcp://HOST:PORT)")
        return self.cfg.coordinator

    @property
    def _connection(self) -> ClientTransport:
        """The transport to the coordinator (`start` opens it, `stop` closes it)."""
        if self._transport is None:
            raise RuntimeError(f"silo {self.silo_id} is not connected: call start() first (or it was stopped)")
        return self._transport

    async def start(self) -> None:
        """Connect (outbound only), say HELLO, start heartbeats and the message loop."""
        self._transport = ClientTransport(
            self.address,
            server_key=None if self.cfg.plaintext else self.cfg.coordinator_key,
            keypair=self._keypair,
            plaintext=self.cfg.plaintext,
            max_message_bytes=self.cfg.max_message_bytes or SILO_MAX_MESSAGE_BYTES,
            heartbeat_s=self.cfg.heartbeat_interval_s,
            heartbeat_timeout_s=connection_timeout(self.cfg),
        )
        self._transport.connect()
        hello = Hello(lora_r=self.trainer.lora_r, lora_alpha=self.trainer.lora_alpha, acks_train=True)
        await self._send(make_header(MsgType.HELLO, hello, silo_id=self.silo_id))
        self._tasks = [
            asyncio.create_task(self._read(), name=f"silo-{self.silo_id}-read"),
            asyncio.create_task(self._loop(), name=f"silo-{self.silo_id}"),
            asyncio.create_task(self._heartbeats(), name=f"silo-{self.silo_id}-heartbeat"),
            asyncio.create_task(self._watch_refusal(), name=f"silo-{self.silo_id}-handshake"),
            asyncio.create_task(self._watch_end(), name=f"silo-{self.silo_id}-end"),
        ]

    async def _watch_end(self) -> None:
        """Stop once the run is over though its BYE never came: this silo had the last round's TRAIN, and the
        coordinator (which answers every heartbeat) has been silent for `end_silence_s`. Silence before the last round
        never ends a silo: a restarted coordinator resumes, and the silo reconnects."""
        while not self.finished.is_set():
            await asyncio.sleep(min(1.0, self.cfg.end_silence_s / 4))
            silent_s = time.monotonic() - self._quiet_since
            if self._last_round is not None and silent_s >= self.cfg.end_silence_s:
                logger.warning(
                    "silo %s: no word from the coordinator for %.0f s in or after its last round (%d): the run is "
                    "over and its BYE was lost; stopping",
                    self.silo_id,
                    silent_s,
                    self._last_round,
                )
                self.ended_by_silence = True
                self.finished.set()

    async def _watch_refusal(self) -> None:
        what = await self._connection.wait_refused()
        self._refuse(
            f"the coordinator at {self.cfg.coordinator} refused this silo's key ({what}). Its public key is "
            f"{self._keypair.public}; ask the coordinator's operator to run "
            f"`appliance federation enroll {self.silo_id} {self._keypair.public}`"
        )

    def _refuse(self, reason: str) -> None:
        if self.refused is None:
            self.refused = reason
            logger.error("silo %s: %s", self.silo_id, reason)
        self.finished.set()

    async def wait_finished(self, timeout_s: float | None = None) -> None:
        """Wait until the coordinator says the run is done."""
        await asyncio.wait_for(self.finished.wait(), timeout_s)

    async def stop(self, say_bye: bool = True) -> None:
        """Leave (BYE unless `say_bye` is False, as a crash would) and close the socket."""
        if self._transport is not None and say_bye:
            try:  # a DEALER with no live connection blocks on send; do not hang on the way out
                await asyncio.wait_for(
                    self._send(make_header(MsgType.BYE, Bye(reason="stopping"), silo_id=self.silo_id)), 1.0
                )
            except asyncio.TimeoutError:
                logger.info("silo %s: coordinator unreachable, left without BYE", self.silo_id)
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            try:
                await t
            except (asyncio.CancelledError, Exception):  # each task logs its own failure
                pass
        self._tasks = []
        if self._transport is not None:
            self._transport.close()
            self._transport = None

    async def _send(
        self, header, payload: EncodedPayload | None = None, *, tensors: StateDict | None = None
    ) -> list[bytes]:
        """Send a message: an encoded adapter `payload`, or raw `tensors` (secure aggregation's masked vectors)."""
        frames = payload.frames(header) if payload is not None else wire.encode(header, tensors)
        await self._connection.send(frames)
        return frames

    async def _heartbeats(self) -> None:
        while True:
            await asyncio.sleep(self.cfg.heartbeat_interval_s)
            await self._send(self._heartbeat())

    def _heartbeat(self):
        return make_header(MsgType.HEARTBEAT, Heartbeat(sent_at=time.time()), silo_id=self.silo_id)

    async def _read(self) -> None:
        """Take each message off the socket as it arrives, also while `_loop` trains: its arrival time is then true
        (round timings), heartbeat echoes are timed at once (clock offset), and the coordinator's silence is known."""
        while True:
            frames = await self._connection.recv()
            assert frames is not None  # recv() without a timeout waits for a message, it never returns None
            received_at = time.time()
            self._quiet_since = time.monotonic()
            kind = _peek_type(frames)
            if kind == MsgType.HEARTBEAT:
                self._on_echo(wire.decode_header(frames).body, received_at)
            else:
                self._inbox.put_nowait((received_at, frames))
            if kind == MsgType.TRAIN:  # acknowledged at once: the coordinator's TRAIN window (federation.train_window)
                await self._ack_train(frames)

    async def _ack_train(self, frames: list[bytes]) -> None:
        try:
            round_id = wire.decode_header(frames).round_id
        except ProtocolError:
            return  # `_dispatch` logs the malformed message
        await self._send(
            make_header(MsgType.HEARTBEAT, Heartbeat(sent_at=time.time(), got_train=round_id), silo_id=self.silo_id)
        )

    def _on_echo(self, body: dict[str, Any], received_at: float) -> None:
        echo, remote = body.get("echo"), body.get("sent_at")
        if isinstance(echo, (int, float)) and isinstance(remote, (int, float)):
            self._clock.add(echo, remote, received_at)

    async def _loop(self) -> None:
        while True:
            batch = [await self._inbox.get()]
            while not self._inbox.empty():
                batch.append(self._inbox.get_nowait())
            await self._dispatch_batch(batch)

    async def _dispatch_batch(self, batch: list[tuple[float, list[bytes]]]) -> None:
        # TRAINs that queued up while we trained (e.g. a restarted coordinator): only the newest matters.
        trains = [f for _, f in batch if _peek_type(f) == MsgType.TRAIN]
        for received_at, frames in batch:
            if trains and frames is not trains[-1] and _peek_type(frames) == MsgType.TRAIN:
                logger.info("silo %s: skipping a superseded TRAIN", self.silo_id)
                continue
            try:
                await self._dispatch(frames, received_at)
            except Exception as exc:  # service boundary: report and keep serving
                logger.error("silo %s failed to handle a message: %s", self.silo_id, exc, exc_info=True)
                await self._send(make_header(MsgType.ERROR, ErrorInfo(code="silo_failure"), silo_id=self.silo_id))

    async def _dispatch(self, frames: list[bytes], received_at: float) -> None:
        try:
            header = wire.decode_header(frames)
        except ProtocolError as exc:
            logger.warning("silo %s dropped a malformed message: %s", self.silo_id, exc)
            return
        if header.type == MsgType.WELCOME:
            logger.info("silo %s joined run %s (round %d)", self.silo_id, header.run, header.round_id)
            self.welcomed.set()
            # A heartbeat now, on a connection known to be up, gives a clean clock-offset sample before round 1's
            # UPDATE (one queued before the connection was up would count its handshake as one-way delay).
            await self._send(self._heartbeat())
        elif header.type == MsgType.TRAIN:
            await self._train(header, frames, received_at)
        elif header.type == MsgType.ERROR:
            self.last_error = {"round": header.round_id, **header.body}
            logger.warning("coordinator refused our message (round %d): %s", header.round_id, header.body)
            if header.body.get("code") == "not_enrolled":
                self._refuse(
                    f"the coordinator no longer accepts this silo's key {self._keypair.public if self._keypair else ''}"
                    f" (not enrolled); ask its operator to enroll it again"
                )
        elif header.type == MsgType.BYE:
            logger.info("coordinator said BYE: %s", header.body.get("reason", ""))
            if header.body.get("reason") == "done":
                self.finished.set()
            elif header.body.get("reason") == "removed":
                self._refuse(f"the coordinator removed silo {self.silo_id} from its enrolment")
        elif header.type == MsgType.SECAGG:
            await self._secagg(header, frames)
        elif header.type == MsgType.HEARTBEAT:  # echoes are handled as they arrive (`_read`)
            self._on_echo(header.body, received_at)

    async def _train(self, header, frames: list[bytes], received_at: float) -> None:
        if self._sent_for == (header.run, header.round_id) and self.sent_frames:
            # The coordinator sends a round's TRAIN again when this silo reconnects without having answered: the
            # connection broke, maybe with our UPDATE in flight. Resend it rather than train the round again (the
            # coordinator refuses a second copy as a duplicate, so it is never counted twice).
            logger.info(
                "silo %s: round %d asked again after a reconnect; resending its update", self.silo_id, header.round_id
            )
            await self._connection.send(self.sent_frames)
            return
        task = TrainTask.model_validate(header.body)
        if task.rounds_total and header.round_id >= task.rounds_total:
            self._last_round = header.round_id
        refusal = policy_refusal(self.cfg, task)
        if refusal is not None:  # before training: nothing is computed, nothing leaves this silo
            logger.error("silo %s: refused round %d: %s", self.silo_id, header.round_id, refusal)
            self.policy_refusals.append(refusal)
            await self._send(
                make_header(
                    MsgType.ERROR,
                    ErrorInfo(code="silo_policy", message=refusal),
                    run=header.run,
                    round_id=header.round_id,
                    silo_id=self.silo_id,
                )
            )
            return
        global_state = decode_payload(header, frames)
        logger.info("silo %s: round %d, %d local steps", self.silo_id, header.round_id, task.local_steps)
        started = time.monotonic()
        try:
            num_examples, metrics, delta = await asyncio.to_thread(self._fit, global_state, task)
        except Exception as exc:  # tell the coordinator now, so the round need not wait for its deadline
            logger.error("silo %s: training for round %d failed: %s", self.silo_id, header.round_id, exc, exc_info=True)
            await self._send(
                make_header(
                    MsgType.ERROR,
                    ErrorInfo(code="train_failed"),
                    run=header.run,
                    round_id=header.round_id,
                    silo_id=self.silo_id,
                )
            )
            return
        train_s = time.monotonic() - started
        if task.dp_clip_norm is not None:
            delta = _privatise(delta, task.dp_clip_norm, task.dp_noise_multiplier)
        if task.secure_aggregation is not None:
            await self._secure_advertise(header, task, num_examples, metrics, delta, train_s)
            return
        payload = encode_payload(delta, task.compression, residual=self._ef_state)
        rtt, offset = self._clock.best or (None, None)
        body = UpdateResult(
            num_examples=num_examples,
            metrics=_scalars(metrics),
            encoding=payload.meta,
            train_s=train_s,
            received_at=received_at,
            sent_at=time.time(),
            clock_offset_s=offset,
            clock_rtt_s=rtt,
        )
        self.sent_frames = await self._send(
            make_header(MsgType.UPDATE, body, run=header.run, round_id=header.round_id, silo_id=self.silo_id), payload
        )
        self._sent_for = (header.run, header.round_id)
        self.rounds_done.append(header.round_id)
        logger.info(
            "silo %s: round %d update sent (%d examples, %.1f s training)",
            self.silo_id,
            header.round_id,
            num_examples,
            train_s,
        )

    # ------------------------------------------------------------------ secure aggregation (federation/secure_round.py)
    async def _secure_advertise(
        self, header, task: TrainTask, num_examples: int, metrics: dict[str, Any], delta: StateDict, train_s: float
    ) -> None:
        """After training in a secure round: keep the delta here and advertise this round's public keys."""
        from fedllm.federation.aggregation.secagg import SecAggClient, SecAggConfig

        assert task.secure_aggregation is not None  # `_train` calls this only for a secure round
        silo_id = header.silo_id or self.silo_id  # the name the coordinator knows this silo by
        client = SecAggClient(silo_id, SecAggConfig(**task.secure_aggregation))
        self._secure = {
            header.round_id: {
                "client": client,
                "delta": delta,
                "num_examples": num_examples,
                "run": header.run,
                "silo_id": silo_id,
            }
        }  # older rounds are abandoned
        from fedllm.federation.aggregation.strategies import global_norm

        data = {
            **client.advertise(),
            "num_examples": num_examples,
            "metrics": _scalars(metrics),
            "train_s": train_s,
            "update_norm": global_norm(delta),
        }
        data.pop("silo_id", None)
        await self._send_step(header.round_id, "advertise", data)
        logger.info(
            "silo %s: round %d trained (%d examples), secure aggregation keys sent",
            self.silo_id,
            header.round_id,
            num_examples,
        )

    async def _send_step(
        self, round_id: int, step: str, data: dict[str, Any], tensors: StateDict | None = None
    ) -> None:
        st = self._secure[round_id]
        await self._send(
            make_header(
                MsgType.SECAGG,
                SecAggStep(step=step, data=data),
                run=st["run"],
                round_id=round_id,
                silo_id=st["silo_id"],
            ),
            tensors=tensors,
        )

    async def _secagg(self, header, frames: list[bytes]) -> None:
        """One coordinator step of a secure round: roster -> share_keys, shares -> masked, survivors -> unmask."""
        body = SecAggStep.model_validate(header.body)
        st = self._secure.get(header.round_id)
        if st is None:
            logger.warning(
                "silo %s: secure-aggregation step %s for round %d, which this silo is not in",
                self.silo_id,
                body.step,
                header.round_id,
            )
            return
        try:
            await self._secagg_step(header.round_id, st, body)
        except (ProtocolError, KeyError, TypeError, ValueError) as exc:
            logger.error(
                "silo %s: secure aggregation step %s of round %d failed: %s",
                self.silo_id,
                body.step,
                header.round_id,
                exc,
            )
            self._secure.pop(header.round_id, None)
            await self._send(
                make_header(
                    MsgType.ERROR,
                    ErrorInfo(code="secagg_failed"),
                    run=header.run,
                    round_id=header.round_id,
                    silo_id=self.silo_id,
                )
            )

    async def _secagg_step(self, round_id: int, st: dict[str, Any], body: SecAggStep) -> None:
        client = st["client"]
        if body.step == "roster":
            # Pre-scale by this silo's share of the round: the unmasked sum is then the weighted mean (see
            # secure_round). First clip to the round's norm bound (the coordinator cannot clip a masked update: this is
            # the enforcement).
            weight = float(body.data["weight"])
            if not 0 < weight <= 1:
                raise ProtocolError(f"a secure round's weight must be in (0, 1], got {weight}")
            bound = body.data.get("norm_bound")
            if bound is not None:
                from fedllm.federation.aggregation.strategies import clip_update

                if not (isinstance(bound, (int, float)) and math.isfinite(bound) and bound > 0):
                    raise ProtocolError(f"a secure round's norm bound must be a finite number > 0, got {bound!r}")
                st["delta"], norm = clip_update(st["delta"], float(bound))
                if norm > bound:
                    logger.info(
                        "silo %s: round %d update clipped from L2 norm %.4g to the round's bound %.4g",
                        self.silo_id,
                        round_id,
                        norm,
                        bound,
                    )
            st["delta"] = {k: v * weight for k, v in st["delta"].items()}
            await self._send_step(round_id, "share_keys", {"ciphertexts": client.share_keys(body.data["roster"])})
        elif body.step == "shares":
            from fedllm.federation.aggregation.secure_round import masked_tensor

            masked = await asyncio.to_thread(client.mask, body.data["ciphertexts"], st["delta"])
            self.secure_masked_update = st["delta"]
            await self._send_step(round_id, "masked", {}, {"masked": masked_tensor(masked, client.config.bits)})
        elif body.step == "survivors":
            await self._send_step(round_id, "unmask", {"shares": client.unmask(body.data["survivors"])})
            self._secure.pop(round_id, None)
            self.rounds_done.append(round_id)
            logger.info("silo %s: round %d secure aggregation done", self.silo_id, round_id)
        else:
            raise ProtocolError(f"a silo does not handle the secure-aggregation step {body.step!r}")

    def _fit(self, global_state: StateDict, task: TrainTask) -> tuple[int, dict[str, float], StateDict]:
        from fedllm.federation.publishing.heldout import received_metrics

        self.trainer.set_state({k: v.clone() for k, v in global_state.items()})
        received = received_metrics(self.trainer)  # its held-out loss of the global it received (the promotion gate)
        num_examples, metrics = self.trainer.fit(task.local_steps, dict(task.config))
        return num_examples, {**metrics, **received}, state_delta(self.trainer.get_state(), global_state)


def policy_refusal(cfg: Any, task: TrainTask) -> str | None:
    """Why this silo's own settings refuse `task` (`federation.silo_require_dp`, `silo_min_noise_multiplier`,
    `silo_max_clip_norm`, `silo_require_secagg`), or None when it may train."""
    if cfg.silo_require_secagg and task.secure_aggregation is None:
        return (
            "this silo requires secure aggregation (federation.silo_require_secagg) and the TRAIN did not ask for "
            "it: its update would reach the coordinator in clear"
        )
    if cfg.silo_require_dp:
        if task.dp_clip_norm is None:
            return (
                "this silo requires silo-side differential privacy (federation.silo_require_dp) and the TRAIN did "
                "not ask for it (the coordinator must run with federation.dp_mode=silo)"
            )
        if task.dp_noise_multiplier < cfg.silo_min_noise_multiplier:
            return (
                f"this silo requires a DP noise multiplier of at least {cfg.silo_min_noise_multiplier} "
                f"(federation.silo_min_noise_multiplier); the TRAIN asked for {task.dp_noise_multiplier}"
            )
        if cfg.silo_max_clip_norm is not None and task.dp_clip_norm > cfg.silo_max_clip_norm:
            return (
                f"this silo accepts a DP clip norm of at most {cfg.silo_max_clip_norm} "
                f"(federation.silo_max_clip_norm); the TRAIN asked for {task.dp_clip_norm}"
            )
    return None


def _privatise(delta: StateDict, clip_norm: float, noise_multiplier: float) -> StateDict:
    """Silo-side DP: clip the update to `clip_norm`, add Gaussian noise of std `noise_multiplier * clip_norm`."""
    import os

    import torch

    from fedllm.federation.aggregation import privacy

    generator = torch.Generator().manual_seed(int.from_bytes(os.urandom(8), "little") >> 1)
    return privacy.privatize_update(delta, clip_norm, noise_multiplier, generator)


def _peek_type(frames: list[bytes]) -> MsgType | None:
    try:
        return wire.decode_header(frames).type
    except ProtocolError:
        return None


def _scalars(metrics: dict[str, Any]) -> dict[str, float]:
    """Only finite numbers travel as metrics (never text that could leak data)."""
    out: dict[str, float] = {}
    for k, v in metrics.items():
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v)):
            out[str(k)[:64]] = float(v)
    return out


class EngineTrainer(SiloTrainer):
    """`SiloTrainer` on the appliance's training engine (a `train.Trainer` / `train.evaluate_adapter`).

    Args:
        cfg: training settings (LoRA shape, lr, batch, sequence length; `max_steps` is set per round).
        model_dir: the prepared base model folder.
        data: training JSONL path or rows (never leaves this process).
        eval_data: optional held-out JSONL path or rows; evaluated after each round's training.
        run_dir: optional folder for the engine's run files.

    `lora_r` / `lora_alpha` (from `cfg`) are announced to the coordinator: with product aggregation a silo may
    train at its own rank and is sent the global adapter projected to it. A round's config may switch the LR
    schedule, freeze A and keep this silo's optimizer moments from round to round
    (`federation.local_training.train_overrides`; the moments stay in this process, in this silo's `train.Trainer`).

    Fits and evaluations take a process-wide lock: the engine's process group (gloo on CPU) must not run two
    trainings at once, so several silos in one process (demo, tests) train one after the other, and share one kept
    base model (`train.BaseModels`) rather than holding a copy each.
    """

    _engine_lock = threading.Lock()
    _bases: Any = None  # the train.BaseModels the silos of this process share (made by the first fit)

    def __init__(
        self,
        cfg: "TrainSettings",
        model_dir: Path,
        data: Path | Sequence[dict],
        eval_data: Path | Sequence[dict] | None = None,
        run_dir: Path | None = None,
    ) -> None:
        self.cfg, self.model_dir, self.data, self.eval_data, self.run_dir = (
            cfg,
            Path(model_dir),
            data,
            eval_data,
            run_dir,
        )
        self._state: StateDict | None = None
        self.lora_r, self.lora_alpha = cfg.lora_r, float(cfg.lora_alpha)
        self._trainer: Any = None  # this silo's train.Trainer (the base model and its AdamW moments between rounds)

    def get_state(self) -> StateDict:
        if self._state is None:
            from fedllm import train

            self._state = train.initial_adapter_state(self.cfg, self.model_dir)
        return self._state

    def set_state(self, state: StateDict) -> None:
        self._state = state

    def fit(self, steps: int, config: dict[str, Any]) -> tuple[int, dict[str, float]]:
        from fedllm import train

        updates, plan = self.round_overrides(config)
        with self._engine_lock:
            if self._trainer is None:
                if EngineTrainer._bases is None:
                    EngineTrainer._bases = train.BaseModels()
                self._trainer = train.Trainer(self.cfg, self.model_dir, keep_base=True, bases=EngineTrainer._bases)
            self._trainer.cfg = self.cfg  # the silo's settings as they are now (its per-round updates are in the plan)
            result = self._trainer.fit(
                train.TrainPlan(
                    self.data,
                    init_state=self.get_state(),
                    max_steps=steps,
                    run_dir=self.run_dir,
                    eval_data=self.eval_data,
                    settings=updates,
                    **plan,
                )
            )
        self._state = result.state
        return result.num_examples, dict(result.metrics)

    def round_overrides(self, config: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
        """`train_overrides(config)`: the round's train-settings updates and `train.TrainPlan` fields."""
        from fedllm.federation.runtime.local_training import train_overrides

        return train_overrides(config)

    def evaluate(self) -> dict[str, float]:
        if self.eval_data is None:
            return {}
        from fedllm import train

        with self._engine_lock:
            out = train.evaluate_adapter(self.cfg, self.model_dir, self.get_state(), self.eval_data)
        return {k: float(v) for k, v in out.items() if k in ("eval_loss", "perplexity")}
