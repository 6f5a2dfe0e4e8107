"""Aggregation strategies, one import away: the public names of the modules they live in.

* `fedllm.federation.aggregation.aggregate`: pure maths over updates (checks, norms, clipping, weights, means, median,
  Krum);
* `fedllm.federation.aggregation.accumulators`: what collects one round's updates (streaming, storing, clipping, LoRA
  products);
* `fedllm.federation.aggregation.server_strategies`: the `Strategy` interface, its defaults and the strategies
  themselves;
* `fedllm.federation.aggregation.strategy_wrappers`: `Clipped`, `FrozenA` (the DP wrappers are in
  `fedllm.federation.aggregation.privacy`);
* `fedllm.federation.aggregation.strategy_factory`: `make_strategy(name, **params)` and the names it knows.

Callers may import from here or from the module that defines a name; inside `federation/` the defining module is used.
"""

from __future__ import annotations

from fedllm.core.types import StateDict
from fedllm.federation.aggregation.accumulators import (
    ClippedAccumulator,
    ProductAccumulator,
    RoundAccumulator,
    StoringAccumulator,
    StreamingAccumulator,
)
from fedllm.federation.aggregation.aggregate import (
    InvalidUpdate,
    capped_weights,
    check_aggregate,
    check_update,
    clip_update,
    coordinate_median,
    global_norm,
    krum_select,
    trimmed_mean,
    weighted_mean,
)
from fedllm.federation.aggregation.server_strategies import (
    BaseStrategy,
    FedAdam,
    FedAvg,
    FedAvgM,
    FedProx,
    FedYogi,
    Krum,
    Median,
    ProductAggregation,
    Strategy,
    StrategyDefaults,
    TrimmedMean,
)
from fedllm.federation.aggregation.strategy_factory import (
    LORA_AGGREGATIONS,
    STRATEGY_NAMES,
    make_strategy,
    mean_strategy_names,
)
from fedllm.federation.aggregation.strategy_wrappers import Clipped, FrozenA, StrategyWrapper

__all__ = [
    "StateDict",
    "RoundAccumulator",
    "Strategy",
    "StrategyDefaults",
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
    "mean_strategy_names",
    "InvalidUpdate",
    "capped_weights",
    "check_aggregate",
    "LORA_AGGREGATIONS",
    "ProductAccumulator",
    "ProductAggregation",
    "FrozenA",
]
