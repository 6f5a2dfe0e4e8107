"""train.gradient_checkpointing: the same update with and without it (the activations are recomputed, not changed),
and every step's record carries its peak resident memory."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.train.conftest import small_cfg
from fedllm.train import fit_adapter


def test_checkpointing_is_on_by_default():
    from fedllm.core.sections.train import TrainSettings

    assert TrainSettings().gradient_checkpointing is True


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_checkpointed_training_computes_the_same_adapter_and_records_peak_memory(tiny_model_dir: Path, records, dropout):
    results, steps = {}, {}
    for on in (True, False):
        seen: list[dict] = []
        results[on] = fit_adapter(small_cfg(gradient_checkpointing=on, lora_dropout=dropout), tiny_model_dir, records,
                                  max_steps=3, progress=seen.append)
        steps[on] = seen
    a, b = results[True].state, results[False].state
    assert a.keys() == b.keys()
    for key in a:  # recomputed activations, same dropout masks: equal up to float32 rounding of the recomputation
        assert (a[key] - b[key]).abs().max().item() < 1e-5, key
    assert [s["loss"] for s in steps[True]] == pytest.approx([s["loss"] for s in steps[False]], rel=1e-5)
    for on in (True, False):
        assert all(s["peak_rss_mb"] > 50 for s in steps[on])  # a real process's resident peak, in MiB


def test_the_base_model_has_checkpointing_turned_on_and_off(tiny_model_dir: Path):
    import torch

    from fedllm.train import lora

    model = lora.build_peft_model(small_cfg(), tiny_model_dir, torch.float32)
    lora.set_gradient_checkpointing(model, True)
    assert model.get_base_model().is_gradient_checkpointing
    lora.set_gradient_checkpointing(model, False)
    assert not model.get_base_model().is_gradient_checkpointing
