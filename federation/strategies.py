"""Aggregation strategies: pure maths over adapter updates (`dict[str, Tensor]`), no sockets, files or clocks.

An update is a DELTA, `local_state - global_state`, with the adapter-name-free keys that
`peft.get_peft_model_state_dict` produces. A round goes:

    acc = strategy.start_round(round_id, global_state)
    acc.add(silo_id, update, num_examples)          # as each UPDATE arrives (raises ValueError if malformed)
    new_global = strategy.finish_round(round_id, global_state, acc, failures)   # None = keep the old global

Streaming strategies (FedAvg, FedProx, FedAvgM, FedAdam, FedYogi) keep one running float32 weighted sum, so
their memory does not grow with the number of silos. Robust strategies (median, trimmed mean, Krum,
multi-Krum) need every update at once to compare them, so their accumulator KEEPS all updates (memory grows
linearly with the silo count: about `silos x adapter size x 4 bytes`).

All maths is float32 on the CPU; the new global state is cast back to the global state's dtypes.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from typing import Any, Protocol, runtime_checkable

import torch

from appliance.core.types import StateDict
from federation import lora_aggregate as la

logger = logging.getLogger(__name__)

__all__ = [
    "StateDict",
    "RoundAccumulator",
    "Strategy",
    "STRATEGY_NAMES",
    "make_strategy",
    "check_update",
    "clip_update",
    "global_norm",
    "weighted_mean",
    "coordinate_median",
    "trimmed_mean",
    "krum_select",
    "StreamingAccumulator",
    "StoringAccumulator",
    "ClippedAccumulator",
    "BaseStrategy",
    "FedAvg",
    "FedProx",
    "FedAvgM",
    "FedAdam",
    "FedYogi",
    "Median",
    "TrimmedMean",
    "Krum",
    "Clipped",
    "StrategyWrapper",
    "innermost",
    "is_wrapped_by",
    "mean_strategy_names",
    "InvalidUpdate",
    "capped_weights",
    "check_aggregate",
    "LORA_AGGREGATIONS",
    "ProductAccumulator",
    "ProductAggregation",
    "FrozenA",
]


# --------------------------------------------------------------------------------------------------------------
# Protocols
# --------------------------------------------------------------------------------------------------------------
@runtime_checkable
class RoundAccumulator(Protocol):
    """Collects the updates of one round as they arrive."""

    def add(self, silo_id: str, update: StateDict, num_examples: int) -> None:
        """Take one silo's update; raise ValueError naming the silo and the first bad key."""
        ...


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


# --------------------------------------------------------------------------------------------------------------
# Pure helpers
# --------------------------------------------------------------------------------------------------------------
class InvalidUpdate(ValueError):
    """An update that does not fit the global adapter; `code` says how (the ERROR code the silo gets).

    Codes: `manifest` (a key missing or unexpected), `bad_shape`, `bad_dtype`, `non_finite`.
    """

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


def check_update(silo_id: str, update: Mapping[str, torch.Tensor], reference: Mapping[str, torch.Tensor]) -> None:
    """Check that `update` has exactly `reference`'s keys and shapes, floating dtypes and finite values.

    Args:
        silo_id: Who sent the update (named in the error).
        update: The update to check.
        reference: Tensors whose keys and shapes are expected (usually the global state).

    Raises:
        InvalidUpdate: naming the silo and the first key (in sorted order) that is missing, unexpected,
            of the wrong shape, not floating point, or holding NaN/inf.
    """
    missing = sorted(set(reference) - set(update))
    extra = sorted(set(update) - set(reference))
    if missing:
        raise InvalidUpdate("manifest", f"update from silo {silo_id!r}: key {missing[0]!r} is missing ({len(missing)} missing)")
    if extra:
        raise InvalidUpdate("manifest", f"update from silo {silo_id!r}: key {extra[0]!r} is unexpected ({len(extra)} unexpected)")
    for key in sorted(reference):
        tensor = update[key]
        if not isinstance(tensor, torch.Tensor):
            raise InvalidUpdate("bad_dtype", f"update from silo {silo_id!r}: key {key!r} is a {type(tensor).__name__}, not a tensor")
        if tuple(tensor.shape) != tuple(reference[key].shape):
            raise InvalidUpdate(
                "bad_shape",
                f"update from silo {silo_id!r}: key {key!r} has shape {tuple(tensor.shape)}, "
                f"expected {tuple(reference[key].shape)}",
            )
        if not tensor.is_floating_point():
            raise InvalidUpdate("bad_dtype", f"update from silo {silo_id!r}: key {key!r} has dtype {tensor.dtype}, expected floating")
        if not bool(torch.isfinite(tensor).all()):
            raise InvalidUpdate("non_finite", f"update from silo {silo_id!r}: key {key!r} holds NaN or inf values")


def global_norm(update: Mapping[str, torch.Tensor]) -> float:
    """L2 norm of all tensors of `update` taken together (float64 accumulation)."""
    total = 0.0
    for tensor in update.values():
        total += float(torch.sum(tensor.detach().to(torch.float64) ** 2))
    return math.sqrt(total)


def clip_update(update: Mapping[str, torch.Tensor], max_norm: float) -> tuple[StateDict, float]:
    """Scale `update` so that its global L2 norm is at most `max_norm`.

    Args:
        update: The update (not modified).
        max_norm: Largest allowed global L2 norm (> 0).

    Returns:
        `(clipped, norm)`: a new dict (float32 maths, cast back to each tensor's dtype) and the norm BEFORE clipping.
    """
    if max_norm <= 0:
        raise ValueError(f"max_norm must be > 0, got {max_norm}")
    norm = global_norm(update)
    scale = min(1.0, max_norm / norm) if norm > 0 else 1.0
    clipped = {k: (v.detach().to(torch.float32) * scale).to(v.dtype) for k, v in update.items()}
    return clipped, norm


def capped_weights(counts: Mapping[str, float], max_share: float) -> dict[str, float]:
    """Each silo's share of a round: proportional to its example count, but no share above `max_share`.

    Water-filling: the largest counts are lowered to a common level `t` so that `t <= max_share * sum(min(c, t))`;
    the others keep their proportions. When no split can respect the cap (`len(counts) * max_share < 1`) every silo
    gets an equal share, the most even split there is.

    Args:
        counts: silo -> example count (> 0; any size: the maths is float64 on normalised counts).
        max_share: largest share of one silo, in (0, 1]; 1 leaves the plain proportions.

    Returns:
        silo -> share in (0, 1]; the shares sum to 1.
    """
    if not counts:
        return {}
    if not 0 < max_share <= 1:
        raise ValueError(f"max_share must be in (0, 1], got {max_share}")
    if any(not (c > 0 and math.isfinite(c)) for c in counts.values()):
        raise ValueError(f"example counts must be finite and > 0, got {sorted(counts.values())[:3]}")
    n = len(counts)
    if n * max_share < 1:
        return {s: 1.0 / n for s in counts}
    top = max(counts.values())
    w = {s: float(c) / top for s, c in counts.items()}  # in (0, 1]: no overflow, whatever the counts
    ordered = sorted(w.values(), reverse=True)  # o_1 >= o_2 >= ... >= o_n
    level = None
    if ordered[0] <= max_share * sum(ordered):
        level = ordered[0]  # nobody is above the cap
    for k in range(1, n):  # cap the k largest at t = max_share * (k t + rest), i.e. t = max_share * rest / (1 - k max_share)
        if level is not None:
            break
        rest = math.fsum(ordered[k:])  # summed afresh: subtracting would cancel when counts differ by 10^12
        if k * max_share >= 1:
            break
        t = max_share * rest / (1 - k * max_share)
        if ordered[k] <= t <= ordered[k - 1]:
            level = t
    if level is None:
        return {s: 1.0 / n for s in counts}
    capped = {s: min(v, level) for s, v in w.items()}
    total = sum(capped.values())
    return {s: v / total for s, v in capped.items()}


def check_aggregate(new_state: Mapping[str, torch.Tensor], previous: Mapping[str, torch.Tensor],
                    max_change_norm: float | None) -> str | None:
    """Why a round's new global adapter must not be used, or None if it may.

    Args:
        new_state: The aggregate.
        previous: The global adapter before the round (same keys).
        max_change_norm: Largest allowed L2 norm of `new - previous` (None: only finiteness is checked).

    Returns:
        A reason (`non_finite: ...`, `norm: ...`, `manifest: ...`), or None.
    """
    if new_state.keys() != previous.keys():
        return "manifest: the aggregate's tensor names differ from the global adapter's"
    change_sq = 0.0
    for key, tensor in new_state.items():
        if not bool(torch.isfinite(tensor).all()):
            return f"non_finite: the aggregate holds NaN or infinite values in {key!r}"
        diff = tensor.detach().to(torch.float32) - previous[key].detach().to(torch.float32)
        change_sq += float(torch.linalg.vector_norm(diff, dtype=torch.float64)) ** 2
    change = math.sqrt(change_sq)
    if not math.isfinite(change):
        return "non_finite: the aggregate's change has an infinite norm"
    if max_change_norm is not None and change > max_change_norm:
        return f"norm: the aggregate changes the global adapter by L2 norm {change:.4g} > {max_change_norm}"
    return None


def _apply_delta(
    global_state: Mapping[str, torch.Tensor], delta: Mapping[str, torch.Tensor], lr: float = 1.0
) -> StateDict:
    """`global + lr * delta`, float32 maths, cast back to the global dtypes. A new dict."""
    return {
        k: (g.detach().to(torch.float32) + lr * delta[k].to(torch.float32)).to(g.dtype) for k, g in global_state.items()
    }


def weighted_mean(updates: Sequence[tuple[Mapping[str, torch.Tensor], int | float]]) -> StateDict:
    """Example-weighted mean `sum(n_i * u_i) / sum(n_i)` of updates with identical keys and shapes.

    Args:
        updates: `(update, weight)` pairs; weights > 0.

    Returns:
        A new float32 state dict.
    """
    if not updates:
        raise ValueError("weighted_mean needs at least one update")
    acc = StreamingAccumulator(updates[0][0])
    for i, (update, weight) in enumerate(updates):
        acc.add(f"#{i}", update, weight)  # type: ignore[arg-type]
    return acc.mean()


def _stack(updates: Sequence[Mapping[str, torch.Tensor]], key: str) -> torch.Tensor:
    return torch.stack([u[key].to(torch.float32) for u in updates])  # (silos, *shape)


def coordinate_median(updates: Sequence[Mapping[str, torch.Tensor]]) -> StateDict:
    """Coordinate-wise median (unweighted); for an even count the mean of the two middle values."""
    if not updates:
        raise ValueError("coordinate_median needs at least one update")
    n = len(updates)
    out: StateDict = {}
    for key in updates[0]:
        ordered = torch.sort(_stack(updates, key), dim=0).values
        if n % 2:
            out[key] = ordered[n // 2].clone()
        else:
            out[key] = (ordered[n // 2 - 1] + ordered[n // 2]) / 2
    return out


def trimmed_mean(updates: Sequence[Mapping[str, torch.Tensor]], trim_ratio: float) -> StateDict:
    """Coordinate-wise mean after dropping the `floor(trim_ratio * n)` largest and smallest values (unweighted).

    Raises:
        ValueError: if `trim_ratio` is outside [0, 0.5) or nothing would be left.
    """
    if not 0 <= trim_ratio < 0.5:
        raise ValueError(f"trim_ratio must be in [0, 0.5), got {trim_ratio}")
    n = len(updates)
    cut = int(math.floor(trim_ratio * n))
    if n - 2 * cut < 1:
        raise ValueError(f"trimmed_mean: trimming {cut} from each end of {n} updates leaves none")
    out: StateDict = {}
    for key in updates[0]:
        ordered = torch.sort(_stack(updates, key), dim=0).values
        out[key] = ordered[cut : n - cut].mean(dim=0)
    return out


def _pairwise_sq_distances(updates: Sequence[Mapping[str, torch.Tensor]]) -> torch.Tensor:
    """(n, n) float64 squared L2 distances between whole updates, accumulated key by key."""
    n = len(updates)
    dist = torch.zeros(n, n, dtype=torch.float64)
    for key in updates[0]:
        flat = torch.stack([u[key].reshape(-1).to(torch.float64) for u in updates])  # (n, numel)
        dist += torch.cdist(flat, flat) ** 2
    return dist


def krum_select(updates: Sequence[Mapping[str, torch.Tensor]], num_byzantine: int, num_selected: int = 1) -> list[int]:
    """Indices chosen by (multi-)Krum (Blanchard et al. 2017).

    Each update is scored by the sum of squared distances to its `n - f - 2` nearest other updates (at least 1
    neighbour when `n < f + 3`); the `num_selected` lowest scores win.

    Args:
        updates: The candidate updates.
        num_byzantine: `f`, the number of malicious silos tolerated.
        num_selected: How many to select (1 = Krum).

    Returns:
        Selected indices, best first.
    """
    n = len(updates)
    if n == 0:
        raise ValueError("krum needs at least one update")
    if not 1 <= num_selected <= n:
        raise ValueError(f"num_selected must be in [1, {n}], got {num_selected}")
    if n < 2 * num_byzantine + 3:
        logger.warning("krum: %d updates cannot tolerate %d byzantine silos (needs n >= 2f+3)", n, num_byzantine)
    if n == 1:
        return [0]
    neighbours = max(n - num_byzantine - 2, 1)
    dist = _pairwise_sq_distances(updates)
    scores = []
    for i in range(n):
        others = torch.cat([dist[i, :i], dist[i, i + 1 :]])
        scores.append(float(torch.sort(others).values[:neighbours].sum()))
    order = sorted(range(n), key=lambda i: (scores[i], i))
    return order[:num_selected]


# --------------------------------------------------------------------------------------------------------------
# Accumulators
# --------------------------------------------------------------------------------------------------------------
class _AccumulatorBase:
    def __init__(self, reference: Mapping[str, torch.Tensor]) -> None:
        # Only keys and shapes are needed from the reference: keep meta tensors, not a copy of the data.
        self._reference = {k: torch.empty(v.shape, device="meta") for k, v in reference.items()}
        self.silo_ids: list[str] = []
        self.examples: dict[str, int] = {}

    @property
    def count(self) -> int:
        """Number of updates accepted so far."""
        return len(self.silo_ids)

    @property
    def total_examples(self) -> int:
        """Sum of the accepted updates' example counts."""
        return sum(self.examples.values())

    def _check(self, silo_id: str, update: Mapping[str, torch.Tensor], num_examples: int | float) -> None:
        if silo_id in self.examples:
            raise ValueError(f"update from silo {silo_id!r}: this silo already sent an update this round")
        if not num_examples > 0:
            raise ValueError(f"update from silo {silo_id!r}: num_examples must be > 0, got {num_examples}")
        check_update(silo_id, update, self._reference)

    def _record(self, silo_id: str, num_examples: int | float) -> None:
        self.silo_ids.append(silo_id)
        self.examples[silo_id] = num_examples  # type: ignore[assignment]


class StreamingAccumulator(_AccumulatorBase):
    """Running example-weighted float32 sum: memory is one adapter, whatever the number of silos."""

    def __init__(self, reference: Mapping[str, torch.Tensor]) -> None:
        super().__init__(reference)
        self._sum: StateDict = {k: torch.zeros(v.shape, dtype=torch.float32) for k, v in reference.items()}
        self._weight = 0.0

    def add(self, silo_id: str, update: StateDict, num_examples: int) -> None:
        """Add `num_examples * update` to the running sum (after `check_update`)."""
        self._check(silo_id, update, num_examples)
        for key, total in self._sum.items():
            total.add_(update[key].detach().to(torch.float32), alpha=float(num_examples))
        self._weight += float(num_examples)
        self._record(silo_id, num_examples)

    def mean(self) -> StateDict:
        """The weighted mean of the updates so far (a new dict)."""
        return _weighted_sum_mean(self._sum, self._weight)


def _weighted_sum_mean(total: StateDict, weight: float) -> StateDict:
    """`total / weight` per tensor (a new dict); the mean of a running example-weighted sum."""
    if weight <= 0:
        raise ValueError("no updates were accumulated")
    return {k: v / weight for k, v in total.items()}


class StoringAccumulator(_AccumulatorBase):
    """Keeps every update (float32) for strategies that must compare them (median, trimmed mean, Krum)."""

    def __init__(self, reference: Mapping[str, torch.Tensor]) -> None:
        super().__init__(reference)
        self.updates: list[StateDict] = []

    def add(self, silo_id: str, update: StateDict, num_examples: int) -> None:
        """Store a float32 copy of `update` (after `check_update`)."""
        self._check(silo_id, update, num_examples)
        self.updates.append({k: v.detach().to(torch.float32).clone() for k, v in update.items()})
        self._record(silo_id, num_examples)


class ClippedAccumulator:
    """Clips each update to a global L2 norm before handing it to an inner accumulator.

    Args:
        inner: The accumulator that receives the clipped updates.
        max_norm: Clip bound.
        uniform_weights: Pass `num_examples=1` on (as central DP needs, so one silo's weight is bounded).
    """

    def __init__(self, inner: Any, max_norm: float, *, uniform_weights: bool = False) -> None:
        self.inner = inner
        self.max_norm = max_norm
        self.uniform_weights = uniform_weights
        self.norms: dict[str, float] = {}

    def add(self, silo_id: str, update: StateDict, num_examples: int) -> None:
        """Check, clip and forward one update; its pre-clip norm is kept in `norms`."""
        if silo_id in self.norms:
            raise ValueError(f"update from silo {silo_id!r}: this silo already sent an update this round")
        check_update(silo_id, update, _unwrap(self.inner)._reference)
        clipped, norm = clip_update(update, self.max_norm)
        self.inner.add(silo_id, clipped, 1 if self.uniform_weights else num_examples)
        self.norms[silo_id] = norm

    @property
    def count(self) -> int:
        """Number of updates accepted so far."""
        return self.inner.count

    @property
    def total_examples(self) -> int:
        """Example counts as the inner accumulator saw them."""
        return self.inner.total_examples

    @property
    def silo_ids(self) -> list[str]:
        """Silos whose updates were accepted."""
        return self.inner.silo_ids


class ProductAccumulator(_AccumulatorBase):
    """Running example-weighted sum of each silo's dense weight change `s_i B_i' A_i' - s_i B_i A_i`.

    Each silo's update is checked against, and multiplied out from, the state it was sent (`set_base`; the
    global state by default), so silos may train at different ranks. Memory: one dense adapter (see
    `federation.lora_aggregate`), whatever the number of silos.
    """

    def __init__(self, global_state: Mapping[str, torch.Tensor], scale: float) -> None:
        super().__init__(global_state)
        self._global = {k: v.detach().to(torch.float32) for k, v in global_state.items()}
        self.scale = scale
        self._bases: dict[str, tuple[StateDict, float]] = {}
        self._sum: StateDict = {}
        self._weight = 0.0

    def set_base(self, silo_id: str, base: Mapping[str, torch.Tensor], scale: float) -> None:
        """The state (and its lora_alpha / r) that `silo_id` was sent this round."""
        self._bases[silo_id] = ({k: v.detach().to(torch.float32) for k, v in base.items()}, scale)

    def base_for(self, silo_id: str) -> tuple[StateDict, float]:
        """(state, scale) the silo's update is relative to."""
        return self._bases.get(silo_id, (self._global, self.scale))

    def add(self, silo_id: str, update: StateDict, num_examples: int) -> None:
        """Add `num_examples * (silo's dense weight change)` to the running sum."""
        if silo_id in self.examples:
            raise ValueError(f"update from silo {silo_id!r}: this silo already sent an update this round")
        if not num_examples > 0:
            raise ValueError(f"update from silo {silo_id!r}: num_examples must be > 0, got {num_examples}")
        base, scale = self.base_for(silo_id)
        check_update(silo_id, update, base)
        for prefix, d in la.product_delta(base, update, scale).items():
            if prefix in self._sum:
                self._sum[prefix].add_(d, alpha=float(num_examples))
            else:
                self._sum[prefix] = d * float(num_examples)
        self._weight += float(num_examples)
        self._record(silo_id, num_examples)

    def mean(self) -> StateDict:
        """The weighted mean dense weight change `{prefix: (out, in)}` (a new dict)."""
        return _weighted_sum_mean(self._sum, self._weight)


def _unwrap(acc: Any) -> Any:
    while isinstance(acc, ClippedAccumulator):
        acc = acc.inner
    return acc


# --------------------------------------------------------------------------------------------------------------
# Strategies
# --------------------------------------------------------------------------------------------------------------
class BaseStrategy:
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
                round_id, count, self.min_results, failures,
            )
            return False
        if failures and not self.accept_failures:
            logger.warning("round %d: %d silo(s) failed %s and accept_failures=False; keeping the previous global "
                           "state", round_id, len(failures), failures)
            return False
        return True

    def aggregate(self, acc: RoundAccumulator) -> StateDict:
        """The round's aggregated delta (float32)."""
        raise NotImplementedError

    def apply_delta(self, round_id: int, global_state: StateDict, delta: StateDict) -> StateDict:
        """New global state from an aggregated delta; plain `global + delta` by default."""
        return _apply_delta(global_state, delta)

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

    def __init__(self, *, server_lr: float = 1.0, **kw: Any) -> None:
        super().__init__(**kw)
        self.server_lr = server_lr

    def aggregate(self, acc: RoundAccumulator) -> StateDict:
        """Weighted mean delta."""
        return _unwrap(acc).mean()

    def apply_delta(self, round_id: int, global_state: StateDict, delta: StateDict) -> StateDict:
        """`global + server_lr * delta`."""
        return _apply_delta(global_state, delta, self.server_lr)


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
        return _apply_delta(global_state, new_velocity, self.server_lr)


class FedAdam(_ServerOptimiser):
    """Server Adam on the pseudo-gradient (Reddi et al. 2021, "Adaptive Federated Optimization", Alg. 2).

    With the mean delta `d`: `m = b1*m + (1-b1)*d`, `v = b2*v + (1-b2)*d^2`, `w = w + server_lr * m / (sqrt(v) + tau)`.
    As in the paper: no bias correction, `m` starts at 0 and `v` at `tau^2`.
    """

    name = "fedadam"
    slots = ("m", "v")

    def __init__(self, *, server_lr: float = 0.01, beta_1: float = 0.9, beta_2: float = 0.99, tau: float = 1e-3,
                 **kw: Any) -> None:
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
        return _apply_delta(global_state, step, self.server_lr)


class FedYogi(FedAdam):
    """FedAdam with Yogi's second moment: `v = v - (1-b2) * d^2 * sign(v - d^2)` (Reddi et al. 2021)."""

    name = "fedyogi"

    def _second_moment(self, v: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
        d2 = d * d
        return v - (1 - self.beta_2) * d2 * torch.sign(v - d2)


class Median(BaseStrategy):
    """Coordinate-wise median of the updates (Yin et al. 2018). Keeps all updates (memory grows with silos)."""

    name = "median"
    streaming = False

    def aggregate(self, acc: RoundAccumulator) -> StateDict:
        """Coordinate median delta."""
        return coordinate_median(_unwrap(acc).updates)


class TrimmedMean(BaseStrategy):
    """Coordinate-wise trimmed mean (Yin et al. 2018). Keeps all updates (memory grows with silos)."""

    name = "trimmed_mean"
    streaming = False

    def __init__(self, *, trim_ratio: float = 0.2, **kw: Any) -> None:
        super().__init__(**kw)
        if not 0 <= trim_ratio < 0.5:
            raise ValueError(f"trim_ratio must be in [0, 0.5), got {trim_ratio}")
        self.trim_ratio = trim_ratio

    def aggregate(self, acc: RoundAccumulator) -> StateDict:
        """Trimmed mean delta."""
        return trimmed_mean(_unwrap(acc).updates, self.trim_ratio)


class Krum(BaseStrategy):
    """Krum (`num_selected=1`) or multi-Krum (mean of the `num_selected` best; default `n - f`).

    Keeps all updates (memory grows with silos). The multi-Krum mean is unweighted, as in Blanchard et al. 2017.
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
        inner = _unwrap(acc)
        n = len(inner.updates)
        m = self.num_selected if self.num_selected is not None else max(n - self.num_byzantine, 1)
        chosen = krum_select(inner.updates, self.num_byzantine, min(m, n))
        self.last_selected = [inner.silo_ids[i] for i in chosen]
        logger.info("krum selected %s", self.last_selected)
        return weighted_mean([(inner.updates[i], 1) for i in chosen])


class StrategyWrapper:
    """Base of the wrappers (clipping, DP): delegates every `Strategy` method to `inner`; subclasses override some.

    Args:
        inner: The wrapped strategy; the wrapper takes its `name`.
    """

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.name = inner.name

    def plan_round(self, round_id: int) -> dict:
        """The inner strategy's plan."""
        return self.inner.plan_round(round_id)

    def start_round(self, round_id: int, global_state: StateDict) -> RoundAccumulator:
        """The inner strategy's accumulator."""
        return self.inner.start_round(round_id, global_state)

    def finish_round(
        self, round_id: int, global_state: StateDict, acc: RoundAccumulator, failures: list[str]
    ) -> StateDict | None:
        """The inner strategy's result."""
        return self.inner.finish_round(round_id, global_state, acc, failures)

    def state_dict(self) -> StateDict:
        """The inner strategy's state."""
        return self.inner.state_dict()

    def load_state_dict(self, state: StateDict) -> None:
        """Restore the inner strategy's state."""
        self.inner.load_state_dict(state)


def innermost(strategy: Any) -> Any:
    """The strategy under every wrapper."""
    while isinstance(strategy, StrategyWrapper):
        strategy = strategy.inner
    return strategy


def is_wrapped_by(strategy: Any, wrapper: type) -> bool:
    """Whether `strategy` is, or wraps somewhere inside it, a `wrapper` instance."""
    while True:
        if isinstance(strategy, wrapper):
            return True
        if not isinstance(strategy, StrategyWrapper):
            return False
        strategy = strategy.inner


class Clipped(StrategyWrapper):
    """Wrapper strategy: clip every update to a global L2 norm `max_norm` before the inner strategy sees it."""

    def __init__(self, inner: BaseStrategy, max_norm: float) -> None:
        if max_norm <= 0:
            raise ValueError(f"max_norm must be > 0, got {max_norm}")
        super().__init__(inner)
        self.max_norm = max_norm

    def start_round(self, round_id: int, global_state: StateDict) -> RoundAccumulator:
        """The inner accumulator behind a clipping one."""
        return ClippedAccumulator(self.inner.start_round(round_id, global_state), self.max_norm)


LORA_AGGREGATIONS: tuple[str, ...] = ("factors", "product", "frozen_a")
_MEAN_BASED = (FedAvg,)  # FedAvg and its server-optimiser / FedProx subclasses


class ProductAggregation:
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
        lora_alpha: the global adapter's lora_alpha (the coordinator binds its train.lora_alpha).
    """

    def __init__(self, server: BaseStrategy, *, lora_alpha: float | None = None) -> None:
        if not isinstance(server, _MEAN_BASED):
            raise ValueError(f"lora_aggregation=product composes with mean-based strategies (fedavg fedprox fedavgm "
                             f"fedadam fedyogi), not {server.name!r}")
        self.server = server
        self.lora_alpha = lora_alpha
        self.name = f"{server.name}+product"

    def bind_lora(self, lora_alpha: float) -> None:
        """Set the global adapter's lora_alpha when it was not given."""
        if self.lora_alpha is None:
            self.lora_alpha = float(lora_alpha)

    def _scale(self, state: Mapping[str, torch.Tensor]) -> float:
        return la.lora_scale(self.lora_alpha, la.lora_rank(state)) if self.lora_alpha else 1.0

    def state_for_silo(self, global_state: StateDict, lora_r: int | None, lora_alpha: float | None) -> tuple[StateDict, float]:
        """(the state to send a silo training at rank `lora_r`, its scale); the global state at the global rank."""
        scale = self._scale(global_state)
        if lora_r is None or lora_r == la.lora_rank(global_state) and (lora_alpha is None or
                                                                     math.isclose(lora_alpha / lora_r, scale)):
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
        dense_new = self.server.apply_delta(round_id, dense_global, _unwrap(acc).mean())
        return la.refactorize(dense_new, global_state, la.lora_rank(global_state), scale)

    def state_dict(self) -> StateDict:
        """The server optimiser's state (dense moments keyed by module)."""
        return self.server.state_dict()

    def load_state_dict(self, state: StateDict) -> None:
        """Restore the server optimiser's state."""
        self.server.load_state_dict(state)


class FrozenA(StrategyWrapper):
    """Frozen-A LoRA (FFA-LoRA-style) around any strategy: silos train B only, A stays the shared seeded init.

    `plan_round` asks silos for `lora_freeze_a`; every aggregated delta has its lora_A part zeroed before the
    server step, so A never moves (also under DP noise) and averaging B is exact: mean(B_i) A = mean(B_i A).
    Server optimisers compose unchanged (a zero A pseudo-gradient leaves momentum and Adam moments of A at zero).
    """

    def __init__(self, inner: BaseStrategy) -> None:
        super().__init__(inner)
        self.name = f"{inner.name}+frozen_a"

    def __getattr__(self, name: str) -> Any:
        # what a wrapped DP strategy offers beyond `Strategy` (epsilon, accounting) stays reachable
        if name == "inner":
            raise AttributeError(name)
        return getattr(self.inner, name)

    @property
    def streaming(self) -> bool:
        """The inner strategy's accumulator kind."""
        return self.inner.streaming

    def plan_round(self, round_id: int) -> dict:
        """The inner plan plus `lora_freeze_a`."""
        return {**self.inner.plan_round(round_id), "lora_freeze_a": True}

    def round_counts(self, round_id: int, acc: RoundAccumulator, failures: list[str]) -> bool:
        """The inner rule."""
        return self.inner.round_counts(round_id, acc, failures)

    def aggregate(self, acc: RoundAccumulator) -> StateDict:
        """The inner aggregate with its lora_A part zeroed."""
        return la.zero_lora_a(self.inner.aggregate(acc))

    def apply_delta(self, round_id: int, global_state: StateDict, delta: StateDict) -> StateDict:
        """The inner server step on a delta whose lora_A part is zero."""
        return self.inner.apply_delta(round_id, global_state, la.zero_lora_a(delta))

    def finish_round(
        self, round_id: int, global_state: StateDict, acc: RoundAccumulator, failures: list[str]
    ) -> StateDict | None:
        """Aggregate and apply with A held fixed; None if the round does not count.

        Around a plain strategy the A part of the pseudo-gradient is zeroed before the server step (its optimiser
        state for A stays zero); around a wrapper (DP) the wrapper's result gets the global A back.
        """
        if isinstance(self.inner, BaseStrategy):
            if not self.round_counts(round_id, acc, failures):
                return None
            return self.apply_delta(round_id, global_state, self.aggregate(acc))
        new_state = self.inner.finish_round(round_id, global_state, acc, failures)
        if new_state is None:
            return None
        return {k: global_state[k].clone() if k.endswith(la.A_SUFFIX) else v for k, v in new_state.items()}


def _fedavg_factory(**kw: Any) -> FedAvg:
    """FedAvg for the LoRA-aware names (a function, so `mean_strategy_names` lists only plain mean strategies)."""
    return FedAvg(**kw)


_REGISTRY: dict[str, Any] = {
    "fedavg": FedAvg,
    "fedprox": FedProx,
    "fedavgm": FedAvgM,
    "fedadam": FedAdam,
    "fedyogi": FedYogi,
    "median": Median,
    "trimmed_mean": TrimmedMean,
    "krum": Krum,
    "multikrum": Krum,
    "flexlora": _fedavg_factory,  # FedAvg with lora_aggregation=product
    "ffa": _fedavg_factory,  # FedAvg with lora_aggregation=frozen_a
}
_DEFAULT_LORA_AGGREGATION = {"flexlora": "product", "ffa": "frozen_a"}
STRATEGY_NAMES: tuple[str, ...] = tuple(_REGISTRY)


def mean_strategy_names() -> tuple[str, ...]:
    """The registered strategies that aggregate by an example-weighted mean (FedAvg and its server optimisers)."""
    return tuple(name for name, cls in _REGISTRY.items() if isinstance(cls, type) and issubclass(cls, FedAvg))


def make_strategy(name: str, **params: Any) -> Strategy:
    """Build a strategy by name.

    Args:
        name: One of `STRATEGY_NAMES` (fedavg fedprox fedavgm fedadam fedyogi median trimmed_mean krum multikrum
            flexlora ffa; flexlora = fedavg with product aggregation, ffa = fedavg with frozen A).
        **params: Constructor arguments (`min_results`, `accept_failures`, `server_lr`, `prox_mu`,
            `server_momentum`, `beta_1`, `beta_2`, `tau`, `trim_ratio`, `num_byzantine`, `num_selected`), plus
            `clip_norm` to wrap the strategy in `Clipped`, `lora_aggregation` (factors | product | frozen_a:
            how LoRA's A and B are combined, see `LORA_AGGREGATIONS`) and `lora_alpha` (product aggregation).
            `None` values are ignored (use the default).

    Raises:
        ValueError: for an unknown name or parameter.
    """
    key = name.lower().replace("-", "_")
    if key not in _REGISTRY:
        raise ValueError(f"unknown strategy {name!r}; expected one of {', '.join(STRATEGY_NAMES)}")
    params = {k: v for k, v in params.items() if v is not None}
    clip_norm = params.pop("clip_norm", None)
    lora_alpha = params.pop("lora_alpha", None)
    aggregation = params.pop("lora_aggregation", _DEFAULT_LORA_AGGREGATION.get(key, "factors"))
    if aggregation not in LORA_AGGREGATIONS:
        raise ValueError(f"unknown lora_aggregation {aggregation!r}; expected one of {', '.join(LORA_AGGREGATIONS)}")
    if aggregation == "product" and clip_norm is not None:
        raise ValueError("lora_aggregation=product does not take clip_norm (it clips factors, not the products)")
    if key == "multikrum":
        params.setdefault("num_selected", None)
    try:
        strategy = _REGISTRY[key](**params)
    except TypeError as exc:
        raise ValueError(f"strategy {name!r}: bad parameters {sorted(params)}: {exc}") from exc
    strategy.name = key if key not in _DEFAULT_LORA_AGGREGATION else "fedavg"
    if aggregation == "product":
        strategy = ProductAggregation(strategy, lora_alpha=lora_alpha)
    elif aggregation == "frozen_a":
        strategy = FrozenA(strategy)
    if key in _DEFAULT_LORA_AGGREGATION:
        strategy.name = key
    return Clipped(strategy, clip_norm) if clip_norm is not None else strategy
