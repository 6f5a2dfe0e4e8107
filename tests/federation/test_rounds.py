"""End-to-end rounds over real ZeroMQ sockets on loopback, with CURVE, and a fake trainer."""

from __future__ import annotations

import torch

from fedllm.federation.aggregation.strategies import make_strategy
from tests.federation.conftest import FakeTrainer, federation, initial_state, write_exporter


async def test_three_silos_three_rounds_change_global_every_round(curve_homes):
    # Arrange
    published, states = [], [initial_state()]
    trainers = [FakeTrainer(i) for i in range(3)]
    snapshot = lambda v: states.append({k: t.clone() for k, t in coord.global_state.items()})  # noqa: E731
    async with federation(None, trainers, curve=curve_homes, exporter=write_exporter, on_publish=[published.append, snapshot],
                          strategy=make_strategy("fedavg"), rounds=3, min_silos=3) as (coord, silos):
        # Act
        await coord.wait_done(30)
    # Assert
    assert coord.phase == "done" and len(states) == 4
    for before, after in zip(states, states[1:]):
        assert any(not torch.equal(before[k], after[k]) for k in before), "global adapter did not change in a round"
    assert [r["participants"] for r in coord.history] == [["alpha", "beta", "gamma"]] * 3
    assert [v.version for v in published] == [1, 2, 3]
    assert published[-1].meta["round"] == 3 and published[-1].meta["participants"] == ["alpha", "beta", "gamma"]
    assert all(s.rounds_done == [1, 2, 3] for s in silos)
    assert all(r["bytes_in"] > 0 and r["bytes_out"] > 0 for r in coord.history)


async def test_fedavg_equals_independent_weighted_mean(tmp_path):
    # Arrange: plaintext on ipc://, silos with 10, 30 and 60 examples, no share cap
    init = initial_state()
    trainers = [FakeTrainer(i, examples=n) for i, n in enumerate((10, 30, 60))]
    async with federation(tmp_path, trainers, initial=init, rounds=1, min_silos=3, max_silo_share=1.0,
                          bind_address=f"ipc://{tmp_path}/fed.sock") as (coord, _):
        await coord.wait_done(30)
    # Act: the reference, computed from what each trainer ended with
    total = sum(t.examples for t in trainers)
    expected = {k: init[k] + sum((t.state[k] - init[k]) * t.examples for t in trainers) / total for k in init}
    # Assert
    for k in init:
        torch.testing.assert_close(coord.global_state[k], expected[k], rtol=1e-5, atol=1e-6)
