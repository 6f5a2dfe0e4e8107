"""Cross-silo federated LoRA: protocol, transport, coordinator, silo, strategies, privacy (see docs/CONTRACTS.md).

The public surface, imported lazily so `import federation` stays cheap (no torch, no zmq):

    from federation import Coordinator, SiloClient, SiloTrainer, EngineTrainer, make_strategy, build_strategy
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "Coordinator": "federation.runtime.coordinator",
    "SiloClient": "federation.runtime.silo",
    "SiloTrainer": "federation.runtime.silo",
    "EngineTrainer": "federation.runtime.silo",
    "state_delta": "federation.runtime.silo",
    "make_strategy": "federation.aggregation.strategies",
    "Strategy": "federation.aggregation.strategies",
    "build_strategy": "federation.runtime.service",
    "run_coordinator": "federation.runtime.service",
    "run_silo": "federation.runtime.service",
    "run_demo": "federation.demo.demo",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'federation' has no attribute {name!r}")
