"""Round accumulators: what collects one round's updates as they arrive, checked against the global adapter.

Streaming accumulators (FedAvg and its server optimisers; LoRA products) keep one running float32 weighted sum, so
their memory does not grow with the number of silos; the storing one (median, trimmed mean, Krum) keeps every update
(about `silos x adapter size x 4 bytes` in RAM, or on disk once the coordinator attached a spool: then RAM is
`silos x the largest tensor` while the strategy works key by key, see `fedllm.federation.aggregation.update_spool`); the
clipping one wraps either and clips each update first.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol, runtime_checkable

import torch

from fedllm.core.types import StateDict
from fedllm.federation.aggregation import lora_aggregate as la
from fedllm.federation.aggregation.aggregate import check_update, clip_update, mean_of_sum

__all__ = [
    "RoundAccumulator",
    "StreamingAccumulator",
    "StoringAccumulator",
    "ClippedAccumulator",
    "ProductAccumulator",
]


@runtime_checkable
class RoundAccumulator(Protocol):
    """Collects the updates of one round as they arrive."""

    def add(self, silo_id: str, update: StateDict, num_examples: int) -> None:
        """Take one silo's update; raise ValueError naming the silo and the first bad key."""
        ...


class _AccumulatorBase:
    def __init__(self, reference: Mapping[str, torch.Tensor]) -> None:
        # Only keys and shapes are needed from the reference: keep meta tensors, not a copy of the data.
        self._expected = {k: torch.empty(v.shape, device="meta") for k, v in reference.items()}
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
        self.check(silo_id, update)

    def check(self, silo_id: str, update: Mapping[str, torch.Tensor]) -> None:
        """`check_update` against the keys and shapes this accumulator expects (raises InvalidUpdate)."""
        check_update(silo_id, update, self._expected)

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
        return mean_of_sum(self._sum, self._weight)


class StoringAccumulator(_AccumulatorBase):
    """Keeps every update (float32) for strategies that must compare them (median, trimmed mean, Krum)."""

    def __init__(self, reference: Mapping[str, torch.Tensor]) -> None:
        super().__init__(reference)
        self.updates: list[Mapping[str, torch.Tensor]] = []
        self._spool: Any = None  # a fedllm.federation.aggregation.update_spool.UpdateSpool once `spool_to` was called

    def spool_to(self, directory: Any) -> None:
        """Keep the updates added from now on in `directory` (safetensors) instead of RAM: `updates` then holds
        `SpooledUpdate`s that read one tensor per access (see `fedllm.federation.aggregation.update_spool`)."""
        from fedllm.federation.aggregation.update_spool import UpdateSpool

        self._spool = UpdateSpool(directory)

    def add(self, silo_id: str, update: StateDict, num_examples: int) -> None:
        """Store a float32 copy of `update` (after `check_update`): in RAM, or in the spool when one is attached."""
        self._check(silo_id, update, num_examples)
        if self._spool is not None:
            self._spool[silo_id] = update
            self.updates.append(self._spool.lazy(silo_id))
        else:
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
        self.inner.check(silo_id, update)
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

    @property
    def updates(self) -> list[StateDict]:
        """The inner accumulator's stored (clipped) updates (storing accumulators only)."""
        return self.inner.updates

    def check(self, silo_id: str, update: Mapping[str, torch.Tensor]) -> None:
        """The inner accumulator's check."""
        self.inner.check(silo_id, update)

    def mean(self) -> StateDict:
        """The inner accumulator's mean of the clipped updates (streaming accumulators only)."""
        return self.inner.mean()


class ProductAccumulator(_AccumulatorBase):
    """Running example-weighted sum of each silo's dense weight change `s_i B_i' A_i' - s_i B_i A_i`.

    Each silo's update is checked against, and multiplied out from, the state it was sent (`set_base`; the
    global state by default), so silos may train at different ranks. Memory: one dense adapter (see
    `fedllm.federation.aggregation.lora_aggregate`), whatever the number of silos.
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

    def check(self, silo_id: str, update: Mapping[str, torch.Tensor]) -> None:
        """`check_update` against the state the silo was sent (its own rank)."""
        check_update(silo_id, update, self.base_for(silo_id)[0])

    def add(self, silo_id: str, update: StateDict, num_examples: int) -> None:
        """Add `num_examples * (silo's dense weight change)` to the running sum."""
        if silo_id in self.examples:
            raise ValueError(f"update from silo {silo_id!r}: this silo already sent an update this round")
        if not num_examples > 0:
            raise ValueError(f"update from silo {silo_id!r}: num_examples must be > 0, got {num_examples}")
        base, scale = self.base_for(silo_id)
        self.check(silo_id, update)
        for prefix, d in la.product_delta(base, update, scale).items():
            if prefix in self._sum:
                self._sum[prefix].add_(d, alpha=float(num_examples))
            else:
                self._sum[prefix] = d * float(num_examples)
        self._weight += float(num_examples)
        self._record(silo_id, num_examples)

    def mean(self) -> StateDict:
        """The weighted mean dense weight change `{prefix: (out, in)}` (a new dict)."""
        return mean_of_sum(self._sum, self._weight)
