"""A long-lived `Trainer` (a silo's rounds, a rank group's rounds) keeps the base model loaded between trainings.

Reusing it must change nothing: rounds trained on a kept base equal rounds trained on a base loaded from disk each
time, the kept base holds no LoRA layer and the original weights, and ZeRO-3 (which partitions the base) never keeps it.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.train.conftest import arithmetic_records, small_cfg


def _two_rounds(cfg, model_dir: Path, keep_base: bool):
    """Two rounds on one Trainer: (the second round's adapter, the Trainer)."""
    from fedllm.train import TrainPlan, Trainer

    trainer = Trainer(cfg, model_dir, keep_base=keep_base)
    first = trainer.fit(TrainPlan(arithmetic_records(16), max_steps=2))
    second = trainer.fit(TrainPlan(arithmetic_records(16), init_state=first.state, max_steps=2))
    return second.state, trainer


@pytest.fixture()
def count_loads(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    from fedllm.train import lora

    loads: list[str] = []
    real = lora.load_base_model
    monkeypatch.setattr(lora, "load_base_model", lambda d, t: loads.append(str(d)) or real(d, t))
    return loads


@pytest.mark.parametrize("zero_stage", [0, 2])
def test_rounds_on_a_kept_base_equal_rounds_on_a_freshly_loaded_base(tiny_model_dir: Path, count_loads: list[str], zero_stage: int) -> None:
    import torch

    from fedllm.train import lora

    # Arrange
    cfg = small_cfg(lora_dropout=0.0, zero_stage=zero_stage, max_seq_len=64, batch_size=2, threads=1)
    fresh, _ = _two_rounds(cfg, tiny_model_dir, keep_base=False)
    loads_without_reuse = len(count_loads)

    # Act
    kept, trainer = _two_rounds(cfg, tiny_model_dir, keep_base=True)

    # Assert: one load for two rounds, and the same adapter bit for bit
    assert loads_without_reuse == 2 and len(count_loads) - loads_without_reuse == 1
    assert kept.keys() == fresh.keys()
    assert all(torch.equal(kept[k], fresh[k]) for k in kept)
    base = trainer.bases.take(tiny_model_dir, torch.float32)
    assert len(count_loads) == 3  # the kept one, not a new load
    assert not any("lora" in name for name, _ in base.named_modules())
    reference = lora.load_base_model(tiny_model_dir, torch.float32).state_dict()
    assert all(torch.equal(t, reference[k]) for k, t in base.state_dict().items())
    assert not any(p.requires_grad for p in base.parameters())


def test_zero3_never_keeps_the_base(tiny_model_dir: Path, count_loads: list[str]) -> None:
    from fedllm.train import TrainPlan, Trainer

    # Arrange
    cfg = small_cfg(lora_dropout=0.0, zero_stage=3, max_seq_len=64, batch_size=2, threads=1)
    trainer = Trainer(cfg, tiny_model_dir, keep_base=True)

    # Act
    for _ in range(2):
        trainer.fit(TrainPlan(arithmetic_records(16), max_steps=1))

    # Assert
    assert len(count_loads) == 2 and len(trainer.bases) == 0
