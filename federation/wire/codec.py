"""The one place the services call the compression functions (`federation/wire/compression.py`).

Kept apart so the coordinator and the silo agree on how an update is encoded and decoded, and so that every
decoding failure becomes a `ProtocolError`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from appliance.core.errors import ProtocolError
from federation.wire import compression

DOWNLINK_METHODS = ("fp32", "bf16")


def encode(update: dict, method: str, state: dict | None = None) -> tuple[dict, dict[str, Any]]:
    """Encode `update` for the wire with `method`; returns (tensors, meta). `state` is topk's error feedback."""
    tensors, meta, new_state = compression.encode(update, method, state=state)
    if state is not None and new_state is not None:  # compression.encode is pure; keep the caller's residual
        state.clear()
        state.update(new_state)
    return tensors, meta


def decode(tensors: dict, meta: dict[str, Any], expected_shapes: Mapping[str, Sequence[int]] | None = None) -> dict:
    """Decode tensors + meta back to a float state dict.

    Args:
        expected_shapes: the shapes the update must have (the global adapter's); checked against the meta before
            anything is allocated, so the sender cannot choose how much memory decoding takes.

    Raises:
        ProtocolError: the meta or tensors do not form a valid encoding (of `expected_shapes`, when given).
    """
    try:
        return compression.decode(tensors, meta, expected_shapes=expected_shapes)
    except (ValueError, KeyError, TypeError, RuntimeError, AttributeError) as exc:
        raise ProtocolError(f"cannot decode a {meta.get('method')!r}-encoded update: {exc}") from exc


def downlink_method(method: str) -> str:
    """The encoding used for the global adapter sent to silos (lossy sparse/int8 schemes only go uplink)."""
    return method if method in DOWNLINK_METHODS else "bf16"
