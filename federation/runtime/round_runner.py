"""The coordinator's rounds: wait for `min_silos`, send each selected silo a TRAIN, collect its answer until every
selected silo answered, went offline, or its deadline passed, then weigh, clip, aggregate and record the round.

A round: each silo's deadline is the round's start + `round_deadline_s` + its transfer allowance (its link's measured
throughput, fedllm.federation.runtime.timing); the accepted updates are weighed by example count, bounded by the count
declared at enrolment and by `max_silo_share`, clipped to the round's norm bound and aggregated with the strategy; the
aggregate is checked (finite, norm bound) before the recorder checkpoints, registers and publishes it.
`MAX_FAILED_ROUNDS` failed rounds in a row fail the run. A secure round (federation.secure_aggregation) runs the steps
of `secure_round`.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from fedllm.core.errors import RoundFailed
from fedllm.core.types import StateDict
from fedllm.federation.aggregation.update_spool import UpdateSpool, open_round_spool
from fedllm.federation.publishing.gate_resume import before_round
from fedllm.federation.publishing.heldout import previous_adapter, received_eval
from fedllm.federation.runtime.local_training import round_schedule
from fedllm.federation.runtime.train_payload import TrainPayloads
from fedllm.federation.runtime.train_window import TrainWindow, train_wait_s
from fedllm.federation.wire.payload import downlink_method
from fedllm.federation.wire.protocol import MsgType, SecAggStep, TrainTask, make_header

if TYPE_CHECKING:
    from fedllm.federation.runtime.coordinator import Coordinator
    from fedllm.federation.runtime.sessions import SiloInfo

logger = logging.getLogger(__name__)

MAX_FAILED_ROUNDS = 3


@dataclass
class RoundState:
    """The round in flight."""

    round_id: int
    selected: set[str]
    acc: Any
    global_state: StateDict
    deadline: float  # the latest of the selected silos' deadlines (each silo has its own: `deadlines`)
    started: float
    deadlines: dict[str, float] = field(
        default_factory=dict
    )  # silo -> its deadline (train allowance + its transfer allowance)
    allowances: dict[str, float] = field(default_factory=dict)  # silo -> its transfer allowance (s)
    train_sent: dict[str, float] = field(default_factory=dict)  # silo -> when its first TRAIN of the round went out
    bytes_down: dict[str, int] = field(default_factory=dict)  # silo -> size of the TRAIN it was sent
    timings: dict[str, dict[str, Any]] = field(
        default_factory=dict
    )  # silo -> fedllm.federation.runtime.timing.silo_timings
    answered: dict[str, dict[str, Any]] = field(default_factory=dict)  # silo -> {"num_examples", "metrics", "train_s"}
    rejected: dict[str, str] = field(default_factory=dict)  # silo -> error code (protocol.ERROR_CODES)
    updates: Any = field(
        default_factory=dict
    )  # silo -> checked float32 update, weighed at the end (an update_spool.UpdateSpool: on disk)
    bytes_in: int = 0
    bytes_out: int = 0
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    secure: Any = None  # a secure_round.SecureRound when federation.secure_aggregation is on
    sent: dict[str, StateDict] = field(default_factory=dict)  # silo -> the adapter it was sent, when not the global one
    shares: dict[str, float] = field(default_factory=dict)  # silo -> its (capped) share of the aggregate
    norm_bound: float | None = (
        None  # the round's update norm bound (fedllm.federation.aggregation.bounds.adaptive_norm_bound)
    )
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


class RoundRunner:
    """Runs the coordinator's rounds (`run`, one task) over its sessions; the recorder keeps what each round made."""

    def __init__(self, coord: Coordinator) -> None:
        self.coord = coord
        self.cfg = coord.cfg

    async def _send_secagg(self, rs: RoundState, silo_id: str, step: str, data: dict[str, Any]) -> bool:
        header = make_header(
            MsgType.SECAGG,
            SecAggStep(step=step, data=data),
            run=self.cfg.run_name,
            round_id=rs.round_id,
            silo_id=silo_id,
        )
        sent = await self.coord.sessions.send(self.coord.silos[silo_id].peer, header)
        rs.bytes_out += sent
        return bool(sent)

    async def _run_secure(self, rs: RoundState) -> None:
        """Steps 1-5 of a secure round; the survivors' mean goes into the strategy's accumulator."""

        def alive(sid: str) -> bool:
            return time.time() - self.coord.silos[sid].last_seen <= self.cfg.silo_timeout_s

        mean, survivors = await rs.secure.run(
            lambda sid, step, data: self._send_secagg(rs, sid, step, data), alive, self._shares, self._secure_bound
        )
        self.coord.secure_inputs = {rs.round_id: dict(rs.secure.received)}  # the last round only: no growth over a run
        rs.norm_bound = rs.secure.norm_bound
        rs.norms = {s: i["update_norm"] for s, i in survivors.items() if i.get("update_norm") is not None}
        for sid, info in sorted(survivors.items()):
            # The secure mean once per survivor: the weighted mean is the secure mean, and the accumulator's count is
            # that of the plain path.
            rs.acc.add(sid, mean, 1.0)
            rs.shares[sid] = rs.secure.weights[sid]
            rs.answered[sid] = info
            self.coord.silos[sid].rounds += 1
            self.coord.silos[sid].examples += info["num_examples"]

    def _state_for(self, rs: RoundState, silo: SiloInfo) -> StateDict:
        """The adapter a silo trains from: the global one, or (product aggregation) its projection to the silo's
        rank."""
        state, scale = self.coord.strategy.state_for_silo(rs.global_state, silo.lora_r, silo.lora_alpha)
        if state is not rs.global_state:
            rs.sent[silo.id] = state
            rs.acc.set_base(silo.id, state, scale)  # a ProductAccumulator
        return state

    def _shares(self, counts: dict[str, int]) -> dict[str, float]:
        """Each silo's share of the round: its claimed count, bounded by the one declared at enrolment, capped at
        `federation.max_silo_share` (`strategies.capped_weights`)."""
        from fedllm.federation.aggregation.aggregate import capped_weights

        bounded = {}
        for sid, n in counts.items():
            declared = (
                self.coord.sessions.enrolment.declared_examples(sid)
                if self.coord.sessions.enrolment is not None
                else None
            )
            bounded[sid] = min(n, declared) if declared is not None else n
        return capped_weights(bounded, self.cfg.max_silo_share)

    def _secure_bound(self, norms: dict[str, float]) -> float | None:
        """A secure round's norm bound, issued with the roster: from the norms the silos advertised."""
        from fedllm.federation.aggregation.bounds import adaptive_norm_bound

        return adaptive_norm_bound(norms, self.cfg)

    def _drop_unenrolled(self, rs: RoundState) -> None:
        """Leave out the answers of silos whose enrolment was removed after they answered (named in `dropped`)."""
        if self.coord.sessions.enrolment is None:
            return
        enrolled = self.coord.sessions.enrolment.names()
        for sid in sorted(set(rs.answered) - enrolled):
            self.forget_answer(rs, sid)

    def forget_answer(self, rs: RoundState, sid: str) -> None:
        if sid in rs.answered and sid not in rs.dropped:
            logger.warning(
                "round %d: silo %s was removed from the enrolment after it answered: its update is dropped",
                rs.round_id,
                sid,
            )
            rs.answered.pop(sid)
            rs.updates.pop(sid, None)
            rs.dropped.append(sid)
            rs.rejected[sid] = "not_enrolled"
            rs.changed.set()

    def _accumulate(self, rs: RoundState) -> None:
        """Clip the round's checked updates to its norm bound (fedllm.federation.aggregation.bounds), then add them to
        the strategy's accumulator with their capped shares: the bound and shares come from the norms and counts noted
        on arrival, and the updates are read back from the spool one at a time
        (fedllm.federation.aggregation.update_spool)."""
        from fedllm.federation.aggregation.bounds import adaptive_norm_bound

        self._drop_unenrolled(rs)
        rs.norms = rs.updates.norms()
        rs.norm_bound = adaptive_norm_bound(rs.norms, self.cfg)
        shares = rs.shares = self._shares({sid: rs.answered[sid]["num_examples"] for sid in rs.updates})
        for sid in sorted(rs.updates):
            update, clipped = rs.updates.load_clipped(sid, rs.norm_bound)
            if clipped is not None:
                rs.clipped[sid] = clipped
                logger.warning(
                    "round %d: the update of %s (L2 norm %.4g) was clipped to the round's bound %.4g",
                    rs.round_id,
                    sid,
                    clipped["norm"],
                    clipped["clipped_to"],
                )
            try:
                rs.acc.add(sid, update, shares[sid])
            except ValueError as exc:  # the strategy's own refusal (e.g. its accumulator's checks)
                logger.warning("round %d: strategy refused the update of %s: %s", rs.round_id, sid, exc)
                rs.answered.pop(sid)
                rs.rejected[sid] = getattr(exc, "code", "malformed")
        rs.updates.clear()

    async def run(self) -> None:
        failed_in_row = 0
        try:
            while self.coord.round < self.cfg.rounds:
                round_id = self.coord.round + 1
                try:
                    await self._wait_for_silos(round_id)
                    await before_round(
                        self.coord
                    )  # after a held-back round: start from the promoted version (gate_resume.py)
                    await self._run_round(round_id)
                    failed_in_row = 0
                except RoundFailed as exc:
                    failed_in_row += 1
                    logger.error("round %d failed: %s", round_id, exc)
                    self.coord.recorder.record({"round": round_id, "failed": str(exc), "time": time.time()})
                    if failed_in_row >= MAX_FAILED_ROUNDS:
                        self.coord.phase = "failed"
                        logger.error(
                            "stopping run %s after %d failed rounds in a row", self.cfg.run_name, failed_in_row
                        )
                        return
            self.coord.phase = "done"
            logger.info("run %s done after %d rounds", self.cfg.run_name, self.coord.round)
        except asyncio.CancelledError:
            self.coord.phase = "stopped"
            raise
        except Exception:
            self.coord.phase = "failed"
            logger.exception("run %s failed", self.cfg.run_name)
            raise

    async def _wait_for_silos(self, round_id: int) -> None:
        self.coord.phase = "waiting"
        deadline = time.monotonic() + self.cfg.start_timeout_s
        while len(self.coord.sessions.online()) < self.cfg.min_silos:
            if time.monotonic() > deadline:
                raise RoundFailed(
                    f"only {len(self.coord.sessions.online())} of min_silos={self.cfg.min_silos} silos online "
                    f"after {self.cfg.start_timeout_s:.0f} s"
                )
            await asyncio.sleep(0.05)

    async def send_train(self, rs: RoundState, silo: SiloInfo, *, windowed: bool = False) -> None:
        method = downlink_method(self.cfg.compression)
        encoded = rs.train_payloads.get(self._state_for(rs, silo), method, rs.global_state)  # one payload for all silos
        meta = encoded.meta
        dp_silo = self.cfg.dp_mode == "silo"
        secure = None
        if rs.secure is not None:
            from fedllm.federation.aggregation.secure_round import config_body

            secure = config_body(rs.secure.config)
        config = {
            **round_schedule(
                self.cfg.lr_schedule, rs.round_id, self.cfg.local_steps, self.cfg.rounds, self.cfg.local_optimizer
            ),
            **self.coord.strategy.plan_round(rs.round_id),
        }
        deadline = self._silo_deadline(rs, silo, encoded.tensor_bytes)
        task = TrainTask(
            local_steps=self.cfg.local_steps,
            config=config,
            rounds_total=self.cfg.rounds,
            compression=self.cfg.compression,
            encoding=meta,
            deadline_unix=deadline,
            dp_clip_norm=self.cfg.dp_clip_norm if dp_silo else None,
            dp_noise_multiplier=self.cfg.dp_noise_multiplier if dp_silo else 0.0,
            secure_aggregation=secure,
        )
        header = make_header(MsgType.TRAIN, task, run=self.cfg.run_name, round_id=rs.round_id, silo_id=silo.id)
        if windowed and rs.train_window is not None:  # not from the receive loop (`_welcome`): it brings the acks
            await rs.train_window.acquire(
                silo.id,
                len(encoded.payload),
                timeout_s=train_wait_s(
                    rs.allowances.get(silo.id, 30.0), silo.acks_train, self.cfg.heartbeat_interval_s
                ),
            )
        sent = await self.coord.sessions.send(silo.peer, header, encoded=encoded)
        rs.bytes_out += sent
        if not sent:
            rs.rejected[silo.id] = "unreachable"
            return
        rs.train_sent.setdefault(silo.id, time.time())  # a TRAIN sent again after a reconnect counts from the first
        rs.bytes_down[silo.id] = sent

    def _silo_deadline(self, rs: RoundState, silo: SiloInfo, train_bytes: int) -> float:
        """The silo's deadline of this round: the round's start + `round_deadline_s` (training) + its transfer
        allowance (the TRAIN's and its expected UPDATE's bytes over its link's measured throughput); set once."""
        from fedllm.federation.runtime.timing import transfer_allowance_s

        if silo.id not in rs.deadlines:
            allowance = transfer_allowance_s(
                train_bytes,
                silo.last_update_bytes or train_bytes,
                down_bps=silo.down_bps,
                up_bps=silo.up_bps,
                assumed_mbit=self.cfg.assumed_link_mbit,
                slack=self.cfg.transfer_slack,
            )
            rs.allowances[silo.id] = allowance
            rs.deadlines[silo.id] = rs.started + self.cfg.round_deadline_s + allowance
            rs.deadline = max(rs.deadlines.values())
        return rs.deadlines[silo.id]

    async def _run_round(self, round_id: int) -> None:
        selected = self.coord.sessions.online()
        now = time.time()
        rs = RoundState(
            round_id,
            set(selected),
            self.coord.strategy.start_round(round_id, self.coord.global_state),
            self.coord.global_state,
            deadline=now + self.cfg.round_deadline_s,
            started=now,
        )  # silos' own deadlines extend it (_send_train)
        rs.updates = open_round_spool(self.coord.run_dir, round_id, rs.acc)  # checked updates wait on disk, not in RAM
        rs.train_window = TrainWindow(self.cfg.train_window_bytes)
        if self.cfg.secure_aggregation:
            from fedllm.federation.aggregation.secure_round import SecureRound, round_config

            rs.secure = SecureRound(
                round_config(self.cfg, round_id, len(selected)), self.coord.global_state, rs, self.cfg.min_silos
            )
        self.coord.current, self.coord.phase = rs, "training"
        logger.info(
            "round %d: TRAIN to %s%s", round_id, ", ".join(selected), " (secure aggregation)" if rs.secure else ""
        )
        for sid in selected:
            await self.send_train(rs, self.coord.silos[sid], windowed=True)
        if rs.secure is not None:
            try:
                await self._run_secure(rs)
            finally:
                self.coord.current = None
        while rs.secure is None:
            # A silo whose TRAIN could not be delivered (its connection was being re-established) stays pending while
            # it is alive: when it reconnects it gets the TRAIN again (`_welcome`).
            pending = rs.selected - rs.answered.keys() - {s for s, why in rs.rejected.items() if why != "unreachable"}
            now = time.time()
            # A silo is silent while its update crosses a slow link (its heartbeats queue behind it): silence counts
            # against it only beyond silo_timeout_s + its transfer allowance.
            waiting = [
                s
                for s in pending
                if now < rs.deadline_of(s)
                and now - self.coord.silos[s].last_seen <= self.cfg.silo_timeout_s + rs.allowances.get(s, 0.0)
            ]
            if not waiting:
                break
            await rs.wait_for_change()
        self.coord.phase = "aggregating"
        self.coord.current = None
        for sid in sorted(rs.selected - rs.answered.keys() - rs.rejected.keys()):
            logger.warning(
                "round %d: no update from %s (%s)",
                round_id,
                sid,
                "deadline passed" if time.time() >= rs.deadline_of(sid) else "went offline",
            )
        if rs.secure is None:
            self._accumulate(rs)
        failures = sorted((rs.selected - rs.answered.keys()) | rs.rejected.keys())
        if len(rs.answered) < self.cfg.min_silos:
            failed = ", ".join(f"{s} ({rs.rejected.get(s, 'no answer')})" for s in failures) or "none"
            raise RoundFailed(f"{len(rs.answered)} valid update(s) < min_silos={self.cfg.min_silos}; failed: {failed}")
        self.coord.global_state = self._aggregate(rs, failures)
        self.coord.round = round_id
        record = self._round_record(rs, failures)
        self.coord.recorder.checkpoint(
            record
        )  # first: a registered (and published) version always has its checkpoint on disk
        version = self.coord.recorder.register(record)
        self.coord.recorder.append_round_log(record)
        self.coord.recorder.prune()
        if version is not None:
            self.coord.recorder.notify(version)

    def _aggregate(self, rs: RoundState, failures: list[str]) -> StateDict:
        """The strategy's new global adapter, checked (finite, norm bound) before anything uses it.

        Raises:
            RoundFailed: the strategy kept the previous global, or the aggregate failed its checks (the strategy's
                state is then rolled back, so the round leaves no trace).
        """
        from fedllm.federation.aggregation.aggregate import check_aggregate

        saved = {k: v.clone() for k, v in self.coord.strategy.state_dict().items()}
        new_state = self.coord.strategy.finish_round(rs.round_id, self.coord.global_state, rs.acc, failures)
        if isinstance(rs.updates, UpdateSpool):
            rs.updates.close()  # the round's spooled files (also a robust strategy's) are no longer needed
        if new_state is None:
            raise RoundFailed(
                f"strategy {self.coord.strategy.name} kept the previous global adapter (see its log line)"
            )
        from fedllm.federation.aggregation.bounds import aggregate_bound

        bound = aggregate_bound(self.cfg, self.coord.strategy, rs.norm_bound)
        if rs.secure is not None and bound is not None and self.cfg.max_aggregate_norm is None:
            bound += rs.secure.quantisation_slack()  # the masked sum's rounding error
        reason = check_aggregate(new_state, self.coord.global_state, bound)
        if reason is not None:
            self.coord.strategy.load_state_dict(saved)
            raise RoundFailed(f"aggregate rejected, previous global adapter kept: {reason}")
        return {k: v.detach().float().contiguous() for k, v in new_state.items()}

    def _round_record(self, rs: RoundState, failures: list[str]) -> dict[str, Any]:
        total = sum(a["num_examples"] for a in rs.answered.values())
        keys = sorted({k for a in rs.answered.values() for k in a["metrics"]})
        metrics = {
            k: sum(a["metrics"][k] * a["num_examples"] for a in rs.answered.values() if k in a["metrics"])
            / max(1, sum(a["num_examples"] for a in rs.answered.values() if k in a["metrics"]))
            for k in keys
        }
        duration = time.time() - rs.started
        train_s = max((a["train_s"] for a in rs.answered.values()), default=0.0)
        epsilon = self.coord.strategy.epsilon(self.cfg.dp_delta)
        if epsilon is not None:
            epsilon = (
                float(epsilon) if math.isfinite(epsilon) else None
            )  # no noise: no finite guarantee (JSON has no inf)
        return {
            "round": rs.round_id,
            "participants": sorted(rs.answered),
            "failures": failures,
            "examples": total,
            "metrics": metrics,
            "per_silo": {s: a["metrics"] for s, a in rs.answered.items()},
            "rejected": rs.rejected,
            "bytes_in": rs.bytes_in,
            "bytes_out": rs.bytes_out,
            "duration_s": duration,
            "train_s_max": train_s,
            "non_training_share": max(0.0, 1 - train_s / duration) if duration > 0 else 0.0,
            "epsilon": epsilon,
            "dp": self.cfg.dp_mode,
            "strategy": self.coord.strategy.name,
            "adapter": None,
            "time": time.time(),
            "secure_aggregation": rs.secure is not None,
            "shares": {s: round(rs.shares[s], 6) for s in sorted(rs.answered) if s in rs.shares},
            "norm_bound": rs.norm_bound,
            "clipped": rs.clipped,
            "dropped": rs.dropped,
            "update_norms": {s: rs.norms[s] for s in sorted(rs.answered) if s in rs.norms},
            "timings": {
                s: rs.timings.get(s) or {"train_s": round(rs.answered[s]["train_s"], 3)} for s in sorted(rs.answered)
            },
            "deadlines_s": {s: round(d - rs.started, 3) for s, d in sorted(rs.deadlines.items())},
            "started_from": self.coord.started_from,  # the promoted version, after a held-back round
            "received_eval": received_eval(
                {s: a["metrics"] for s, a in rs.answered.items()},
                rs.shares,
                {s: a["num_examples"] for s, a in rs.answered.items()},
                previous_adapter(self.coord.history),
            ),
        }
