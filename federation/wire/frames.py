"""The frames of a federation message: a JSON header frame + a safetensors payload frame, never pickle.

An adapter's payload is encoded and decoded with `fedllm.federation.wire.payload`; this module reads and writes the
frames (a message without tensors, and the raw tensors of a secure-aggregation step, use it directly).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from fedllm.core.errors import ProtocolError
from fedllm.core.types import StateDict
from fedllm.federation.wire.protocol import Header, HeaderError, TensorSpec, dump_header, load_header

if TYPE_CHECKING:
    import torch


def dtype_name(t: "torch.Tensor") -> str:
    """`torch.bfloat16` -> `bfloat16`."""
    return str(t.dtype).removeprefix("torch.")


def manifest_of(tensors: StateDict) -> list[TensorSpec]:
    """The manifest (names, shapes, dtypes) of `tensors`, sorted by name."""
    return [TensorSpec(name=k, shape=tuple(v.shape), dtype=dtype_name(v)) for k, v in sorted(tensors.items())]


def encode(header: Header, tensors: StateDict | None = None) -> list[bytes]:
    """Frames for `header` (+ `tensors` as safetensors). Fills the header's manifest and payload size."""
    if not tensors:
        return [dump_header(header.model_copy(update={"manifest": [], "payload_bytes": 0}))]
    from safetensors.torch import save

    payload = save({k: v.detach().contiguous().cpu() for k, v in tensors.items()})
    header = header.model_copy(update={"manifest": manifest_of(tensors), "payload_bytes": len(payload)})
    return [dump_header(header), payload]


def decode_header(frames: list[bytes]) -> Header:
    """Parse frame 0 only (cheap checks before the payload is touched).

    Raises:
        ProtocolError: wrong frame count, bad header, or a payload size that disagrees with the header.
    """
    if len(frames) not in (1, 2):
        raise ProtocolError(f"a message has 1 or 2 frames (header, payload), got {len(frames)}")
    try:
        header = load_header(frames[0])
    except HeaderError as exc:
        raise ProtocolError(str(exc)) from exc
    size = len(frames[1]) if len(frames) == 2 else 0
    if size != header.payload_bytes:
        raise ProtocolError(f"payload has {size} bytes but the header announces {header.payload_bytes}")
    if size == 0 and header.manifest:
        raise ProtocolError("header lists tensors but the message has no payload")
    return header


def decode_payload(header: Header, frames: list[bytes]) -> StateDict:
    """The payload's tensors as sent (still encoded: `fedllm.federation.wire.payload.decode_payload` decodes them),
    checked against the header's manifest (names, shapes, dtypes; nothing more, nothing less).

    Raises:
        ProtocolError: the payload is not safetensors or does not match the manifest.
    """
    if len(frames) < 2:
        return {}
    from safetensors import SafetensorError
    from safetensors.torch import load

    try:
        tensors = load(bytes(frames[1]))
    except (SafetensorError, ValueError, RuntimeError) as exc:
        raise ProtocolError(f"payload is not valid safetensors: {exc}") from exc
    expected = {t.name: t for t in header.manifest}
    got = {t.name: t for t in manifest_of(tensors)}
    if expected.keys() != got.keys():
        extra, missing = sorted(got.keys() - expected.keys()), sorted(expected.keys() - got.keys())
        raise ProtocolError(f"payload tensors differ from the manifest: extra {extra[:3]}, missing {missing[:3]}")
    for name, spec in expected.items():
        if got[name] != spec:
            raise ProtocolError(
                f"tensor {name!r} is {got[name].shape}/{got[name].dtype} "
                f"but the manifest says {spec.shape}/{spec.dtype}"
            )
    return tensors
