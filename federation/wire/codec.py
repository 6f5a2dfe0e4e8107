"""The compression functions (`federation/wire/compression.py`) as the wire uses them: every decoding failure becomes
a `ProtocolError`, and top-k's residual is kept in the caller's dict.

Callers encode and decode adapters with `fedllm.federation.wire.payload` (`encode_payload`, `decode_payload`), which
puts these together with the message frames (`fedllm.federation.wire.frames`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from fedllm.core.errors import ProtocolError
from fedllm.federation.wire import compression


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
