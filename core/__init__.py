"""The base of the appliance: typed settings, errors, on-disk layout, model store, adapter registry."""

from fedllm.core.errors import (
    ApplianceError,
    ConfigError,
    DataError,
    ModelNotFound,
    ProtocolError,
    RoundFailed,
)
from fedllm.core.settings import ApplianceSettings, load_settings

__all__ = [
    "ApplianceError",
    "ApplianceSettings",
    "ConfigError",
    "DataError",
    "ModelNotFound",
    "ProtocolError",
    "RoundFailed",
    "load_settings",
]
