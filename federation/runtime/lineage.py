"""The lineage a federated round's global adapter is registered with (its registry meta.json): where it came from.

`round_meta(coordinator, record)` is what the coordinator writes as the meta of each round's adapter version: the run
and round, the base model and its hash, the silos that contributed with their capped weights, the strategy and LoRA
aggregation, differential privacy (mode, epsilon, delta, noise, clip) and secure aggregation, the local steps and
rate, and the round's metrics. `appliance adapters show` and the exported model card read it
(core/contracts/lineage.py).
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedllm.core.contracts.lineage import base_model_hash

if TYPE_CHECKING:
    from fedllm.federation.runtime.coordinator import Coordinator


def round_meta(coordinator: Coordinator, record: dict[str, Any]) -> dict[str, Any]:
    """The registry meta of the global adapter of the round in `record`."""
    cfg, settings = coordinator.cfg, coordinator.settings
    dp = cfg.dp_mode != "off"
    return {
        "kind": "federated",
        "run": cfg.run_name,
        "round": coordinator.round,
        "participants": record["participants"],
        "shares": record.get("shares") or {},
        "strategy": coordinator.strategy.name,
        "lora_aggregation": cfg.lora_aggregation,
        "metrics": record["metrics"],
        "base_model": settings.model,
        "base_model_hash": _hash(str(settings.models_dir / settings.model)),
        "epsilon": record["epsilon"],
        "dp": {
            "mode": cfg.dp_mode,
            "delta": cfg.dp_delta if dp else None,
            "noise_multiplier": cfg.dp_noise_multiplier if dp else None,
            "clip_norm": cfg.dp_clip_norm if dp else None,
        },
        "secure_aggregation": bool(record.get("secure_aggregation")),
        "local_steps": cfg.local_steps,
        "lr": settings.train.lr,
        "lr_schedule": cfg.lr_schedule,
        "lora_r": settings.train.lora_r,
        "lora_alpha": settings.train.lora_alpha,
        "examples": record.get("examples"),
        "received_eval": record.get("received_eval"),  # the silos' held-out loss of the previous version (the gate)
    }


@lru_cache(maxsize=8)
def _hash(model_dir: str) -> str | None:
    """The base model's hash, computed once per process (a folder without store.json is hashed in full)."""
    return base_model_hash(Path(model_dir))
