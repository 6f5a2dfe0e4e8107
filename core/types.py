"""Type aliases shared by the packages (torch-free: torch is named, not imported)."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

# Keys as peft.get_peft_model_state_dict gives them (adapter-name-free).
StateDict = dict[str, "torch.Tensor"]

__all__ = ["StateDict"]
