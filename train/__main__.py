"""`python -m train`: one training run, for the `deepspeed` launcher (multi-GPU, multi-node).

    deepspeed --num_gpus 4 --module train --model-dir MODEL_DIR --data data.jsonl --out adapter_dir \\
        --run-dir runs/my-run [--config appliance.yaml] [--max-steps 200] [--resume]

Every rank runs the same engine as `appliance train` (the launcher sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_*);
each rank trains on its own micro-batches, ZeRO shards the state, and rank 0 writes the run folder and the
PEFT adapter folder. Register the result afterwards with the adapter registry if wanted.
"""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    """Parse arguments, train, and (rank 0) save the adapter folder; returns the exit code."""
    parser = argparse.ArgumentParser(prog="python -m train", description="Train a LoRA adapter (DeepSpeed launcher entry point).")
    parser.add_argument("--model-dir", type=Path, required=True, help="HF model folder.")
    parser.add_argument("--data", type=Path, required=True, help="Training data: JSONL, JSON, CSV, Parquet or a saved datasets folder.")
    parser.add_argument("--eval", type=Path, default=None, help="Held-out data (same formats as --data).")
    parser.add_argument("--out", type=Path, required=True, help="Folder for the PEFT adapter (written by rank 0).")
    parser.add_argument("--run-dir", type=Path, default=None, help="Run folder (metrics, status, checkpoints); same on every rank.")
    parser.add_argument("--config", type=Path, default=None, help="Appliance YAML settings (its `train:` section is used).")
    parser.add_argument("--max-steps", type=int, default=None)
    parser.add_argument("--resume", action="store_true", help="Continue from the run folder's latest checkpoint.")
    parser.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # added by the launcher
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    from appliance.core.settings import load_settings
    from train import fit_adapter, save_adapter_dir

    cfg = load_settings(args.config).train
    result = fit_adapter(cfg, args.model_dir, args.data, eval_data=args.eval, max_steps=args.max_steps,
                         run_dir=args.run_dir, resume=args.resume)
    if int(os.environ.get("RANK", "0")) == 0:
        save_adapter_dir(result.state, cfg, args.model_dir, args.out)
        logging.getLogger("train").info("adapter saved to %s; metrics %s", args.out, result.metrics)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
