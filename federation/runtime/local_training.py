"""What a round asks of a silo's local training, beyond the steps: the LR schedule and LoRA options.

The coordinator merges `round_schedule(...)` into every TRAIN's `config` (next to the strategy's plan, e.g.
FedProx's `prox_mu` or frozen-A's `lora_freeze_a`); the engine trainer turns that config back into train
settings and `train.TrainPlan` fields with `train_overrides(...)`. Pure functions of their arguments.
"""

from __future__ import annotations

from typing import Any

__all__ = ["round_schedule", "train_overrides"]


def round_schedule(
    lr_schedule: str, round_id: int, local_steps: int, rounds: int, local_optimizer: str = "fresh"
) -> dict[str, Any]:
    """The schedule part of round `round_id`'s config (rounds count from 1).

    Args:
        lr_schedule: `federation.lr_schedule`: "round" (the engine's own schedule restarted in every round),
            "constant" (warmup once over the federation, then the peak rate), or "federation" (one warmup
            and `train.lr_scheduler` decay across all `rounds * local_steps` steps).
        local_optimizer: `federation.local_optimizer`: "keep" sends `local_optimizer` = "fresh" in round 1 (a silo
            drops what an earlier run left) and "keep" after it (a silo continues its own AdamW moments); "fresh"
            sends nothing (a new optimizer every round).
    """
    if local_optimizer not in ("keep", "fresh"):
        raise ValueError(f"federation.local_optimizer must be keep or fresh, not {local_optimizer!r}")
    plan: dict[str, Any] = (
        {"local_optimizer": "fresh" if round_id == 1 else "keep"} if local_optimizer == "keep" else {}
    )
    if lr_schedule == "round":
        return plan
    if lr_schedule not in ("constant", "federation"):
        raise ValueError(f"federation.lr_schedule must be constant, round or federation, not {lr_schedule!r}")
    plan["schedule_span"] = [(round_id - 1) * local_steps, rounds * local_steps]
    if lr_schedule == "constant":
        plan["lr_scheduler"] = "constant"
    return plan


def train_overrides(config: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(train-settings updates, `train.TrainPlan` fields) for a round's config; unknown keys are ignored.

    A `local_optimizer` entry becomes `keep_optimizer` (the silo's Trainer continues and keeps its moments) and
    `reset_optimizer` (True for "fresh"). Without the entry neither is set: a fresh optimizer, nothing kept.

    Raises:
        ValueError: a malformed schedule_span or local_optimizer.
    """
    updates: dict[str, Any] = {}
    if config.get("lr_scheduler") is not None:
        updates["lr_scheduler"] = str(config["lr_scheduler"])
    if config.get("lora_freeze_a"):
        updates["lora_freeze_a"] = True
    kwargs: dict[str, Any] = {"prox_mu": float(config.get("prox_mu", 0.0))}
    local_optimizer = config.get("local_optimizer")
    if local_optimizer is not None:
        if local_optimizer not in ("keep", "fresh"):
            raise ValueError(f"local_optimizer must be keep or fresh, got {local_optimizer!r}")
        kwargs["keep_optimizer"] = True
        kwargs["reset_optimizer"] = local_optimizer == "fresh"
    span = config.get("schedule_span")
    if span is not None:
        if not (isinstance(span, (list, tuple)) and len(span) == 2 and all(isinstance(v, int) for v in span)):
            raise ValueError(f"schedule_span must be [offset, total] integers, got {span!r}")
        kwargs["schedule_span"] = (int(span[0]), int(span[1]))
    return updates, kwargs
