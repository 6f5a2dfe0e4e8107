"""Cross-silo federated LoRA: protocol, transport, coordinator, silo, strategies, privacy (see docs/CONTRACTS.md).

The public surface, imported lazily so `import federation` stays cheap (no torch, no zmq):

    from federation import Coordinator, SiloClient, SiloTrainer, EngineTrainer, make_strategy, build_strategy
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "Coordinator": "federation.coordinator",
    "SiloClient": "federation.silo",
    "SiloTrainer": "federation.silo",
    "EngineTrainer": "federation.silo",
    "state_delta": "federation.silo",
    "make_strategy": "federation.strategies",
    "Strategy": "federation.strategies",
    "build_strategy": "federation.service",
    "run_coordinator": "federation.service",
    "run_silo": "federation.service",
    "run_demo": "federation.demo",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'federation' has no attribute {name!r}")
