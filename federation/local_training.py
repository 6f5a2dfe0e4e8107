"""What a round asks of a silo's local training, beyond the steps: the LR schedule and LoRA options.

The coordinator merges `round_schedule(...)` into every TRAIN's `config` (next to the strategy's plan, e.g.
FedProx's `prox_mu` or frozen-A's `lora_freeze_a`); the engine trainer turns that config back into train
settings and `fit_adapter` keywords with `train_overrides(...)`. Pure functions of their arguments.
"""

from __future__ import annotations

from typing import Any

__all__ = ["round_schedule", "train_overrides"]


def round_schedule(lr_schedule: str, round_id: int, local_steps: int, rounds: int) -> dict[str, Any]:
    """The schedule part of round `round_id`'s config (rounds count from 1).

    Args:
        lr_schedule: `federation.lr_schedule`: "round" (the engine's own schedule restarted in every round: nothing
            to send), "constant" (warmup once over the federation, then the peak rate), or "federation" (one warmup
            and `train.lr_scheduler` decay across all `rounds * local_steps` steps).
    """
    if lr_schedule == "round":
        return {}
    if lr_schedule not in ("constant", "federation"):
        raise ValueError(f"federation.lr_schedule must be constant, round or federation, not {lr_schedule!r}")
    plan: dict[str, Any] = {"schedule_span": [(round_id - 1) * local_steps, rounds * local_steps]}
    if lr_schedule == "constant":
        plan["lr_scheduler"] = "constant"
    return plan


def train_overrides(config: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(train-settings updates, `fit_adapter` keywords) for a round's config; unknown keys are ignored.

    Raises:
        ValueError: a malformed schedule_span.
    """
    updates: dict[str, Any] = {}
    if config.get("lr_scheduler") is not None:
        updates["lr_scheduler"] = str(config["lr_scheduler"])
    if config.get("lora_freeze_a"):
        updates["lora_freeze_a"] = True
    kwargs: dict[str, Any] = {"prox_mu": float(config.get("prox_mu", 0.0))}
    span = config.get("schedule_span")
    if span is not None:
        if not (isinstance(span, (list, tuple)) and len(span) == 2 and all(isinstance(v, int) for v in span)):
            raise ValueError(f"schedule_span must be [offset, total] integers, got {span!r}")
        kwargs["schedule_span"] = (int(span[0]), int(span[1]))
    return updates, kwargs
