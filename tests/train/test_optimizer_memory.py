"""A kept optimizer: a silo's rounds on one `Trainer` continue one AdamW (moments and step count) as one long run would."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from tests.train.conftest import small_cfg


def _close(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.allclose(a[k], b[k], rtol=1e-4, atol=1e-6) for k in a)


@pytest.mark.slow
@pytest.mark.parametrize("zero_stage", [0, 2])
def test_two_calls_with_a_kept_optimizer_equal_one_long_call(tiny_model_dir: Path, records, zero_stage: int) -> None:
    from fedllm.train import TrainPlan, Trainer, fit_adapter, initial_adapter_state

    cfg = small_cfg(lr=1e-3, lr_scheduler="constant", packing=False, zero_stage=zero_stage)
    init = initial_adapter_state(cfg, tiny_model_dir)
    whole = fit_adapter(cfg, tiny_model_dir, records, init_state=init, max_steps=4).state
    # two "rounds" of 2 steps; round 2 starts from round 1's weights, as a silo does when it alone takes part
    trainer = Trainer(cfg, tiny_model_dir)
    first = trainer.fit(TrainPlan(records, init_state=init, max_steps=2, schedule_span=(0, 4), keep_optimizer=True,
                                  reset_optimizer=True)).state
    fresh = trainer.fit(TrainPlan(records, init_state=first, max_steps=2, schedule_span=(2, 4))).state  # leaves the kept state
    kept = trainer.fit(TrainPlan(records, init_state=first, max_steps=2, schedule_span=(2, 4), keep_optimizer=True)).state
    assert _close(kept, whole)
    assert not _close(fresh, whole)  # a fresh AdamW's first steps differ: that is what keeping changes


@pytest.mark.slow
def test_a_reset_or_a_different_shape_starts_a_fresh_optimizer(tiny_model_dir: Path, records, caplog) -> None:
    from fedllm.train import TrainPlan, Trainer, fit_adapter, initial_adapter_state

    cfg = small_cfg(lr=1e-3, lr_scheduler="constant", packing=False)
    init = initial_adapter_state(cfg, tiny_model_dir)
    trainer = Trainer(cfg, tiny_model_dir)
    trainer.fit(TrainPlan(records, init_state=init, max_steps=2, keep_optimizer=True, reset_optimizer=True))
    reset = trainer.fit(TrainPlan(records, init_state=init, max_steps=2, keep_optimizer=True, reset_optimizer=True)).state
    plain = fit_adapter(cfg, tiny_model_dir, records, init_state=init, max_steps=2).state
    assert _close(reset, plain)
    # the Trainer now keeps r=8 moments; an r=4 adapter cannot use them and trains as a fresh optimizer would
    cfg4 = small_cfg(lr=1e-3, lr_scheduler="constant", packing=False, lora_r=4)
    init4 = initial_adapter_state(cfg4, tiny_model_dir)
    with caplog.at_level(logging.WARNING, logger="fedllm.train.optimizer_memory"):
        other = trainer.fit(TrainPlan(records, init_state=init4, max_steps=2, keep_optimizer=True, settings={"lora_r": 4})).state
    assert "other parameter shapes" in caplog.text
    assert _close(other, fit_adapter(cfg4, tiny_model_dir, records, init_state=init4, max_steps=2).state)
