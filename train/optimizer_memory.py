"""Optimizer state kept between trainings: a silo's AdamW moments from one round to the next.

A federation's silo trains a few local steps per round. A fresh AdamW every round starts with empty moments and a
step count of 0, so its first steps are sign-like steps of the full rate on every coordinate, noise included. Keeping
the silo's own moments across rounds (`capture` after a training, `restore` before the next) makes its rounds continue
one optimizer, as one long local run would. The `train.Trainer` of a silo holds what `capture` returns; the state
never leaves the process: only adapter weights cross a silo's boundary.

Works for the torch optimizer the engine hands DeepSpeed, whether DeepSpeed uses it as is (ZeRO 0, fp32) or wraps it
(ZeRO 1-3 and bf16/fp16 keep the torch optimizer as `.optimizer`, over their flat fp32 partitions): the kept state is
the torch optimizer's, and it is restored only into one whose parameters have the same shapes.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class KeptOptimizer:
    """A torch optimizer's per-parameter state (moments, step count) on CPU, with the parameter shapes it fits."""

    shapes: list[list[tuple[int, ...]]]
    state: dict[Any, dict[str, Any]]


def torch_optimizer(optimizer: Any) -> Any:
    """The torch optimizer inside a DeepSpeed engine's optimizer (itself when DeepSpeed did not wrap it)."""
    import torch

    inner = getattr(optimizer, "optimizer", optimizer)
    if not isinstance(inner, torch.optim.Optimizer):
        raise TypeError(f"no torch optimizer inside {type(optimizer).__name__}")
    return inner


def _shapes(opt: Any) -> list[list[tuple[int, ...]]]:
    return [[tuple(p.shape) for p in group["params"]] for group in opt.param_groups]


def capture(optimizer: Any) -> KeptOptimizer:
    """A CPU copy of the optimizer's per-parameter state (moments, step count)."""
    import torch

    opt = torch_optimizer(optimizer)
    state = {
        k: {n: v.detach().to("cpu", copy=True) if torch.is_tensor(v) else v for n, v in s.items()}
        for k, s in opt.state_dict()["state"].items()
    }
    return KeptOptimizer(shapes=_shapes(opt), state=state)


def restore(kept: KeptOptimizer, optimizer: Any) -> bool:
    """Load `kept` into the optimizer; True if it was loaded.

    The optimizer's hyperparameters (rate, weight decay) stay as they are: only the per-parameter state is loaded.
    Nothing is loaded when the kept state was made for other parameter shapes (another LoRA rank, target set, ZeRO
    stage or rank count; logged).
    """
    import torch

    opt = torch_optimizer(optimizer)
    if kept.shapes != _shapes(opt):
        log.warning("the kept optimizer state was for other parameter shapes; starting a fresh optimizer")
        return False
    current = opt.state_dict()
    current["state"] = {
        k: {n: v.clone() if torch.is_tensor(v) else v for n, v in s.items()} for k, s in kept.state.items()
    }
    opt.load_state_dict(current)
    return True
