"""The local-training part of a round's plan: LR schedule across rounds and frozen A, from coordinator to trainer."""

from __future__ import annotations

import pytest

from fedllm.federation.runtime.coordinator import Coordinator
from fedllm.federation.runtime.local_training import round_schedule, train_overrides
from fedllm.federation.runtime.silo import SiloClient
from fedllm.federation.aggregation.strategies import make_strategy
from tests.federation.conftest import FakeTrainer, fed_settings, initial_state, silo_settings


def test_round_schedules():
    assert round_schedule("round", 2, 4, 3) == {}
    assert round_schedule("constant", 2, 4, 3) == {"schedule_span": [4, 12], "lr_scheduler": "constant"}
    assert round_schedule("federation", 3, 4, 3) == {"schedule_span": [8, 12]}
    with pytest.raises(ValueError, match="lr_schedule"):
        round_schedule("cosine", 1, 4, 3)
    # keeping the silos' optimizers: round 1 drops what an earlier run left, later rounds continue
    assert round_schedule("round", 1, 4, 3, "keep") == {"local_optimizer": "fresh"}
    assert round_schedule("constant", 2, 4, 3, "keep") == {"local_optimizer": "keep", "schedule_span": [4, 12], "lr_scheduler": "constant"}
    with pytest.raises(ValueError, match="local_optimizer"):
        round_schedule("constant", 1, 4, 3, "sometimes")


def test_train_overrides_turn_a_plan_into_settings_and_keywords():
    updates, kwargs = train_overrides({"schedule_span": [4, 12], "lr_scheduler": "constant", "lora_freeze_a": True, "prox_mu": 0.1})
    assert updates == {"lr_scheduler": "constant", "lora_freeze_a": True}
    assert kwargs == {"prox_mu": 0.1, "schedule_span": (4, 12)}
    assert train_overrides({}) == ({}, {"prox_mu": 0.0})
    with pytest.raises(ValueError, match="schedule_span"):
        train_overrides({"schedule_span": "0:12"})
    assert train_overrides({"local_optimizer": "fresh"})[1] == {"prox_mu": 0.0, "keep_optimizer": True, "reset_optimizer": True}
    assert train_overrides({"local_optimizer": "keep"})[1] == {"prox_mu": 0.0, "keep_optimizer": True, "reset_optimizer": False}
    with pytest.raises(ValueError, match="local_optimizer"):
        train_overrides({"local_optimizer": "always"})


def test_an_engine_silo_plans_a_kept_optimizer_only_when_the_round_asks(tmp_path):
    from fedllm.federation.runtime.silo import EngineTrainer
    from tests.train.conftest import small_cfg

    a = EngineTrainer(small_cfg(), tmp_path, [])
    _, plan = a.round_overrides({"local_optimizer": "keep"})
    assert plan["keep_optimizer"] is True and plan["reset_optimizer"] is False
    assert "keep_optimizer" not in a.round_overrides({})[1]  # federation.local_optimizer=fresh sends nothing


@pytest.mark.parametrize("lr_schedule, strategy", [("federation", "ffa"), ("constant", "fedavg")])
async def test_every_round_tells_silos_where_they_stand_in_the_schedule(tmp_path, lr_schedule, strategy):
    # Arrange
    settings = fed_settings(tmp_path / "c", plaintext=True, rounds=3, min_silos=2, local_steps=4, lr_schedule=lr_schedule)
    coord = Coordinator(settings, make_strategy(strategy), initial_state=initial_state(), exporter=False)
    address = await coord.start()
    trainers = [FakeTrainer(i) for i in range(2)]
    silos = [SiloClient(silo_settings(tmp_path / f"s{i}", address, f"s{i}", plaintext=True), t) for i, t in enumerate(trainers)]
    try:
        for s in silos:
            await s.start()
        # Act
        await coord.wait_done(30)
    finally:
        for s in silos:
            await s.stop()
        await coord.stop()
    # Assert
    for t in trainers:
        assert [c["config"]["schedule_span"] for c in t.calls] == [[0, 12], [4, 12], [8, 12]]
        assert all(c["config"].get("lr_scheduler") == ("constant" if lr_schedule == "constant" else None) for c in t.calls)
        assert all(c["config"].get("lora_freeze_a", False) == (strategy == "ffa") for c in t.calls)
        assert [c["config"]["local_optimizer"] for c in t.calls] == ["fresh", "keep", "keep"]  # the default: keep


@pytest.mark.slow
def test_a_real_engine_silo_keeps_its_optimizer_across_the_rounds_the_coordinator_plans(tiny_model_dir):
    # What the FakeTrainer tests above take on trust, on the real engine: two planned rounds of 2 steps under
    # local_optimizer=keep train exactly as one 4-step run (same weights, optimizer moments and batches).
    import torch

    from fedllm import train
    from fedllm.federation.runtime.silo import EngineTrainer
    from tests.train.conftest import arithmetic_records, small_cfg

    records = arithmetic_records()
    cfg = small_cfg(lr=1e-3, lr_scheduler="constant", packing=False)
    whole = train.fit_adapter(cfg, tiny_model_dir, records, init_state=train.initial_adapter_state(cfg, tiny_model_dir),
                              max_steps=4).state
    trainer = EngineTrainer(cfg, tiny_model_dir, records)
    for round_id in (1, 2):
        trainer.fit(2, round_schedule("constant", round_id, 2, 2, "keep"))
    state = trainer.get_state()
    assert all(torch.allclose(state[k], whole[k], rtol=1e-4, atol=1e-6) for k in whole)
