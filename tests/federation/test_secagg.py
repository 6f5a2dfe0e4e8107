"""Secure aggregation: the unmasked sum equals the plain sum within the quantisation bound, with dropouts."""

from __future__ import annotations

import base64
import json

import numpy as np
import pytest
import torch

from fedllm.core.errors import ProtocolError
from fedllm.federation.aggregation.secagg import (
    SecAggClient,
    SecAggConfig,
    SecAggServer,
    flat_layout,
    random_bytes_from_seed,
    shamir_combine,
    shamir_split,
)


def _wire(obj):
    """What the services do: everything crosses as JSON (bytes as base64)."""
    if isinstance(obj, bytes):
        return base64.b64decode(json.loads(json.dumps(base64.b64encode(obj).decode())))
    return json.loads(json.dumps(obj))


def _updates(ids, seed: int = 0) -> dict[str, dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return {s: {"lora_A.weight": 0.2 * torch.randn(8, 16, generator=g),
                "lora_B.weight": 0.2 * torch.randn(16, 8, generator=g)} for s in ids}


def _bound(config: SecAggConfig, n: int) -> float:
    """Documented error bound of the sum: n / (2 S)."""
    return n / (2 * config.scale(n)) + 1e-6  # + float32 rounding of the result


def _run(config, updates, *, drop_before_mask=(), drop_before_unmask=(), seed: int = 1):
    ids = sorted(updates)
    server = SecAggServer(config, flat_layout(updates[ids[0]]))
    clients = {s: SecAggClient(s, config, rand=random_bytes_from_seed(seed + i)) for i, s in enumerate(ids)}
    for c in clients.values():
        server.add_advertisement(_wire(c.advertise()))
    roster = _wire(server.roster())
    for s, c in clients.items():
        server.add_shares(s, _wire(c.share_keys(roster)))
    masked = {}
    for s, c in clients.items():
        masked[s] = c.mask(_wire(server.shares_for(s)), updates[s])  # every silo masks...
        if s not in drop_before_mask:
            server.add_masked(s, _wire(masked[s]))  # ...but the dropped ones never deliver it
    survivors = _wire(server.survivors())
    for s in survivors:
        if s not in drop_before_unmask:
            server.add_unmask(s, _wire(clients[s].unmask(survivors)))
    return server.aggregate(), survivors, masked


def test_sum_equals_plain_sum_within_quantisation_error():
    # Arrange
    config = SecAggConfig(threshold=3, clip_range=1.0, context="run/1")
    updates = _updates(["a", "b", "c", "d"])
    # Act
    total, survivors, _ = _run(config, updates)
    # Assert
    assert survivors == ["a", "b", "c", "d"]
    for key in total:
        plain = sum(updates[s][key] for s in survivors)
        assert total[key].shape == plain.shape
        assert float((total[key] - plain).abs().max()) <= _bound(config, 4)


def test_sum_is_recovered_when_a_silo_drops_after_masking():
    # Arrange: "b" computed its masked input (others masked against it too) but it never arrives
    config = SecAggConfig(threshold=3, clip_range=1.0, context="run/2")
    updates = _updates(["a", "b", "c", "d"], seed=5)
    # Act
    total, survivors, _ = _run(config, updates, drop_before_mask=["b"])
    # Assert: the sum of the three survivors, b's pair masks removed via its reconstructed key
    assert survivors == ["a", "c", "d"]
    for key in total:
        plain = sum(updates[s][key] for s in survivors)
        assert float((total[key] - plain).abs().max()) <= _bound(config, 4)


def test_survivor_silent_at_unmask_is_still_counted():
    # "d" delivers its masked input but never answers the unmask step: the others hold enough shares of its b.
    config = SecAggConfig(threshold=2, clip_range=1.0)
    updates = _updates(["a", "b", "c", "d"], seed=6)
    total, survivors, _ = _run(config, updates, drop_before_mask=["a"], drop_before_unmask=["d"])
    assert survivors == ["b", "c", "d"]
    for key in total:
        plain = updates["b"][key] + updates["c"][key] + updates["d"][key]
        assert float((total[key] - plain).abs().max()) <= _bound(config, 4)


def test_masked_input_alone_reveals_nothing_useful():
    config = SecAggConfig(threshold=2, clip_range=1.0)
    updates = _updates(["a", "b", "c"], seed=7)
    _, _, masked = _run(config, updates)
    # A single masked vector looks uniform over 2^32: its mean is near 2^31, far from a quantised small update.
    values = np.frombuffer(masked["a"], dtype="<u4").astype(np.float64)
    assert abs(values.mean() / 2**31 - 1) < 0.1
    assert values.std() > 2**30


def test_values_beyond_clip_range_are_clamped():
    config = SecAggConfig(threshold=2, clip_range=0.5)
    updates = {s: {"w": torch.tensor([2.0, -0.25])} for s in ("a", "b")}
    total, _, _ = _run(config, updates)
    assert torch.allclose(total["w"], torch.tensor([1.0, -0.5]), atol=_bound(config, 2))


def test_shamir_any_t_shares_rebuild_the_secret():
    secret = bytes(range(32))
    shares = shamir_split(secret, n=5, t=3, rand=random_bytes_from_seed(0))
    assert shamir_combine([shares[0], shares[2], shares[4]]) == secret
    assert shamir_combine([shares[3], shares[1], shares[0]]) == secret
    with pytest.raises(ValueError, match="too few or corrupted"):
        shamir_combine(shares[:2])  # below threshold


def test_too_few_parties_fail_cleanly():
    config = SecAggConfig(threshold=3)
    updates = _updates(["a", "b", "c"])
    with pytest.raises(ProtocolError, match="masked inputs < threshold 3"):
        _run(config, updates, drop_before_mask=["c"])
    server = SecAggServer(config, flat_layout(updates["a"]))
    server.add_advertisement(SecAggClient("a", config).advertise())
    with pytest.raises(ProtocolError, match="threshold is 3"):
        server.roster()


def test_protocol_misuse_is_refused():
    config = SecAggConfig(threshold=2)
    client = SecAggClient("a", config)
    with pytest.raises(ProtocolError, match="expected step 'advertise'"):
        client.unmask(["a", "b"])
    # a tampered ciphertext fails authentication
    updates = _updates(["a", "b"])
    server = SecAggServer(config, flat_layout(updates["a"]))
    clients = {s: SecAggClient(s, config) for s in ("a", "b")}
    for c in clients.values():
        server.add_advertisement(c.advertise())
    roster = server.roster()
    for s, c in clients.items():
        server.add_shares(s, c.share_keys(roster))
    ct = bytearray(base64.b64decode(server.shares_for("a")["b"]))
    ct[-1] ^= 1
    with pytest.raises(ProtocolError, match="fail authentication"):
        clients["a"].mask({"b": base64.b64encode(bytes(ct)).decode()}, updates["a"])
    with pytest.raises(ProtocolError, match="bytes, expected"):
        server.add_masked("b", b"\x00" * 12)


def test_config_validation():
    with pytest.raises(ValueError, match="threshold"):
        SecAggConfig(threshold=1)
    with pytest.raises(ValueError, match="bits"):
        SecAggConfig(threshold=2, bits=16)
