"""The one entry point for an adapter on the wire: `encode_payload` and `decode_payload`.

    encoded = encode_payload(update, "int8")                       # compressed, as one safetensors payload
    header = make_header(MsgType.UPDATE, UpdateResult(..., encoding=encoded.meta), ...)
    frames = encoded.frames(header)                                # [JSON header, safetensors payload]
    update = decode_payload(decode_header(frames), frames)         # the header's `encoding` says how to decode

Under it, three layers with one job each: `compression` (the pure methods over tensors), `codec` (those methods with
every decoding failure a `ProtocolError`) and `frames` (the JSON header frame and the safetensors payload frame, checked
against the header's manifest). What goes on the wire is the header (its body's `encoding` is the codec's meta, its
manifest names the encoded tensors) and the safetensors bytes of the encoded tensors: never pickle.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from fedllm.core.types import StateDict
from fedllm.federation.wire import codec
from fedllm.federation.wire import frames as wire_frames
from fedllm.federation.wire.protocol import Header, dump_header

__all__ = ["DOWNLINK_METHODS", "EncodedPayload", "decode_payload", "downlink_method", "encode_payload"]

DOWNLINK_METHODS = ("fp32", "bf16")


@dataclass(frozen=True)
class EncodedPayload:
    """An adapter encoded for the wire: the codec's meta (the header body's `encoding`), the safetensors bytes of its
    encoded tensors, their manifest and their size (the tensors themselves are not kept: the payload is all that is
    sent, so one payload can go to many silos)."""

    tensor_bytes: int  # fedllm.federation.wire.compression.payload_bytes of the encoded tensors
    meta: dict[str, Any]
    payload: bytes  # empty for an empty state: the message is then its header alone
    manifest: list

    def frames(self, header: Header) -> list[bytes]:
        """The message frames for `header` with this payload (its manifest and payload size filled in)."""
        if not self.manifest:
            return [dump_header(header.model_copy(update={"manifest": [], "payload_bytes": 0}))]
        header = header.model_copy(update={"manifest": self.manifest, "payload_bytes": len(self.payload)})
        return [dump_header(header), self.payload]


def encode_payload(state: StateDict, method: str, *, residual: dict | None = None) -> EncodedPayload:
    """`state` compressed with `method` (fedllm.federation.wire.compression.METHODS) as one safetensors payload.

    Args:
        residual: top-k's error feedback, updated in place (what was not sent this time is added next time).

    Raises:
        ValueError: an unknown method.
    """
    from safetensors.torch import save

    from fedllm.federation.wire.compression import payload_bytes

    tensors, meta = codec.encode(state, method, state=residual)
    if not tensors:
        return EncodedPayload(0, meta, b"", [])
    payload = save({k: v.detach().contiguous().cpu() for k, v in tensors.items()})
    return EncodedPayload(payload_bytes(tensors), meta, payload, wire_frames.manifest_of(tensors))


def decode_payload(
    header: Header, frames: list[bytes], *, expected_shapes: Mapping[str, Sequence[int]] | None = None
) -> StateDict:
    """The float state dict a message carries, decoded as its header's `encoding` says.

    Args:
        header: the message's header (`frames.decode_header(frames)`, checked already).
        expected_shapes: the shapes it must have (e.g. the global adapter's): checked against the encoding before
            anything is allocated, so the sender cannot choose how much memory decoding takes.

    Raises:
        ProtocolError: the payload is not safetensors, does not match the manifest, or is not a valid encoding (of
            `expected_shapes`, when given).
    """
    encoding = header.body.get("encoding") or {}
    return codec.decode(wire_frames.decode_payload(header, frames), encoding, expected_shapes=expected_shapes)


def downlink_method(method: str) -> str:
    """The encoding used for the global adapter sent to silos (lossy sparse/int8 schemes only go uplink)."""
    return method if method in DOWNLINK_METHODS else "bf16"
