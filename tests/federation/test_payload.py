"""The payload entry point (federation/wire/payload.py): the frames it writes are those of the layers under it (the
codec's tensors in a safetensors frame), and what it decodes is the adapter that was encoded."""

from __future__ import annotations

import pytest
import torch

from fedllm.core.errors import ProtocolError
from fedllm.federation.wire import codec, frames
from fedllm.federation.wire.payload import decode_payload, downlink_method, encode_payload
from fedllm.federation.wire.protocol import MsgType, TrainTask, UpdateResult, make_header

SHAPES = {"m.lora_A.weight": (4, 32), "m.lora_B.weight": (32, 4)}


def _state(seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {k: torch.randn(*s, generator=gen) for k, s in SHAPES.items()}


@pytest.mark.parametrize("method", ["fp32", "bf16", "int8", "topk"])
def test_the_frames_are_those_of_the_codec_and_frame_layers_and_decode_back(method):
    state, residual, layered_residual = _state(), {}, {}
    for _ in range(2):  # twice: top-k's residual carries over the same way
        encoded = encode_payload(state, method, residual=residual)
        header = make_header(MsgType.UPDATE, UpdateResult(num_examples=3, encoding=encoded.meta), round_id=1, silo_id="s")
        tensors, meta = codec.encode(state, method, state=layered_residual)
        assert meta == encoded.meta
        assert encoded.frames(header) == frames.encode(header, tensors)
    sent = encoded.frames(header)
    decoded = decode_payload(frames.decode_header(sent), sent, expected_shapes={k: list(s) for k, s in SHAPES.items()})
    assert set(decoded) == set(SHAPES) and all(decoded[k].dtype == torch.float32 for k in SHAPES)
    if method == "fp32":
        assert all(torch.equal(decoded[k], state[k]) for k in SHAPES)


def test_the_downlink_is_fp32_or_bf16_and_one_payload_serves_many_headers():
    assert [downlink_method(m) for m in ("fp32", "bf16", "int8", "topk")] == ["fp32", "bf16", "bf16", "bf16"]
    encoded = encode_payload(_state(), "bf16")
    a, b = (encoded.frames(make_header(MsgType.TRAIN, TrainTask(local_steps=5, encoding=encoded.meta), round_id=1,
                                       silo_id=s)) for s in ("s0", "s1"))
    assert a[1] is b[1] and a[0] != b[0]  # the same payload bytes object, a header per silo


def test_a_payload_that_is_not_its_encoding_is_a_protocol_error():
    encoded = encode_payload(_state(), "int8")
    meta = {**encoded.meta, "block_size": 7}  # the int8 tensors do not fit this block size
    sent = encoded.frames(make_header(MsgType.UPDATE, UpdateResult(num_examples=3, encoding=meta), round_id=1, silo_id="s"))
    with pytest.raises(ProtocolError, match="int8"):
        decode_payload(frames.decode_header(sent), sent)
    with pytest.raises(ProtocolError, match="differ from the expected"):
        decode_payload(frames.decode_header(sent), sent, expected_shapes={"other": [1, 1]})
