"""How large a message and an update may be: the coordinator's default bounds, derived from the round, not fixed.

* Messages: `message_bound` sizes ZMQ_MAXMSGSIZE from the global adapter (an UPDATE is at most the adapter in fp32
  plus a header), so a silo cannot make the coordinator read 256 MiB for a 2 MiB adapter.
* Updates: `adaptive_norm_bound` is a multiple of the round's median update L2 norm (the lower median, so one outlier
  among 3, or 1 of 2, never sets it), with a floor; `clip_round` clips every update above it and says whose.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Mapping

if TYPE_CHECKING:
    from fedllm.core.types import StateDict
    from fedllm.federation.aggregation.server_strategies import Strategy

MIN_MESSAGE_BYTES = 1 << 20  # an empty adapter's messages still fit (headers, SECAGG steps)
HEADER_ALLOWANCE = 1 << 20  # protocol.MAX_HEADER_BYTES: the header frame on top of the payload
SILO_MAX_MESSAGE_BYTES = 256 << 20  # a silo does not know the adapter's size before its first TRAIN


def adapter_bytes(state: "StateDict") -> int:
    """The adapter's size in fp32 bytes (the largest encoding a silo may send)."""
    return sum(t.numel() * 4 for t in state.values())


def message_bound(max_message_bytes: int | None, state: "StateDict") -> int:
    """The largest message the coordinator reads: `max_message_bytes` when set, else max(1 MiB, 4 x the adapter's
    fp32 bytes + the header allowance) (4x: room for top-k indices and SECAGG's 64-bit words)."""
    if max_message_bytes is not None:
        return max_message_bytes
    return max(MIN_MESSAGE_BYTES, 4 * adapter_bytes(state) + HEADER_ALLOWANCE)


def lower_median(values: list[float]) -> float:
    """The lower median (for 2 values, the smaller): one large outlier cannot raise it."""
    ordered = sorted(values)
    return ordered[(len(ordered) - 1) // 2]


def adaptive_norm_bound(norms: Mapping[str, float], cfg: Any) -> float | None:
    """The round's update norm bound: `max_update_norm` when set, else max(`update_norm_floor`,
    `update_norm_multiple` x the lower median of `norms`); None without any norm."""
    if cfg.max_update_norm is not None:
        return float(cfg.max_update_norm)
    if not norms:
        return None
    return max(float(cfg.update_norm_floor), float(cfg.update_norm_multiple) * lower_median(list(norms.values())))


def clip_round(updates: dict[str, "StateDict"], bound: float) -> dict[str, dict[str, float]]:
    """Clip (in place) every update whose L2 norm exceeds `bound` down to it.

    Returns:
        silo -> {"norm": its norm before, "clipped_to": bound} for each clipped silo (the round record's `clipped`).
    """
    from fedllm.federation.aggregation.aggregate import clip_update

    clipped: dict[str, dict[str, float]] = {}
    for sid in sorted(updates):
        new, norm = clip_update(updates[sid], bound)
        if norm > bound:
            updates[sid] = new
            clipped[sid] = {"norm": float(norm), "clipped_to": float(bound)}
    return clipped


def norms_of(updates: Mapping[str, "StateDict"]) -> dict[str, float]:
    """silo -> the global L2 norm of its update."""
    from fedllm.federation.aggregation.aggregate import global_norm

    return {sid: global_norm(u) for sid, u in updates.items()}


def aggregate_bound(cfg: Any, strategy: "Strategy", round_bound: float | None) -> float | None:
    """The bound on the global adapter's change in a round: `max_aggregate_norm`, else `max_update_norm`, else the
    strategy's `change_bound` of the round's adaptive bound (FedAvg: times its server_lr) without DP (a weighted mean
    of updates clipped to B moves by at most B); None where no such bound holds (server optimisers, robust
    strategies, product aggregation, DP noise): the per-update clip still bounds what goes in."""
    if cfg.max_aggregate_norm is not None:
        return float(cfg.max_aggregate_norm)
    if cfg.max_update_norm is not None:
        return float(cfg.max_update_norm)
    if round_bound is None or cfg.dp_mode != "off":
        return None
    bound = strategy.change_bound(round_bound)
    return None if bound is None else bound * (1 + 1e-4)  # float32 rounding slack
