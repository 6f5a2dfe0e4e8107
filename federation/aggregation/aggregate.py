"""Pure aggregation maths over adapter updates (`dict[str, Tensor]`): checks, norms, clipping, weights, means and
the robust estimators (median, trimmed mean, Krum). No state, sockets, files or clocks; float32 maths on the CPU.

The strategies (`fedllm.federation.aggregation.server_strategies`) and the accumulators
(`fedllm.federation.aggregation.accumulators`) are built on these; `fedllm.federation.aggregation.lora_aggregate` holds
the LoRA-specific maths (products, SVD re-factorisation).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence

import torch

from fedllm.core.types import StateDict

logger = logging.getLogger(__name__)

__all__ = [
    "InvalidUpdate",
    "check_update",
    "global_norm",
    "clip_update",
    "capped_weights",
    "check_aggregate",
    "add_delta",
    "mean_of_sum",
    "weighted_mean",
    "coordinate_median",
    "trimmed_mean",
    "krum_select",
]


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
        raise InvalidUpdate(
            "manifest", f"update from silo {silo_id!r}: key {missing[0]!r} is missing ({len(missing)} missing)"
        )
    if extra:
        raise InvalidUpdate(
            "manifest", f"update from silo {silo_id!r}: key {extra[0]!r} is unexpected ({len(extra)} unexpected)"
        )
    for key in sorted(reference):
        tensor = update[key]
        if not isinstance(tensor, torch.Tensor):
            raise InvalidUpdate(
                "bad_dtype", f"update from silo {silo_id!r}: key {key!r} is a {type(tensor).__name__}, not a tensor"
            )
        if tuple(tensor.shape) != tuple(reference[key].shape):
            raise InvalidUpdate(
                "bad_shape",
                f"update from silo {silo_id!r}: key {key!r} has shape {tuple(tensor.shape)}, "
                f"expected {tuple(reference[key].shape)}",
            )
        if not tensor.is_floating_point():
            raise InvalidUpdate(
                "bad_dtype", f"update from silo {silo_id!r}: key {key!r} has dtype {tensor.dtype}, expected floating"
            )
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
    for k in range(
        1, n
    ):  # cap the k largest at t = max_share * (k t + rest), i.e. t = max_share * rest / (1 - k max_share)
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


def check_aggregate(
    new_state: Mapping[str, torch.Tensor], previous: Mapping[str, torch.Tensor], max_change_norm: float | None
) -> str | None:
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


def add_delta(
    global_state: Mapping[str, torch.Tensor], delta: Mapping[str, torch.Tensor], lr: float = 1.0
) -> StateDict:
    """`global + lr * delta`, float32 maths, cast back to the global dtypes. A new dict."""
    return {
        k: (g.detach().to(torch.float32) + lr * delta[k].to(torch.float32)).to(g.dtype) for k, g in global_state.items()
    }


def mean_of_sum(total: StateDict, weight: float) -> StateDict:
    """`total / weight` per tensor (a new dict); the mean of a running example-weighted sum."""
    if weight <= 0:
        raise ValueError("no updates were accumulated")
    return {k: v / weight for k, v in total.items()}


def weighted_mean(updates: Sequence[tuple[Mapping[str, torch.Tensor], int | float]]) -> StateDict:
    """Example-weighted mean `sum(n_i * u_i) / sum(n_i)` of updates with identical keys and shapes.

    Args:
        updates: `(update, weight)` pairs; weights > 0 (each checked against the first with `check_update`, named
            `#i`).

    Returns:
        A new float32 state dict.
    """
    if not updates:
        raise ValueError("weighted_mean needs at least one update")
    reference = updates[0][0]
    total: StateDict = {k: torch.zeros(v.shape, dtype=torch.float32) for k, v in reference.items()}
    weight = 0.0
    for i, (update, num_examples) in enumerate(updates):
        if not num_examples > 0:
            raise ValueError(f"update from silo '#{i}': num_examples must be > 0, got {num_examples}")
        check_update(f"#{i}", update, reference)
        for key, running in total.items():
            running.add_(update[key].detach().to(torch.float32), alpha=float(num_examples))
        weight += float(num_examples)
    return mean_of_sum(total, weight)


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
