"""Update compression for the wire: pure `encode` / `decode` over state dicts, with JSON-able metadata.

    tensors, meta, new_state = encode(update, "int8")          # tensors go in the safetensors payload,
    update_again = decode(tensors, meta)                         # meta in the JSON header

Methods and their error (per coordinate, `x` the value sent):
  * "fp32": exact.
  * "bf16" (default): relative error <= 2^-8 (bfloat16 keeps 8 significant bits).
  * "int8": blockwise absmax (blocks of `block_size` consecutive values of the flattened tensor, default 64):
    `q = round(x / s)`, `s = absmax(block) / 127` (float32); error <= `absmax(block) / 254`.
  * "topk": keeps the `ratio` (default 1 %, at least one) largest-magnitude values of each tensor, as int32
    indices and float32 values. Error feedback (Seide et al. 2014, Stich et al. 2018): what is not sent is
    returned in `new_state` and added to the next update, so nothing is lost, only delayed. Pass the returned
    state back in on the next call; `None` starts with a zero residual.

Encoded tensor names are `KEY::SUFFIX` (`::q`, `::scale`, `::idx`, `::val`, or `KEY` itself for fp32/bf16).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from fedllm.core.types import StateDict

__all__ = ["METHODS", "DEFAULT_METHOD", "encode", "decode", "payload_bytes"]

METHODS = ("fp32", "bf16", "int8", "topk")
DEFAULT_METHOD = "bf16"
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}


def payload_bytes(tensors: Mapping[str, torch.Tensor]) -> int:
    """Bytes of tensor data (numel x element size), without container overhead."""
    return sum(t.numel() * t.element_size() for t in tensors.values())


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _topk_count(ratio: float, numel: int) -> int:
    """Values top-k keeps of a tensor: ceil(ratio * numel), at least one (none of an empty tensor)."""
    return min(numel, max(1, math.ceil(ratio * numel)))


def _int8_encode(x: torch.Tensor, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    flat = x.reshape(-1)
    pad = (-flat.numel()) % block_size
    blocks = torch.nn.functional.pad(flat, (0, pad)).reshape(-1, block_size)  # (num_blocks, block_size)
    scale = blocks.abs().amax(dim=1) / 127.0  # (num_blocks,)
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.round(blocks / safe[:, None]).clamp(-127, 127).to(torch.int8).reshape(-1)[: flat.numel()]
    return q, scale


def _int8_decode(q: torch.Tensor, scale: torch.Tensor, shape: list[int], block_size: int) -> torch.Tensor:
    numel = q.numel()
    pad = (-numel) % block_size
    blocks = torch.nn.functional.pad(q.to(torch.float32), (0, pad)).reshape(-1, block_size)
    return (blocks * scale.to(torch.float32)[:, None]).reshape(-1)[:numel].reshape(shape)


def encode(
    update: Mapping[str, torch.Tensor],
    method: str = DEFAULT_METHOD,
    state: Mapping[str, torch.Tensor] | None = None,
    *,
    block_size: int = 64,
    ratio: float = 0.01,
) -> tuple[StateDict, dict[str, Any], StateDict | None]:
    """Compress an update for the wire.

    Args:
        update: The update (not modified).
        method: One of `METHODS`.
        state: Top-k only: the residual returned by the previous call (None = zeros). Ignored otherwise.
        block_size: Int8 block length.
        ratio: Top-k fraction of each tensor's values to send, in (0, 1].

    Returns:
        `(tensors, meta, new_state)`: tensors to send, JSON-able meta for `decode`, and the new top-k residual
        (`None` for the other methods).

    Raises:
        ValueError: for an unknown method or bad parameters.
    """
    if method not in METHODS:
        raise ValueError(f"unknown compression method {method!r}; expected one of {', '.join(METHODS)}")
    meta: dict[str, Any] = {
        "method": method,
        "shapes": {k: list(v.shape) for k, v in update.items()},
        "dtypes": {k: _dtype_name(v.dtype) for k, v in update.items()},
    }
    tensors: StateDict = {}
    if method in ("fp32", "bf16"):
        target = torch.float32 if method == "fp32" else torch.bfloat16
        return {k: v.detach().to(target).contiguous() for k, v in update.items()}, meta, None
    if method == "int8":
        if block_size < 1:
            raise ValueError(f"int8 block_size must be >= 1, got {block_size}")
        meta["block_size"] = block_size
        for key, value in update.items():
            q, scale = _int8_encode(value.detach().to(torch.float32), block_size)
            tensors[f"{key}::q"], tensors[f"{key}::scale"] = q.contiguous(), scale.contiguous()
        return tensors, meta, None
    if not 0 < ratio <= 1:
        raise ValueError(f"topk ratio must be in (0, 1], got {ratio}")
    meta["ratio"] = ratio
    new_state: StateDict = {}
    for key, value in update.items():
        corrected = value.detach().to(torch.float32).reshape(-1)
        if state is not None and key in state:
            corrected = corrected + state[key].to(torch.float32).reshape(-1)
        k = _topk_count(ratio, corrected.numel())
        idx = torch.topk(corrected.abs(), k, sorted=False).indices
        idx = torch.sort(idx).values  # sorted indices compress better and decode identically
        values = corrected[idx]
        residual = corrected.clone()
        residual[idx] = 0.0
        tensors[f"{key}::idx"] = idx.to(torch.int32).contiguous()
        tensors[f"{key}::val"] = values.contiguous()
        new_state[key] = residual.reshape(value.shape)
    return tensors, meta, new_state


def decode(
    tensors: Mapping[str, torch.Tensor],
    meta: Mapping[str, Any],
    *,
    expected_shapes: Mapping[str, Sequence[int]] | None = None,
) -> StateDict:
    """Rebuild the update `encode` compressed, in its original dtypes and shapes.

    Args:
        tensors: The received tensors.
        meta: The received meta.
        expected_shapes: If given (e.g. the global adapter's shapes), meta must declare exactly these keys and
            shapes; checked before anything is allocated, so a hostile meta cannot make the receiver allocate
            huge dense tensors for a sparse payload.

    Raises:
        ValueError: if meta names an unknown method, declares unexpected shapes, or a tensor is missing or of
            the wrong size.
    """
    method = meta.get("method")
    if method not in METHODS:
        raise ValueError(f"unknown compression method {method!r} in meta; expected one of {', '.join(METHODS)}")
    if expected_shapes is not None:
        declared = {k: list(v) for k, v in meta["shapes"].items()}
        wanted = {k: list(v) for k, v in expected_shapes.items()}
        if declared != wanted:
            bad = sorted(set(declared) ^ set(wanted)) or sorted(k for k in wanted if declared[k] != wanted[k])
            raise ValueError(f"compressed update declares keys/shapes that differ from the expected ones at {bad[0]!r}")
    out: StateDict = {}
    for key, shape in meta["shapes"].items():
        dtype = _DTYPES.get(meta["dtypes"][key], torch.float32)
        numel = math.prod(shape)
        try:
            if method in ("fp32", "bf16"):
                value = tensors[key].to(torch.float32).reshape(shape)
            elif method == "int8":
                q, scale = tensors[f"{key}::q"], tensors[f"{key}::scale"]
                block = int(meta["block_size"])
                if q.numel() != numel or scale.numel() != math.ceil(numel / block):
                    raise ValueError(f"int8 tensors of {key!r} do not match shape {shape}")
                value = _int8_decode(q, scale, shape, block)
            else:
                idx, val = tensors[f"{key}::idx"].to(torch.int64), tensors[f"{key}::val"].to(torch.float32)
                if (
                    idx.numel() != val.numel()
                    or idx.numel() != _topk_count(float(meta["ratio"]), numel)
                    or (idx.numel() and (idx.min() < 0 or idx.max() >= numel))
                ):
                    raise ValueError(f"topk tensors of {key!r} do not match shape {shape}")
                flat = torch.zeros(numel, dtype=torch.float32)
                flat[idx] = val
                value = flat.reshape(shape)
        except KeyError as exc:
            raise ValueError(f"compressed update ({method}) lacks tensor {exc.args[0]!r}") from exc
        except RuntimeError as exc:
            raise ValueError(f"compressed tensor {key!r} does not fit shape {shape}: {exc}") from exc
        out[key] = value.to(dtype)
    return out
