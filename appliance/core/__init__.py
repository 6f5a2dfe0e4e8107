"""The base of the appliance: typed settings, errors, on-disk layout, model store, adapter registry."""

from appliance.core.errors import (
    ApplianceError,
    ConfigError,
    DataError,
    ModelNotFound,
    ProtocolError,
    RoundFailed,
)
from appliance.core.settings import ApplianceSettings, load_settings

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
