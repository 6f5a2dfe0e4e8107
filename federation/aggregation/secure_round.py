"""A secure-aggregation round over the live transport: the coordinator sees only masked vectors, learns only the sum.

`federation/aggregation/secagg.py` holds the pure state machines; this module carries them over SECAGG messages
(`protocol.SecAggStep`). With `federation.secure_aggregation` on, a round goes:

1. TRAIN (with `TrainTask.secure_aggregation` = the round's `SecAggConfig`) to the selected silos; each trains,
   then answers ``advertise`` (its two X25519 public keys, example count, metrics) instead of an UPDATE.
2. ``roster`` (U1: the silos that advertised, their total example count N, the silo's own weight ``w_u``: its
   share of the round, ``n_u / N`` bounded by its enrolled count and capped at `federation.max_silo_share`, and the
   round's update norm bound ``B``: `fedllm.federation.aggregation.bounds.adaptive_norm_bound` of the norms the silos
   advertised) -> each silo answers ``share_keys``.
3. ``shares`` (the encrypted Shamir shares addressed to it; U2 = the silos that shared) -> each silo clips its delta
   to ``B``, pre-scales it by its weight ``w_u`` and answers ``masked`` (the masked, quantised vector as the payload).
4. ``survivors`` (U3 = the silos whose masked vector arrived) -> each answers ``unmask`` with its shares.
5. With at least `threshold` unmask answers the server removes every mask and gets
   ``S = sum_{u in U3} w_u * delta_u``; the coordinator applies ``S / sum_{u in U3} w_u``, which is exactly the
   weighted FedAvg mean of the survivors' updates (the plain path's weights), up to quantisation error.

What the sum covers: a silo whose masked vector reached the coordinator is in U3 and its update IS in the sum,
even if it disappears before answering ``unmask`` (its self-mask seed is rebuilt from the other silos' shares).
A silo that shared keys but whose masked vector never arrived (U2 minus U3) is excluded: its pairwise masks, already
folded into the survivors' vectors, are removed with its key seed rebuilt from the survivors' shares. Silos that
dropped before sharing keys are simply not part of the masking. Fewer than `threshold` (or `min_silos`) at any step
fails the round (`RoundFailed`), and the round is retried as any failed round is.

The strategy sees the secure mean once per survivor with that survivor's example count (so its accumulator's count
and example total are those of the plain path, and its weighted mean is the secure mean). Only mean-based strategies
work on a masked sum: `check_strategy` refuses median, trimmed mean, Krum, per-update clipping and central DP.
Per-update checks the plain path makes (norm bound, finite values) cannot be made on masked vectors: the silo's own
clip to the issued ``B`` is the enforcement, values are clamped to `secagg_clip_range` by the quantiser, and the
coordinator checks the aggregate against ``B`` (a weighted mean of updates clipped to ``B`` moves by at most ``B``):
a silo that skipped its clip fails the round (the previous global is kept) rather than moving the global adapter. What
the silos say in clear (example counts, metrics) is validated like an UPDATE's body (`protocol.Advertisement`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from fedllm.core.errors import ConfigError, ProtocolError, RoundFailed
from fedllm.core.types import StateDict
from fedllm.federation.aggregation.secagg import SecAggConfig, SecAggServer, flat_layout

if TYPE_CHECKING:
    import torch

    from fedllm.core.sections import FederationSettings
    from fedllm.federation.aggregation.server_strategies import Strategy
    from fedllm.federation.wire.protocol import Header

logger = logging.getLogger(__name__)

# await send(silo_id, step, data) -> whether it was delivered
Sender = Callable[[str, str, dict[str, Any]], Awaitable[bool]]
Alive = Callable[[str], bool]
Weigh = Callable[[dict[str, int]], dict[str, float]]  # silo -> example count  =>  silo -> share (summing to 1)
Bound = Callable[[dict[str, float]], "float | None"]  # silo -> advertised update norm  =>  the round's norm bound


class SecAggRefused(ProtocolError):
    """A SECAGG message refused; `code` is the ERROR code the silo gets (protocol.ERROR_CODES)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


def check_strategy(strategy: "Strategy", cfg: "FederationSettings") -> None:
    """Refuse strategies that cannot run on a masked sum.

    Raises:
        ConfigError: a robust strategy (median, trimmed mean, Krum), per-update clipping, or central DP.
    """
    from fedllm.federation.aggregation.strategy_factory import mean_strategy_names

    if cfg.dp_mode == "central" or strategy.central_dp:
        raise ConfigError(
            "secure aggregation cannot be combined with central DP (it clips each update, which the "
            "coordinator never sees); use federation.dp_mode=silo"
        )
    if strategy.clip_norm is not None:
        raise ConfigError(
            "secure aggregation cannot clip individual updates (strategy_params.clip_norm); "
            "use federation.secagg_clip_range or silo DP"
        )
    if not strategy.mean_based:
        raise ConfigError(
            f"strategy {strategy.name!r} cannot run under secure aggregation: the coordinator learns "
            f"only the sum of the updates; use one of {', '.join(mean_strategy_names())}"
        )


def round_config(cfg: "FederationSettings", round_id: int, num_selected: int) -> SecAggConfig:
    """The round's SecAggConfig: threshold = `secagg_threshold` or a majority of the selected silos (>= 2)."""
    threshold = cfg.secagg_threshold or max(2, num_selected // 2 + 1)
    return SecAggConfig(
        threshold=threshold,
        clip_range=cfg.secagg_clip_range,
        bits=32,
        context=f"{cfg.run_name}/{round_id}/{time.time_ns()}",
    )


def config_body(config: SecAggConfig) -> dict[str, Any]:
    """The SecAggConfig as TrainTask.secure_aggregation."""
    return {
        "threshold": config.threshold,
        "clip_range": config.clip_range,
        "bits": config.bits,
        "context": config.context,
    }


def masked_tensor(masked: bytes, bits: int) -> "torch.Tensor":
    """The masked vector (little-endian uint words) as a signed tensor of the same width, for safetensors."""
    import numpy as np
    import torch

    return torch.from_numpy(np.frombuffer(masked, dtype="<i4" if bits == 32 else "<i8").copy())


def masked_bytes(tensors: StateDict, bits: int) -> bytes:
    """Inverse of `masked_tensor`.

    Raises:
        ProtocolError: the payload is not exactly one integer tensor `masked` of the round's width.
    """
    import torch

    expected = torch.int32 if bits == 32 else torch.int64
    t = tensors.get("masked")
    if set(tensors) != {"masked"} or t is None or t.dtype != expected or t.dim() != 1:
        raise ProtocolError(
            f"a masked input is one 1-d {expected} tensor named 'masked', got "
            f"{[(k, str(v.dtype), tuple(v.shape)) for k, v in tensors.items()]}"
        )
    return t.numpy().astype("<i4" if bits == 32 else "<i8").tobytes()


class SecureRound:
    """The coordinator's side of one secure round.

    Args:
        config: the round's SecAggConfig.
        global_state: the round's global adapter (gives the layout of the updates).
        rs: the coordinator's RoundState (`selected`, `rejected`, `answered`, `changed`, `deadline`).
        min_silos: fewest survivors for the round to count.
    """

    def __init__(self, config: SecAggConfig, global_state: StateDict, rs: Any, min_silos: int) -> None:
        self.config, self.rs, self.min_silos = config, rs, min_silos
        self.server = SecAggServer(config, flat_layout(global_state))
        self.step = "advertise"
        self.expected: set[str] = rs.selected  # the same set: a silo picked up mid-round may still advertise
        self.answers: dict[str, set[str]] = {s: set() for s in ("advertise", "share_keys", "masked", "unmask")}
        self.info: dict[str, dict[str, Any]] = {}  # silo -> num_examples, metrics, train_s, bytes
        self.received: dict[str, bytes] = {}  # silo -> the masked vector as it arrived (all the coordinator sees)
        self.total_examples = 0
        self.weights: dict[str, float] = {}  # silo -> its share of the round (sent with the roster)
        self.norm_bound: float | None = None  # the update norm bound sent with the roster

    def payload_limit(self) -> int:
        """The largest SECAGG payload of this round: one 64-bit word per adapter weight, plus the safetensors header."""
        from fedllm.federation.aggregation.bounds import HEADER_ALLOWANCE

        return 8 * self.server.numel + HEADER_ALLOWANCE

    def quantisation_slack(self) -> float:
        """A bound on the L2 error quantisation adds to the unmasked mean (see fedllm.federation.aggregation.secagg)."""
        import math

        n = max(1, len(self.weights))
        covered = max(1e-12, min(self.weights.values(), default=1.0))
        return math.sqrt(max(1, self.server.numel)) * n / self.config.scale(n) / covered

    # ------------------------------------------------------------------ incoming
    def handle(self, silo_id: str, header: "Header", tensors: StateDict, size: int) -> None:
        """Feed one SECAGG message of this round into the state machine.

        Raises:
            SecAggRefused: an unexpected step (`secagg`), a silo that is not part of this step (`duplicate` if it
                already answered it), or a malformed body (`malformed`, `bad_metrics`).
        """
        from pydantic import ValidationError

        from fedllm.federation.wire.protocol import Advertisement, SecAggStep

        body = SecAggStep.model_validate(header.body)
        if silo_id in self.answers.get(body.step, ()):  # a repeat, even of a step the round has moved past
            raise SecAggRefused(
                "duplicate",
                f"secure round {self.rs.round_id}: silo {silo_id} already answered step "
                f"{body.step!r}; the first answer stands",
            )
        if body.step != self.step:
            raise SecAggRefused(
                "secagg", f"secure round {self.rs.round_id}: got step {body.step!r} while at {self.step!r}"
            )
        if silo_id not in self.expected:
            raise SecAggRefused(
                "secagg", f"secure round {self.rs.round_id}: silo {silo_id} is not expected at step {self.step!r}"
            )
        data = body.data
        try:
            if self.step == "advertise":
                try:
                    adv = Advertisement.model_validate(data)
                except ValidationError as exc:
                    fields = sorted({str(e["loc"][0]) for e in exc.errors()})
                    code = "bad_metrics" if fields == ["metrics"] else "malformed"
                    raise SecAggRefused(
                        code,
                        f"secure round {self.rs.round_id}: invalid advertise from {silo_id}: bad {', '.join(fields)}",
                    ) from exc
                self.server.add_advertisement({"silo_id": silo_id, "c_pk": adv.c_pk, "s_pk": adv.s_pk})
                self.info[silo_id] = {
                    "num_examples": adv.num_examples,
                    "metrics": dict(adv.metrics),
                    "train_s": adv.train_s,
                    "bytes": size,
                    "update_norm": adv.update_norm,
                }
            elif self.step == "share_keys":
                self.server.add_shares(silo_id, dict(data["ciphertexts"]))
            elif self.step == "masked":
                masked = masked_bytes(tensors, self.config.bits)
                self.server.add_masked(silo_id, masked)
                self.received[silo_id] = masked
            elif self.step == "unmask":
                self.server.add_unmask(silo_id, dict(data["shares"]))
        except SecAggRefused:
            raise
        except (ProtocolError, KeyError, TypeError, ValueError, AttributeError) as exc:
            raise SecAggRefused(
                "malformed",
                f"secure round {self.rs.round_id}: malformed {self.step!r} from {silo_id}: {type(exc).__name__}",
            ) from exc
        if self.step != "advertise":
            self.info[silo_id]["bytes"] += size
        self.answers[self.step].add(silo_id)
        self.rs.changed.set()

    # ------------------------------------------------------------------ driving
    async def _collect(self, step: str, alive: Alive) -> set[str]:
        """Wait until every expected silo answered `step`, failed, went offline, or the deadline passed."""
        rs = self.rs
        self.step = step
        while True:
            pending = self.expected - self.answers[step] - rs.rejected.keys()
            if not pending or not any(alive(s) for s in pending) or time.time() >= rs.deadline:
                break
            await rs.wait_for_change()
        got = self.answers[step] - rs.rejected.keys()
        for sid in sorted(self.expected - got - rs.rejected.keys()):
            logger.warning(
                "secure round %d: no %s from %s (%s)",
                rs.round_id,
                step,
                sid,
                "deadline passed" if time.time() >= rs.deadline else "went offline",
            )
        return got

    def _need(self, got: set[str], what: str, floor: int) -> None:
        if len(got) < floor:
            raise RoundFailed(
                f"secure aggregation: {len(got)} silo(s) {what} < {floor} needed (threshold "
                f"{self.config.threshold}, min_silos {self.min_silos})"
            )

    async def run(
        self, send: Sender, alive: Alive, weigh: Weigh, bound: Bound | None = None
    ) -> tuple[StateDict, dict[str, dict[str, Any]]]:
        """Drive steps 1..5 after the TRAINs went out.

        Args:
            send: `await send(silo_id, step, data)`: a SECAGG message to a silo; False if it could not be sent.
            alive: whether a silo is still online.
            weigh: each roster silo's share of the round from its example count (the coordinator's capping).
            bound: the round's update norm bound from the advertised norms (None: no bound is issued).

        Returns:
            The example-weighted mean delta of the survivors, and `{survivor: {num_examples, metrics, train_s, bytes}}`.

        Raises:
            RoundFailed: too few silos at some step, or the unmasking failed.
        """
        floor = max(self.config.threshold, self.min_silos)
        self.step = "advertise"
        u1 = await self._collect("advertise", alive)
        self._need(u1, "advertised keys", floor)
        try:
            roster = self.server.roster()
        except ProtocolError as exc:
            raise RoundFailed(str(exc)) from exc
        self.total_examples = sum(self.info[s]["num_examples"] for s in roster)
        self.weights = weigh({s: self.info[s]["num_examples"] for s in roster})
        norms = {s: self.info[s]["update_norm"] for s in roster if self.info[s].get("update_norm") is not None}
        self.norm_bound = bound(norms) if bound is not None else None
        self.expected, self.step = set(roster), "share_keys"
        for sid in sorted(roster):
            await send(
                sid,
                "roster",
                {
                    "roster": roster,
                    "total_examples": self.total_examples,
                    "weight": self.weights[sid],
                    "norm_bound": self.norm_bound,
                },
            )
        u2 = await self._collect("share_keys", alive)
        self._need(u2, "shared keys", floor)
        self.expected, self.step = set(u2), "masked"
        for sid in sorted(u2):
            await send(sid, "shares", {"ciphertexts": self.server.shares_for(sid)})
        u3 = await self._collect("masked", alive)
        self._need(u3, "sent masked inputs", floor)
        try:
            survivors = self.server.survivors()
        except ProtocolError as exc:
            raise RoundFailed(str(exc)) from exc
        self.expected, self.step = set(survivors), "unmask"
        for sid in survivors:
            await send(sid, "survivors", {"survivors": survivors})
        answered = await self._collect("unmask", alive)
        self._need(answered, "answered the unmask step", self.config.threshold)
        try:
            total = self.server.aggregate()
        except ProtocolError as exc:
            raise RoundFailed(f"secure aggregation could not unmask: {exc}") from exc
        covered = sum(self.weights[s] for s in survivors)
        mean = {k: v / covered for k, v in total.items()}
        logger.info(
            "secure round %d: unmasked the sum of %d silo(s) %s (%.3g of the round's weight)",
            self.rs.round_id,
            len(survivors),
            survivors,
            covered,
        )
        return mean, {s: self.info[s] for s in survivors}
