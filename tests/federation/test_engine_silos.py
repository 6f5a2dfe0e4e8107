"""Real training loops behind SiloClient on the tiny Llama: the engine's EngineTrainer and the custom HF example."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from fedllm.federation.demo.data import generate
from fedllm.federation.runtime.silo import EngineTrainer
from fedllm.testing.factories import REPO, make_settings
from tests.federation.conftest import federation


def _load_example():
    spec = importlib.util.spec_from_file_location("custom_trainer", REPO / "examples" / "custom_trainer.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
async def test_custom_hf_trainer_example_federates_over_curve(curve_homes, tiny_model_dir: Path):
    # Arrange: two silos running the example's HF Trainer loop, the coordinator starting from the same LoRA shape
    example = _load_example()
    data = generate()
    trainers = {}
    for name, org in zip(("alpha", "beta"), ("northbridge", "lakeside")):
        tok = example.AutoTokenizer.from_pretrained(tiny_model_dir)
        texts = [tok.apply_chat_template(r["messages"], tokenize=False) for r in data[org]["train"][:8]]
        trainers[name] = example.HFSilo(str(tiny_model_dir), texts, seed=0)
    init = trainers["alpha"].get_state()
    async with federation(None, [trainers["alpha"], trainers["beta"]], curve=curve_homes, initial=init, rounds=2,
                          min_silos=2, local_steps=2, compression="bf16", round_deadline_s=120, silo_timeout_s=30) as (coord, silos):
        # Act
        await coord.wait_done(180)
    # Assert
    assert coord.phase == "done" and [r["participants"] for r in coord.history] == [["alpha", "beta"]] * 2
    assert any(not torch.equal(init[k], coord.global_state[k]) for k in init)
    assert all(s.rounds_done == [1, 2] for s in silos)


@pytest.mark.slow
async def test_engine_trainer_round_registers_a_loadable_adapter(tmp_path, tiny_model_dir: Path):
    # Arrange: the built-in engine in two silos, the global adapter exported with train.save_adapter_dir
    from fedllm import train

    from fedllm.core.adapter_registry import AdapterRegistry

    cfg = make_settings(tmp_path).train.model_copy(update={"max_seq_len": 64, "batch_size": 2, "warmup_steps": 0, "zero_stage": 0})
    data = generate()
    init = train.initial_adapter_state(cfg, tiny_model_dir)
    published = []
    trainers = [EngineTrainer(cfg, tiny_model_dir, data[org]["train"][:12], data[org]["eval"][:4]) for org in ("northbridge", "redwood")]
    async with federation(tmp_path, trainers, initial=init, on_publish=[published.append],
                          exporter=lambda state, out: train.save_adapter_dir(state, cfg, tiny_model_dir, out),
                          rounds=1, min_silos=2, local_steps=2, round_deadline_s=300, silo_timeout_s=60) as (coord, _):
        # Act
        await coord.wait_done(240)
    # Assert: one registered version, with lineage, whose weights are the global state
    assert coord.phase == "done" and len(published) == 1
    version = AdapterRegistry(coord.settings.adapters_dir).get("testrun:1")
    assert version.meta["round"] == 1 and version.meta["participants"] == ["s0", "s1"]
    assert "eval_loss" in version.meta["metrics"] and "train_loss" in version.meta["metrics"]
    loaded = train.load_adapter_state(version.path)
    assert loaded.keys() == coord.global_state.keys()
    for k in loaded:
        torch.testing.assert_close(loaded[k].float(), coord.global_state[k], rtol=1e-2, atol=1e-3)
