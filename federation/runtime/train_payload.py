"""The round's TRAIN payload, encoded once and shared by every silo that is sent the global adapter.

Encoding the global adapter afresh for each silo made one payload (the adapter's size) per silo, and ZeroMQ holds
each queued message until its connection drains: at the start of a round the coordinator held `silos x adapter`
bytes. pyzmq sends frames above its copy threshold (64 KiB) without copying them, so one `bytes` payload shared
by every TRAIN of the round costs its size once, whatever the number of silos. Only the header (the silo's name,
its deadline) differs from one silo to the next. An adapter other than the global one (product aggregation's
per-rank projection) is encoded for its silo alone, as before.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from appliance.core.types import StateDict
from federation.wire import codec
from federation.wire.protocol import Header, dump_header

__all__ = ["EncodedState", "TrainPayloads"]


@dataclass(frozen=True)
class EncodedState:
    """An adapter encoded for the wire: the codec's meta, the safetensors bytes of its tensors and their size (the
    tensors themselves are not kept: the payload is all that is sent)."""

    tensor_bytes: int  # federation.wire.compression.payload_bytes of the encoded tensors
    meta: dict[str, Any]
    payload: bytes
    manifest: list

    def frames(self, header: Header) -> list[bytes]:
        """The message frames for `header` with this payload (what `wire.encode(header, tensors)` returns)."""
        header = header.model_copy(update={"manifest": self.manifest, "payload_bytes": len(self.payload)})
        return [dump_header(header), self.payload]


def encode_state(state: StateDict, method: str) -> EncodedState:
    """`state` encoded with the downlink `method`, as one safetensors payload."""
    from safetensors.torch import save

    from federation.wire.compression import payload_bytes
    from federation.wire.frames import manifest_of

    tensors, meta = codec.encode(state, method)
    payload = save({k: v.detach().contiguous().cpu() for k, v in tensors.items()})
    return EncodedState(payload_bytes(tensors), meta, payload, manifest_of(tensors))


class TrainPayloads:
    """Encodings of one round's global adapter, by method (at most one or two per round)."""

    def __init__(self) -> None:
        self._global: dict[str, tuple[StateDict, EncodedState]] = {}

    def get(self, state: StateDict, method: str, global_state: StateDict) -> EncodedState:
        """The encoding of `state`: shared when it is `global_state`, fresh otherwise."""
        if state is not global_state:
            return encode_state(state, method)
        cached = self._global.get(method)
        if cached is None or cached[0] is not global_state:
            cached = self._global[method] = (global_state, encode_state(global_state, method))
        return cached[1]
