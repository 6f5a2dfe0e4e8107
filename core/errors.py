"""The appliance's small error hierarchy. Messages say what was found, what was expected, and what to change."""


class ApplianceError(Exception):
    """Base of every error the appliance raises on purpose."""


class ConfigError(ApplianceError):
    """Settings or command-line values that cannot work together."""


class DataError(ApplianceError):
    """Input data (JSONL, tensors, model files) that is malformed; the message names file, line and problem."""


class ModelNotFound(ApplianceError):
    """A model or adapter name that the store or registry does not hold."""


class ProtocolError(ApplianceError):
    """A federation message that is malformed, oversized, or of the wrong version."""


class RoundFailed(ApplianceError):
    """A federation round that could not complete (too few valid updates before the deadline)."""
