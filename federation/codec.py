"""The one place the services call the compression functions (federation/compression.py, owned by the maths).

Kept apart so the coordinator and silo agree on how an update is encoded and decoded, and so the services still
run (fp32 only) on a checkout where the compression module is missing.
"""

from __future__ import annotations

from typing import Any

from appliance.core.errors import ConfigError, ProtocolError

try:  # the maths engineer's module; fp32 needs none of it
    from federation import compression as _compression
except ImportError:  # pragma: no cover - only on a partial checkout
    _compression = None

DOWNLINK_METHODS = ("fp32", "bf16")


def encode(update: dict, method: str, state: dict | None = None) -> tuple[dict, dict[str, Any]]:
    """Encode `update` for the wire with `method`; returns (tensors, meta). `state` is topk's error feedback."""
    if _compression is None:
        if method != "fp32":
            raise ConfigError(f"compression {method!r} needs federation/compression.py, which is missing; use fp32")
        return dict(update), {"method": "fp32"}
    tensors, meta, new_state = _compression.encode(update, method, state=state)
    if state is not None and new_state is not None:  # compression.encode is pure; keep the caller's residual
        state.clear()
        state.update(new_state)
    return tensors, meta


def decode(tensors: dict, meta: dict[str, Any]) -> dict:
    """Decode tensors + meta back to a float state dict.

    Raises:
        ProtocolError: the meta or tensors do not form a valid encoding.
    """
    if _compression is None:
        if meta.get("method", "fp32") != "fp32":
            raise ProtocolError(f"cannot decode compression {meta.get('method')!r} without federation/compression.py")
        return dict(tensors)
    try:
        return _compression.decode(tensors, meta)
    except (ValueError, KeyError, TypeError, RuntimeError) as exc:
        raise ProtocolError(f"cannot decode a {meta.get('method')!r}-encoded update: {exc}") from exc


def downlink_method(method: str) -> str:
    """The encoding used for the global adapter sent to silos (lossy sparse/int8 schemes only go uplink)."""
    return method if method in DOWNLINK_METHODS else "bf16"
