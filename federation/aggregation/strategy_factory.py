"""Strategies by name: `make_strategy("fedadam", server_lr=0.01, clip_norm=1.0)` and the names it knows."""

from __future__ import annotations

from typing import Any

from fedllm.federation.aggregation.server_strategies import (
    FedAdam,
    FedAvg,
    FedAvgM,
    FedProx,
    FedYogi,
    Krum,
    Median,
    ProductAggregation,
    Strategy,
    TrimmedMean,
)
from fedllm.federation.aggregation.strategy_wrappers import Clipped, FrozenA

__all__ = ["LORA_AGGREGATIONS", "STRATEGY_NAMES", "make_strategy", "mean_strategy_names"]

LORA_AGGREGATIONS: tuple[str, ...] = ("factors", "product", "frozen_a")


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
            how LoRA's A and B are combined, see `LORA_AGGREGATIONS`) and `lora_alpha` (the global adapter's
            `train.lora_alpha`: the scale of product aggregation; ignored otherwise).
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
