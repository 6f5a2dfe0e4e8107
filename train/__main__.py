r"""`python -m fedllm.train`: one training run, for the `deepspeed` launcher (multi-GPU, multi-node).

    deepspeed --num_gpus 4 --module train --model-dir MODEL_DIR --data data.jsonl --out adapter_dir \
        --run-dir runs/my-run [--config appliance.yaml] [--max-steps 200] [--resume]
    deepspeed --num_gpus 4 --module train --from-run runs/ID [--resume]    # what `appliance train --ranks 4` runs

Every rank runs the same engine as `appliance train` (the launcher sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_*);
each rank trains on its share of every global micro-batch, ZeRO shards the state, and rank 0 writes the run folder
and the PEFT adapter folder. With `--from-run`, the settings, model, data and step budget come from the run
folder's config.json, the adapter goes to RUN/adapter and rank 0 writes RUN/result.json (examples, metrics).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    """Parse arguments, train, and (rank 0) save the adapter folder; returns the exit code."""
    parser = argparse.ArgumentParser(
        prog="python -m fedllm.train", description="Train a LoRA adapter (DeepSpeed launcher entry point)."
    )
    parser.add_argument(
        "--from-run", type=Path, default=None, help="A run folder whose config.json gives everything else."
    )
    parser.add_argument("--model-dir", type=Path, default=None, help="HF model folder.")
    parser.add_argument(
        "--data", type=Path, default=None, help="Training data: JSONL, JSON, CSV, Parquet or a saved datasets folder."
    )
    parser.add_argument("--eval", type=Path, default=None, help="Held-out data (same formats as --data).")
    parser.add_argument("--out", type=Path, default=None, help="Folder for the PEFT adapter (written by rank 0).")
    parser.add_argument(
        "--run-dir", type=Path, default=None, help="Run folder (metrics, status, checkpoints); same on every rank."
    )
    parser.add_argument(
        "--config", type=Path, default=None, help="Appliance YAML settings (its `train:` section is used)."
    )
    parser.add_argument("--max-steps", type=int, default=None)
    parser.add_argument("--resume", action="store_true", help="Continue from the run folder's latest checkpoint.")
    parser.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # added by the launcher
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    from fedllm.core.atomic import write_json_atomic
    from fedllm.core.sections.train import TrainSettings
    from fedllm.core.settings import load_settings
    from fedllm.train import fit_adapter, save_adapter_dir
    from fedllm.train.distributed import ADAPTER_DIR, RESULT_FILE

    if args.from_run is not None:
        conf = json.loads((args.from_run / "config.json").read_text())
        cfg = TrainSettings(**conf["train"])
        model_dir, data, run_dir, out = (
            Path(conf["model_dir"]),
            Path(conf["data"]),
            args.from_run,
            args.from_run / ADAPTER_DIR,
        )
        eval_data = Path(conf["eval_data"]) if conf.get("eval_data") else None
        max_steps = conf.get("max_steps")
    else:
        missing = [f"--{n.replace('_', '-')}" for n in ("model_dir", "data", "out") if getattr(args, n) is None]
        if missing:
            parser.error(f"{', '.join(missing)} required (or --from-run RUN_DIR)")
        cfg = load_settings(args.config).train
        model_dir, data, run_dir, out, eval_data, max_steps = (
            args.model_dir,
            args.data,
            args.run_dir,
            args.out,
            args.eval,
            args.max_steps,
        )
    result = fit_adapter(
        cfg, model_dir, data, eval_data=eval_data, max_steps=max_steps, run_dir=run_dir, resume=args.resume
    )
    if int(os.environ.get("RANK", "0")) == 0:
        save_adapter_dir(result.state, cfg, model_dir, out)
        if args.from_run is not None:
            write_json_atomic(
                args.from_run / RESULT_FILE, {"num_examples": result.num_examples, "metrics": result.metrics}
            )
        logging.getLogger("fedllm.train").info("adapter saved to %s; metrics %s", out, result.metrics)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
