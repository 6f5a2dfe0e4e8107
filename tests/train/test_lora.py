"""LoRA accounting (meta device vs peft's own count), adapter save/load and deterministic init."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedllm.core.errors import ConfigError, DataError
from tests.train.conftest import small_cfg
from fedllm.train import initial_adapter_state, load_adapter_state, save_adapter_dir
from fedllm.train import lora


@pytest.mark.parametrize("targets", [None, ["all-linear"], ["q_proj", "v_proj", "down_proj"]])
def test_dry_run_counts_equal_peft(tiny_model_dir: Path, targets) -> None:
    import torch

    cfg = small_cfg(lora_r=4, target_modules=targets)
    report = lora.count_parameters(cfg, tiny_model_dir)
    trainable, total = lora.build_peft_model(cfg, tiny_model_dir, torch.float32).get_nb_trainable_parameters()
    assert (report.trainable_params, report.total_params) == (trainable, total)
    assert report.adapter_bytes_fp32 == 4 * trainable and report.adapter_bytes_bf16 == 2 * trainable


def test_dry_run_on_the_embedded_model_loads_no_weights(embedded_model_dir: Path) -> None:
    # SmolLM2-135M, r=8 on q/k/v/o: 921,600 trainable parameters in 240 tensors (checked with peft)
    report = lora.count_parameters(small_cfg(lora_r=8), embedded_model_dir / "config.json")
    assert report.trainable_params == 921_600 and report.adapter_tensors == 240
    assert report.target_modules == ["q_proj", "k_proj", "v_proj", "o_proj"]
    assert 0.006 < report.trainable_share < 0.007


def test_unknown_target_module_is_a_config_error(tiny_model_dir: Path) -> None:
    with pytest.raises(ConfigError, match="nope"):
        lora.count_parameters(small_cfg(target_modules=["nope"]), tiny_model_dir)


def test_initial_state_is_deterministic_and_round_trips_through_a_peft_folder(tiny_model_dir: Path, tmp_path: Path) -> None:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    cfg = small_cfg()
    a, b = initial_adapter_state(cfg, tiny_model_dir), initial_adapter_state(cfg, tiny_model_dir)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any(k.endswith("lora_B.weight") for k in a) and all(not a[k].any() for k in a if "lora_B" in k)
    c = initial_adapter_state(small_cfg(seed=1), tiny_model_dir)
    assert any(not torch.equal(a[k], c[k]) for k in a if "lora_A" in k)

    out = save_adapter_dir(a, cfg, tiny_model_dir, tmp_path / "adapter")
    loaded = load_adapter_state(out)
    assert loaded.keys() == a.keys() and all(torch.equal(loaded[k], a[k]) for k in a)
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), str(out))  # peft loads it
    assert lora.adapter_state(peft_model).keys() == a.keys()


def test_a_state_that_does_not_fit_is_refused(tiny_model_dir: Path) -> None:
    import torch

    state = initial_adapter_state(small_cfg(), tiny_model_dir)
    key = next(iter(state))
    with pytest.raises(DataError, match="missing"):
        lora.build_peft_model(small_cfg(), tiny_model_dir, torch.float32, {k: v for k, v in state.items() if k != key})
    with pytest.raises(DataError, match="shape mismatch"):
        lora.build_peft_model(small_cfg(), tiny_model_dir, torch.float32, {**state, key: torch.zeros(1, 1)})
