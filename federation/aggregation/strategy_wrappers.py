"""Strategy wrappers: a strategy around another one, delegating every `Strategy` method it does not change.

`Clipped` clips every update to a global L2 norm; `FrozenA` keeps LoRA's A factors at their shared init. The DP
wrappers (`CentralDP`, `SiloDPAccounting`) are in `fedllm.federation.aggregation.privacy`.
"""

from __future__ import annotations

from fedllm.core.types import StateDict
from fedllm.federation.aggregation import lora_aggregate as la
from fedllm.federation.aggregation.accumulators import ClippedAccumulator, RoundAccumulator
from fedllm.federation.aggregation.server_strategies import BaseStrategy, Strategy

__all__ = ["StrategyWrapper", "Clipped", "FrozenA"]


class StrategyWrapper:
    """Base of the wrappers (clipping, DP): delegates every `Strategy` method to `inner`; subclasses override some.

    Args:
        inner: The wrapped strategy; the wrapper takes its `name`.
    """

    def __init__(self, inner: Strategy) -> None:
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

    def state_for_silo(
        self, global_state: StateDict, lora_r: int | None, lora_alpha: float | None
    ) -> tuple[StateDict, float | None]:
        """The inner strategy's state for the silo."""
        return self.inner.state_for_silo(global_state, lora_r, lora_alpha)

    def epsilon(self, delta: float | None = None) -> float | None:
        """The inner strategy's epsilon."""
        return self.inner.epsilon(delta)

    @property
    def mean_based(self) -> bool:
        """Whether the inner strategy is mean-based."""
        return self.inner.mean_based

    @property
    def central_dp(self) -> bool:
        """Whether the inner strategy adds central DP noise."""
        return self.inner.central_dp

    @property
    def clip_norm(self) -> float | None:
        """The inner strategy's per-update clip norm."""
        return self.inner.clip_norm

    def change_bound(self, update_bound: float) -> float | None:
        """The inner strategy's bound."""
        return self.inner.change_bound(update_bound)


class Clipped(StrategyWrapper):
    """Wrapper strategy: clip every update to a global L2 norm `max_norm` before the inner strategy sees it."""

    def __init__(self, inner: Strategy, max_norm: float) -> None:
        if max_norm <= 0:
            raise ValueError(f"max_norm must be > 0, got {max_norm}")
        super().__init__(inner)
        self.max_norm = max_norm

    def start_round(self, round_id: int, global_state: StateDict) -> RoundAccumulator:
        """The inner accumulator behind a clipping one."""
        return ClippedAccumulator(self.inner.start_round(round_id, global_state), self.max_norm)

    @property
    def clip_norm(self) -> float | None:
        """`max_norm`."""
        return self.max_norm


class FrozenA(StrategyWrapper):
    """Frozen-A LoRA (FFA-LoRA-style) around any strategy: silos train B only, A stays the shared seeded init.

    `plan_round` asks silos for `lora_freeze_a`; every aggregated delta has its lora_A part zeroed before the
    server step, so A never moves (also under DP noise) and averaging B is exact: mean(B_i) A = mean(B_i A).
    Server optimisers compose unchanged (a zero A pseudo-gradient leaves momentum and Adam moments of A at zero).
    """

    def __init__(self, inner: Strategy) -> None:
        super().__init__(inner)
        self.name = f"{inner.name}+frozen_a"

    def _plain(self) -> BaseStrategy:
        """The inner strategy, which the members below need to be a plain one (a wrapper goes by `finish_round`)."""
        if not isinstance(self.inner, BaseStrategy):
            raise TypeError(f"{self.name}: {self.inner.name!r} is a wrapper, which has no {self.name} mean step")
        return self.inner

    @property
    def streaming(self) -> bool:
        """The inner strategy's accumulator kind."""
        return self._plain().streaming

    def plan_round(self, round_id: int) -> dict:
        """The inner plan plus `lora_freeze_a`."""
        return {**self.inner.plan_round(round_id), "lora_freeze_a": True}

    def round_counts(self, round_id: int, acc: RoundAccumulator, failures: list[str]) -> bool:
        """The inner rule."""
        return self._plain().round_counts(round_id, acc, failures)

    def aggregate(self, acc: RoundAccumulator) -> StateDict:
        """The inner aggregate with its lora_A part zeroed."""
        return la.zero_lora_a(self._plain().aggregate(acc))

    def apply_delta(self, round_id: int, global_state: StateDict, delta: StateDict) -> StateDict:
        """The inner server step on a delta whose lora_A part is zero."""
        return self._plain().apply_delta(round_id, global_state, la.zero_lora_a(delta))

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
