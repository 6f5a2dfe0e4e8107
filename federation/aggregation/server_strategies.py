"""Aggregation strategies: the `Strategy` interface the coordinator calls, its defaults (`BaseStrategy`), the mean
strategies (FedAvg, FedProx, FedAvgM, FedAdam, FedYogi), the robust ones (median, trimmed mean, Krum) and LoRA
product aggregation. Pure maths over adapter updates (`dict[str, Tensor]`), no sockets, files or clocks.

An update is a DELTA, `local_state - global_state`, with the adapter-name-free keys that
`peft.get_peft_model_state_dict` produces. A round goes:

    acc = strategy.start_round(round_id, global_state)
    acc.add(silo_id, update, num_examples)          # as each UPDATE arrives (raises ValueError if malformed)
    new_global = strategy.finish_round(round_id, global_state, acc, failures)   # None = keep the old global

Streaming strategies (FedAvg, FedProx, FedAvgM, FedAdam, FedYogi) keep one running float32 weighted sum, so
their memory does not grow with the number of silos. Robust strategies (median, trimmed mean, Krum,
multi-Krum) need every update at once to compare them, so their accumulator KEEPS all updates: in RAM (about
`silos x adapter size x 4 bytes`) when used on their own, on disk in the coordinator
(`fedllm.federation.aggregation.update_spool`: RAM `silos x the largest tensor`, disk `silos x adapter size x 4 bytes`
for the round).

All maths is float32 on the CPU; the new global state is cast back to the global state's dtypes. The wrappers
(clipping, frozen A) are in `fedllm.federation.aggregation.strategy_wrappers`, the DP ones in
`fedllm.federation.aggregation.privacy`, the factory by name in `fedllm.federation.aggregation.strategy_factory`.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from typing import Any, Protocol, runtime_checkable

import torch

from fedllm.core.types import StateDict
from fedllm.federation.aggregation import lora_aggregate as la
from fedllm.federation.aggregation.accumulators import (
    ProductAccumulator,
    RoundAccumulator,
    StoringAccumulator,
    StreamingAccumulator,
)
from fedllm.federation.aggregation.aggregate import (
    add_delta,
    coordinate_median,
    krum_select,
    trimmed_mean,
    weighted_mean,
)

logger = logging.getLogger(__name__)

__all__ = [
    "Strategy",
    "BaseStrategy",
    "FedAvg",
    "FedProx",
    "FedAvgM",
    "FedAdam",
    "FedYogi",
    "Median",
    "TrimmedMean",
    "Krum",
    "ProductAggregation",
]


@runtime_checkable
class Strategy(Protocol):
    """A federated optimisation strategy (server side)."""

    name: str

    def plan_round(self, round_id: int) -> dict:
        """Extra JSON-able config sent to silos for this round (e.g. `{"prox_mu": 0.01}`)."""
        ...

    def start_round(self, round_id: int, global_state: StateDict) -> RoundAccumulator:
        """A fresh accumulator that checks updates against `global_state`'s keys and shapes."""
        ...

    def finish_round(
        self, round_id: int, global_state: StateDict, acc: RoundAccumulator, failures: list[str]
    ) -> StateDict | None:
        """The new global state, or None to keep the old one (too few results, or failures not accepted)."""
        ...

    def state_dict(self) -> StateDict:
        """Server-side optimiser state (tensors only) for checkpoints."""
        ...

    def load_state_dict(self, state: StateDict) -> None:
        """Restore what `state_dict` returned."""
        ...

    def state_for_silo(
        self, global_state: StateDict, lora_r: int | None, lora_alpha: float | None
    ) -> tuple[StateDict, float | None]:
        """(the adapter to send a silo training at rank `lora_r` with `lora_alpha`, its LoRA scale `alpha / r`).

        The global state itself (and None) unless the strategy sends silos other ranks (product aggregation); a
        state that is not `global_state` is what the silo's update is relative to (the accumulator's `set_base`).
        """
        ...

    def epsilon(self, delta: float | None = None) -> float | None:
        """DP epsilon spent so far at `delta` (default: the configured one); None without DP accounting."""
        ...

    @property
    def mean_based(self) -> bool:
        """Whether the aggregate is a function of the example-weighted sum of the updates alone (FedAvg and its
        server optimisers): what secure aggregation and central DP need."""
        ...

    @property
    def central_dp(self) -> bool:
        """Whether the coordinator adds DP noise to the aggregate (it must then see each update to clip it)."""
        ...

    @property
    def clip_norm(self) -> float | None:
        """The L2 norm every update is clipped to before aggregation; None when updates are not clipped one by one."""
        ...

    def change_bound(self, update_bound: float) -> float | None:
        """The largest L2 norm by which a round whose updates are all within `update_bound` moves the global adapter;
        None where no such bound holds (server optimisers, robust strategies, LoRA products, DP noise)."""
        ...


class StrategyDefaults:
    """The defaults of the `Strategy` methods beyond the round itself: no rank projection, no DP, no clipping, no
    bound on the change, not mean-based. `BaseStrategy` and `ProductAggregation` build on it."""

    mean_based = False

    def state_for_silo(
        self, global_state: StateDict, lora_r: int | None, lora_alpha: float | None
    ) -> tuple[StateDict, float | None]:
        """Every silo gets the global adapter: `(global_state, None)`."""
        return global_state, None

    def epsilon(self, delta: float | None = None) -> float | None:
        """No DP accounting: None."""
        return None

    @property
    def central_dp(self) -> bool:
        """No DP noise here (see `fedllm.federation.aggregation.privacy.CentralDP`)."""
        return False

    @property
    def clip_norm(self) -> float | None:
        """Updates are not clipped here (see `fedllm.federation.aggregation.strategy_wrappers.Clipped`)."""
        return None

    def change_bound(self, update_bound: float) -> float | None:
        """No bound by default."""
        return None


class BaseStrategy(StrategyDefaults):
    """Common round logic: `finish_round = apply_delta(global, aggregate(acc))` when enough results arrived.

    Subclasses define `aggregate(acc) -> delta` and optionally `apply_delta` (server optimiser) and state.

    Args:
        min_results: Fewest accepted updates for the round to count.
        accept_failures: If False, any failed silo makes the round keep the old global state.
    """

    name = "base"
    streaming = True

    def __init__(self, *, min_results: int = 1, accept_failures: bool = True) -> None:
        if min_results < 1:
            raise ValueError(f"min_results must be >= 1, got {min_results}")
        self.min_results = min_results
        self.accept_failures = accept_failures

    def plan_round(self, round_id: int) -> dict:
        """No extra silo config by default."""
        return {}

    def start_round(self, round_id: int, global_state: StateDict) -> RoundAccumulator:
        """A streaming or storing accumulator, depending on the strategy."""
        return StreamingAccumulator(global_state) if self.streaming else StoringAccumulator(global_state)

    def round_counts(self, round_id: int, acc: RoundAccumulator, failures: list[str]) -> bool:
        """Whether the round has enough results (and acceptable failures) to update the global state."""
        count = acc.count  # type: ignore[attr-defined]
        if count < self.min_results:
            logger.warning(
                "round %d: %d result(s) < min_results=%d (failures: %s); keeping the previous global state",
                round_id,
                count,
                self.min_results,
                failures,
            )
            return False
        if failures and not self.accept_failures:
            logger.warning(
                "round %d: %d silo(s) failed %s and accept_failures=False; keeping the previous global state",
                round_id,
                len(failures),
                failures,
            )
            return False
        return True

    def aggregate(self, acc: RoundAccumulator) -> StateDict:
        """The round's aggregated delta (float32); each concrete strategy (FedAvg, Median, ...) says how."""
        raise NotImplementedError

    def apply_delta(self, round_id: int, global_state: StateDict, delta: StateDict) -> StateDict:
        """New global state from an aggregated delta; plain `global + delta` by default."""
        return add_delta(global_state, delta)

    def finish_round(
        self, round_id: int, global_state: StateDict, acc: RoundAccumulator, failures: list[str]
    ) -> StateDict | None:
        """Aggregate and apply; None if the round does not count (see `round_counts`)."""
        if not self.round_counts(round_id, acc, failures):
            return None
        return self.apply_delta(round_id, global_state, self.aggregate(acc))

    def state_dict(self) -> StateDict:
        """Stateless by default."""
        return {}

    def load_state_dict(self, state: StateDict) -> None:
        """Stateless by default; refuses unexpected state."""
        if state:
            raise ValueError(f"strategy {self.name!r} has no state, got keys {sorted(state)[:3]}")


class FedAvg(BaseStrategy):
    """Example-weighted mean of the updates (McMahan et al. 2017), streamed; `server_lr` scales the step."""

    name = "fedavg"
    mean_based = True

    def __init__(self, *, server_lr: float = 1.0, **kw: Any) -> None:
        super().__init__(**kw)
        self.server_lr = server_lr

    def change_bound(self, update_bound: float) -> float | None:
        """A weighted mean of updates within B moves by at most B: `B * max(1, server_lr)`."""
        return update_bound * max(1.0, float(self.server_lr))

    def aggregate(self, acc: RoundAccumulator) -> StateDict:
        """Weighted mean delta."""
        return acc.mean()  # type: ignore[attr-defined]

    def apply_delta(self, round_id: int, global_state: StateDict, delta: StateDict) -> StateDict:
        """`global + server_lr * delta`."""
        return add_delta(global_state, delta, self.server_lr)


class FedProx(FedAvg):
    """FedAvg on the server; silos add `(mu/2) * ||w - w_global||^2` (Li et al. 2020): `plan_round` sends mu."""

    name = "fedprox"

    def __init__(self, *, prox_mu: float = 0.01, **kw: Any) -> None:
        super().__init__(**kw)
        if prox_mu < 0:
            raise ValueError(f"prox_mu must be >= 0, got {prox_mu}")
        self.prox_mu = prox_mu

    def plan_round(self, round_id: int) -> dict:
        """`{"prox_mu": mu}`."""
        return {"prox_mu": self.prox_mu}


class _ServerOptimiser(FedAvg):
    """FedAvg whose mean delta feeds a server optimiser; the state is per-key tensors named `SLOT.KEY`."""

    slots: tuple[str, ...] = ()

    def __init__(self, **kw: Any) -> None:
        super().__init__(**kw)
        self._state: dict[str, StateDict] = {slot: {} for slot in self.slots}

    def change_bound(self, update_bound: float) -> float | None:
        """None: momentum and adaptive steps are not bounded by the round's updates."""
        return None

    def state_dict(self) -> StateDict:
        """`{"SLOT.KEY": tensor}` copies of the optimiser moments."""
        return {f"{slot}.{k}": v.clone() for slot in self.slots for k, v in self._state[slot].items()}

    def load_state_dict(self, state: StateDict) -> None:
        """Restore moments saved by `state_dict`."""
        loaded: dict[str, StateDict] = {slot: {} for slot in self.slots}
        for name, tensor in state.items():
            slot, _, key = name.partition(".")
            if slot not in loaded or not key:
                raise ValueError(f"strategy {self.name!r}: unexpected state key {name!r}")
            loaded[slot][key] = tensor.detach().to(torch.float32).clone()
        self._state = loaded


class FedAvgM(_ServerOptimiser):
    """FedAvg with server momentum (Hsu et al. 2019): `v = beta*v + delta; w = w + server_lr * v`."""

    name = "fedavgm"
    slots = ("momentum",)

    def __init__(self, *, server_momentum: float = 0.9, **kw: Any) -> None:
        super().__init__(**kw)
        self.server_momentum = server_momentum

    def apply_delta(self, round_id: int, global_state: StateDict, delta: StateDict) -> StateDict:
        """Momentum step; the momentum buffer starts at zero."""
        velocity = self._state["momentum"]
        new_velocity = {k: self.server_momentum * velocity.get(k, torch.zeros_like(d)) + d for k, d in delta.items()}
        self._state["momentum"] = new_velocity
        return add_delta(global_state, new_velocity, self.server_lr)


class FedAdam(_ServerOptimiser):
    """Server Adam on the pseudo-gradient (Reddi et al. 2021, "Adaptive Federated Optimization", Alg. 2).

    With the mean delta `d`: `m = b1*m + (1-b1)*d`, `v = b2*v + (1-b2)*d^2`, `w = w + server_lr * m / (sqrt(v) + tau)`.
    As in the paper: no bias correction, `m` starts at 0 and `v` at `tau^2`.
    """

    name = "fedadam"
    slots = ("m", "v")

    def __init__(
        self, *, server_lr: float = 0.01, beta_1: float = 0.9, beta_2: float = 0.99, tau: float = 1e-3, **kw: Any
    ) -> None:
        super().__init__(server_lr=server_lr, **kw)
        self.beta_1, self.beta_2, self.tau = beta_1, beta_2, tau

    def _second_moment(self, v: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
        return self.beta_2 * v + (1 - self.beta_2) * d * d

    def apply_delta(self, round_id: int, global_state: StateDict, delta: StateDict) -> StateDict:
        """One adaptive server step."""
        m_old, v_old = self._state["m"], self._state["v"]
        m_new: StateDict = {}
        v_new: StateDict = {}
        step: StateDict = {}
        for k, d in delta.items():
            m = self.beta_1 * m_old.get(k, torch.zeros_like(d)) + (1 - self.beta_1) * d
            v = self._second_moment(v_old.get(k, torch.full_like(d, self.tau**2)), d)
            m_new[k], v_new[k] = m, v
            step[k] = m / (torch.sqrt(v) + self.tau)
        self._state = {"m": m_new, "v": v_new}
        return add_delta(global_state, step, self.server_lr)


class FedYogi(FedAdam):
    """FedAdam with Yogi's second moment: `v = v - (1-b2) * d^2 * sign(v - d^2)` (Reddi et al. 2021)."""

    name = "fedyogi"

    def _second_moment(self, v: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
        d2 = d * d
        return v - (1 - self.beta_2) * d2 * torch.sign(v - d2)


class Median(BaseStrategy):
    """Coordinate-wise median of the updates (Yin et al. 2018). Keeps all updates (on disk in the coordinator: see the
    module doc)."""

    name = "median"
    streaming = False

    def aggregate(self, acc: RoundAccumulator) -> StateDict:
        """Coordinate median delta."""
        return coordinate_median(acc.updates)  # type: ignore[attr-defined]


class TrimmedMean(BaseStrategy):
    """Coordinate-wise trimmed mean (Yin et al. 2018). Keeps all updates (on disk in the coordinator: see the module
    doc)."""

    name = "trimmed_mean"
    streaming = False

    def __init__(self, *, trim_ratio: float = 0.2, **kw: Any) -> None:
        super().__init__(**kw)
        if not 0 <= trim_ratio < 0.5:
            raise ValueError(f"trim_ratio must be in [0, 0.5), got {trim_ratio}")
        self.trim_ratio = trim_ratio

    def aggregate(self, acc: RoundAccumulator) -> StateDict:
        """Trimmed mean delta."""
        return trimmed_mean(acc.updates, self.trim_ratio)  # type: ignore[attr-defined]


class Krum(BaseStrategy):
    """Krum (`num_selected=1`) or multi-Krum (mean of the `num_selected` best; default `n - f`).

    Keeps all updates (on disk in the coordinator: see the module doc). The multi-Krum mean is unweighted, as in
    Blanchard et al. 2017.
    """

    name = "krum"
    streaming = False

    def __init__(self, *, num_byzantine: int = 1, num_selected: int | None = 1, **kw: Any) -> None:
        super().__init__(**kw)
        if num_byzantine < 0:
            raise ValueError(f"num_byzantine must be >= 0, got {num_byzantine}")
        self.num_byzantine = num_byzantine
        self.num_selected = num_selected
        self.last_selected: list[str] = []

    def aggregate(self, acc: RoundAccumulator) -> StateDict:
        """Mean of the Krum-selected updates."""
        updates, silo_ids = acc.updates, acc.silo_ids  # type: ignore[attr-defined]
        n = len(updates)
        m = self.num_selected if self.num_selected is not None else max(n - self.num_byzantine, 1)
        chosen = krum_select(updates, self.num_byzantine, min(m, n))
        self.last_selected = [silo_ids[i] for i in chosen]
        logger.info("krum selected %s", self.last_selected)
        return weighted_mean([(updates[i], 1) for i in chosen])


class ProductAggregation(StrategyDefaults):
    """LoRA product aggregation (FlexLoRA-style) around a mean-based strategy that acts as the server optimiser.

    The round's example-weighted mean dense weight change `mean_i(s_i B_i' A_i' - s_i B_i A_i)` is the
    pseudo-gradient; the inner strategy's `apply_delta` steps the global dense product with it (FedAvg:
    `G + server_lr * d`; FedAvgM: momentum; FedAdam/FedYogi: adaptive, with dense moments of one (out, in)
    matrix per module); the result is re-factorised to the global rank by truncated SVD. With plain FedAvg at
    server_lr 1 the new global product is exactly the best rank-r approximation of `mean_i(s_i B_i' A_i')`.
    The adaptive steps are full-rank, so their truncation to rank r keeps only their leading directions.

    Silos may train at their own rank: `state_for_silo` gives each the global product truncated to its rank.
    Needs every update on its own: not with secure aggregation, central DP or per-update clipping.

    Args:
        server: the mean-based strategy whose plan, round rules and `apply_delta` are used.
        lora_alpha: the global adapter's lora_alpha (`train.lora_alpha`: `build_strategy` passes it); None takes
            the products at scale 1 and refuses silos at other ranks.
    """

    def __init__(self, server: BaseStrategy, *, lora_alpha: float | None = None) -> None:
        if not isinstance(server, FedAvg):
            raise ValueError(
                f"lora_aggregation=product composes with mean-based strategies (fedavg fedprox fedavgm "
                f"fedadam fedyogi), not {server.name!r}"
            )
        self.server = server
        self.lora_alpha = lora_alpha
        self.name = f"{server.name}+product"

    def _scale(self, state: Mapping[str, torch.Tensor]) -> float:
        return la.lora_scale(self.lora_alpha, la.lora_rank(state)) if self.lora_alpha else 1.0

    def state_for_silo(
        self, global_state: StateDict, lora_r: int | None, lora_alpha: float | None
    ) -> tuple[StateDict, float | None]:
        """(the state to send a silo training at rank `lora_r`, its scale); the global state at the global rank."""
        scale = self._scale(global_state)
        if (
            lora_r is None
            or lora_r == la.lora_rank(global_state)
            and (lora_alpha is None or math.isclose(lora_alpha / lora_r, scale))
        ):
            return global_state, scale
        if lora_alpha is None or self.lora_alpha is None:
            raise ValueError("heterogeneous ranks need each silo's and the global lora_alpha")
        silo_scale = la.lora_scale(lora_alpha, lora_r)
        return la.project_state(global_state, scale, lora_r, silo_scale), silo_scale

    def plan_round(self, round_id: int) -> dict:
        """The server strategy's plan (e.g. FedProx's mu)."""
        return self.server.plan_round(round_id)

    def start_round(self, round_id: int, global_state: StateDict) -> RoundAccumulator:
        """A `ProductAccumulator` (call its `set_base` for silos sent another rank)."""
        return ProductAccumulator(global_state, self._scale(global_state))

    def finish_round(
        self, round_id: int, global_state: StateDict, acc: RoundAccumulator, failures: list[str]
    ) -> StateDict | None:
        """Step the global product with the mean dense change, then re-factorise to the global rank."""
        if not self.server.round_counts(round_id, acc, failures):
            return None
        scale = self._scale(global_state)
        dense_global = la.dense_products(global_state, scale)
        dense_new = self.server.apply_delta(round_id, dense_global, acc.mean())  # type: ignore[attr-defined]
        return la.refactorize(dense_new, global_state, la.lora_rank(global_state), scale)

    def state_dict(self) -> StateDict:
        """The server optimiser's state (dense moments keyed by module)."""
        return self.server.state_dict()

    def load_state_dict(self, state: StateDict) -> None:
        """Restore the server optimiser's state."""
        self.server.load_state_dict(state)
