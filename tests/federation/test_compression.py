"""Compression round trips within the stated error; top-k error feedback keeps what was not sent."""

from __future__ import annotations

import json

import pytest
import torch

from fedllm.federation.wire.compression import METHODS, decode, encode, payload_bytes


def _update(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"lora_A.weight": torch.randn(8, 576, generator=g) * 0.02, "lora_B.weight": torch.randn(576, 8, generator=g)}


@pytest.mark.parametrize("method", METHODS)
def test_round_trip_keeps_keys_shapes_dtypes_and_json_meta(method):
    u = {**_update(), "half": torch.randn(3, 5).to(torch.bfloat16)}
    tensors, meta, _ = encode(u, method)
    out = decode(tensors, json.loads(json.dumps(meta)))
    assert sorted(out) == sorted(u)
    assert all(out[k].shape == u[k].shape and out[k].dtype == u[k].dtype for k in u)


def test_fp32_is_exact_and_bf16_within_relative_2_pow_minus_8():
    u = _update()
    t32, m32, _ = encode(u, "fp32")
    t16, m16, _ = encode(u, "bf16")
    assert all(torch.equal(decode(t32, m32)[k], u[k]) for k in u)
    back = decode(t16, m16)
    for k in u:
        assert torch.all((back[k] - u[k]).abs() <= u[k].abs() * 2**-8)
    assert payload_bytes(t16) * 2 == payload_bytes(t32)


def test_int8_hand_computed_block():
    # Arrange: one block of 4 values, absmax 2 -> scale 2/127
    u = {"w": torch.tensor([2.0, -1.0, 0.5, 0.0])}
    # Act
    tensors, meta, state = encode(u, "int8", block_size=4)
    # Assert
    assert state is None
    assert tensors["w::q"].tolist() == [127, -64, 32, 0]  # round(-63.5) = -64 (half to even), round(31.75) = 32
    assert tensors["w::scale"].tolist() == pytest.approx([2 / 127])
    assert torch.allclose(decode(tensors, meta)["w"], torch.tensor([2.0, -64 * 2 / 127, 32 * 2 / 127, 0.0]))


def test_int8_error_within_absmax_over_254_per_block():
    u = _update(1)
    tensors, meta, _ = encode(u, "int8", block_size=64)
    back = decode(tensors, meta)
    for k, v in u.items():
        flat, err = v.reshape(-1), (back[k] - v).reshape(-1).abs()
        for start in range(0, flat.numel(), 64):
            block = flat[start : start + 64]
            assert float(err[start : start + 64].max()) <= float(block.abs().max()) / 254 + 1e-7
    # a quarter of fp32, plus one float32 scale per 64 values
    numel = sum(v.numel() for v in u.values())
    assert payload_bytes(tensors) == numel + 4 * (numel // 64)


def test_topk_hand_computed_and_error_feedback():
    # Arrange
    u = {"w": torch.tensor([0.1, -3.0, 2.0, 0.5])}
    # Act: round 1 keeps the 2 largest magnitudes
    t1, m1, s1 = encode(u, "topk", ratio=0.5)
    # Assert
    assert decode(t1, m1)["w"].tolist() == pytest.approx([0.0, -3.0, 2.0, 0.0])
    assert s1["w"].tolist() == pytest.approx([0.1, 0.0, 0.0, 0.5])
    # Act: round 2 with a zero update sends the residual
    t2, m2, s2 = encode({"w": torch.zeros(4)}, "topk", state=s1, ratio=0.5)
    assert decode(t2, m2)["w"].tolist() == pytest.approx([0.1, 0.0, 0.0, 0.5])
    assert s2["w"].tolist() == pytest.approx([0.0, 0.0, 0.0, 0.0])
    assert s1["w"].tolist() == pytest.approx([0.1, 0.0, 0.0, 0.5])  # encode is pure: the old state is untouched


def test_topk_error_feedback_loses_nothing_over_rounds():
    # Sum of everything decoded + the final residual == sum of everything encoded.
    state, sent = None, {k: torch.zeros_like(v) for k, v in _update().items()}
    total = {k: torch.zeros_like(v) for k, v in sent.items()}
    for r in range(5):
        u = _update(r)
        tensors, meta, state = encode(u, "topk", state=state, ratio=0.05)
        back = decode(tensors, meta)
        for k in u:
            sent[k] += back[k]
            total[k] += u[k]
    for k in total:
        assert torch.allclose(sent[k] + state[k], total[k], atol=1e-5)
    # 5 % of the values, each an int32 index + a float32 value
    numel = sum(v.numel() for v in total.values())
    assert payload_bytes(tensors) == pytest.approx(8 * 0.05 * numel, rel=0.01)


def test_decode_rejects_missing_or_bad_tensors():
    u = {"w": torch.randn(10)}
    tensors, meta, _ = encode(u, "int8")
    with pytest.raises(ValueError, match="lacks tensor 'w::scale'"):
        decode({"w::q": tensors["w::q"]}, meta)
    with pytest.raises(ValueError, match="unknown compression method"):
        decode(tensors, {**meta, "method": "zip"})
    t, m, _ = encode(u, "topk", ratio=0.2)
    with pytest.raises(ValueError, match="do not match"):
        decode({"w::idx": torch.tensor([0, 99], dtype=torch.int32), "w::val": t["w::val"]}, m)
    with pytest.raises(ValueError, match="unknown compression method"):
        encode(u, "gzip")


def test_decode_checks_declared_shapes_before_allocating():
    # A hostile meta claims a huge tensor for a tiny sparse payload.
    tensors, meta, _ = encode({"w": torch.randn(10)}, "topk", ratio=0.2)
    hostile = {**meta, "shapes": {"w": [10**12]}}
    with pytest.raises(ValueError, match="differ from the expected ones at 'w'"):
        decode(tensors, hostile, expected_shapes={"w": (10,)})
    with pytest.raises(ValueError, match="do not match"):
        decode(tensors, hostile)  # 2 indices cannot be 20 % of 10^12 values
    assert decode(tensors, meta, expected_shapes={"w": (10,)})["w"].shape == (10,)
