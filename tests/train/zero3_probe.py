"""Run under DeepSpeed's launcher by tests/train/test_ranks.py: how much of the model each ZeRO-3 rank holds.

    python -m deepspeed.launcher.runner --num_gpus 2 --module tests.train.zero3_probe MODEL_DIR OUT_DIR

Builds the engine's LoRA model and DeepSpeed config (ZeRO-3) as `fit_adapter` does, trains one step, and writes
OUT_DIR/rank-R.json: the parameter elements this rank holds (its partitions) and the model's total.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def main(model_dir: Path, out_dir: Path) -> None:
    import deepspeed
    import torch
    import torch.distributed as dist

    from fedllm.core.sections.train import TrainSettings
    from fedllm.train import data as datamod
    from fedllm.train import lora
    from fedllm.train.engine import loss_module, deepspeed_config, init_distributed, prepare_rows

    init_distributed()
    rank, world = dist.get_rank(), dist.get_world_size()
    cfg = TrainSettings(zero_stage=3, batch_size=2, max_seq_len=64, lora_dropout=0.0, lr=1e-2, warmup_steps=0)
    peft_model = lora.build_peft_model(cfg, model_dir, torch.float32, None)
    module = loss_module(peft_model, None, 0.0, 3, world)
    params = [p for p in module.parameters() if p.requires_grad]
    engine, *_ = deepspeed.initialize(model=module, optimizer=torch.optim.AdamW(params, lr=cfg.lr),
                                      config=deepspeed_config(cfg, "fp32", world, sum(p.numel() for p in params)))
    held = sum(p.ds_tensor.numel() for p in module.parameters())
    total = sum(p.ds_numel for p in module.parameters())
    tokenizer = lora.load_tokenizer(model_dir)
    records = [{"prompt": f"{i} plus {i}?", "completion": f"{2 * i}"} for i in range(8)]
    rows = prepare_rows(cfg, tokenizer, records)
    batch = datamod.collate(datamod.micro_batch(rows, 0, cfg.batch_size, cfg.seed, rank, world), tokenizer.pad_token_id, cfg.packing)
    loss, _, _ = engine(**batch)
    engine.backward(loss)
    engine.step()
    (out_dir / f"rank-{rank}.json").write_text(json.dumps({"rank": rank, "world": world, "held": held, "total": total,
                                                            "loss": float(loss)}))
    engine.destroy()


if __name__ == "__main__":
    positional = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]  # the launcher adds --local_rank=R
    main(Path(positional[0]), Path(positional[1]))
