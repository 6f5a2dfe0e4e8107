"""The Flower side of bench/federation_vs_flower.py trains exactly as our engine does, given the same batches: same
tokens and answer masks, and, step for step, the same LoRA weights. The bench then compares the two systems (their
rounds, transport and batch order), not two different training loops."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from tests.train.conftest import arithmetic_records, small_cfg, write_jsonl

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_the_engine_and_flowers_client_loop_agree_on_the_same_batches(tiny_model_dir: Path, tmp_path: Path) -> None:
    sys.path.insert(0, str(REPO / "bench" / "flower_app"))
    from fedllm_lora import task

    from fedllm.train import data as datamod
    from fedllm.train import fit_adapter, initial_adapter_state, lora

    # Arrange: 24 chat rows; our engine's first 3 micro-batches (epoch 0 of its seeded order)
    records = arithmetic_records()
    path = write_jsonl(tmp_path / "train.jsonl", records)
    cfg = small_cfg(lr=1e-3, lr_scheduler="constant", packing=False)
    init = initial_adapter_state(cfg, tiny_model_dir)
    order = datamod.epoch_order(len(records), cfg.seed, 0)
    batches = [order[k * cfg.batch_size:(k + 1) * cfg.batch_size] for k in range(3)]
    tokenizer = task.load_tokenizer(str(tiny_model_dir))
    flower_rows = task.tokenize(tokenizer, str(path), cfg.max_seq_len)
    model = task.load_model(str(tiny_model_dir), {"lora-r": cfg.lora_r, "lora-alpha": cfg.lora_alpha, "target-modules":
                                                 ",".join(lora.count_parameters(cfg, tiny_model_dir).target_modules)})
    task.set_state(model, init)
    # Act
    ours = fit_adapter(cfg, tiny_model_dir, path, init_state=init, max_steps=3).state
    task.train(model, tokenizer, flower_rows, {"lr": cfg.lr, "weight-decay": cfg.weight_decay,
                                               "max-grad-norm": cfg.max_grad_norm}, seed=0, batches=batches)
    flower = task.get_state(model)
    # Assert
    ours_rows = datamod.unpacked_rows(datamod.tokenize_records(tokenizer, records, cfg.max_seq_len))
    assert flower_rows == [(r.input_ids, r.labels) for r in ours_rows]
    assert ours.keys() == flower.keys()
    assert all(torch.allclose(ours[k], flower[k], rtol=1e-4, atol=1e-6) for k in ours)
    assert any(not torch.equal(ours[k], init[k]) for k in ours)  # it trained
