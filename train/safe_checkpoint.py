"""Loading DeepSpeed checkpoints without pickle's arbitrary code: `torch.load(weights_only=True)` and an allow-list.

DeepSpeed's own `TorchCheckpointEngine.load` calls `torch.load(weights_only=False)`: a checkpoint folder that someone
else could write (a shared run folder, a copied run) would run any code its pickle names on `train --resume`.
`WeightsOnlyCheckpointEngine` loads every checkpoint file of a resume with `weights_only=True` instead; only tensors,
plain containers and numbers, and the few DeepSpeed classes its ZeRO optimizer states hold (`ALLOWED`, measured on
ZeRO 0, 2 and 3 checkpoints of DeepSpeed 0.19) are rebuilt. Anything else is refused with a `ConfigError` naming the
file and the class, before it runs.

Where DeepSpeed still unpickles: its offline tools (`zero_to_fp32.py`, ZeRO-3's `load_hp_checkpoint_state` and
offload-state helpers) call `torch.load(weights_only=False)` themselves; the appliance never calls them.
"""

from __future__ import annotations

import logging
import pickle
from typing import Any

from fedllm.core.errors import ConfigError

logger = logging.getLogger(__name__)


def allowed_globals() -> list[Any]:
    """The non-tensor classes a DeepSpeed ZeRO checkpoint holds: a loss scaler's settings, the ZeRO stage enum, and
    the address of a parameter fragment (plain data, no code runs when they are rebuilt)."""
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, ZeroStageEnum, fragment_address]


def load_weights_only(path: str, map_location: Any = None) -> Any:
    """`torch.load(path, weights_only=True)` with `allowed_globals()` allowed.

    Raises:
        ConfigError: the file holds something else (a class or function outside the allow-list).
    """
    import torch

    with torch.serialization.safe_globals(allowed_globals()):
        try:
            return torch.load(path, map_location=map_location, weights_only=True)
        except pickle.UnpicklingError as exc:
            first = next((line.strip() for line in str(exc).splitlines() if "GLOBAL" in line), str(exc).splitlines()[0])
            raise ConfigError(
                f"refused to load checkpoint file {path}: it holds objects a weights-only load does not "
                f"rebuild ({first[:300]}); resume only from checkpoints this appliance wrote"
            ) from exc


def weights_only_engine(config_params: Any = None) -> Any:
    """A DeepSpeed `TorchCheckpointEngine` whose `load` is `load_weights_only` (its `save` is DeepSpeed's)."""
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    class WeightsOnlyCheckpointEngine(TorchCheckpointEngine):
        def load(self, path: str, map_location: Any = None) -> Any:
            return load_weights_only(path, map_location)

    return WeightsOnlyCheckpointEngine(config_params)
