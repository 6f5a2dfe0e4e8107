"""Training throughput: our DeepSpeed engine vs a plain HF Trainer + peft, and packing on vs off.

All runs use the same model, LoRA config, batch size, sequence length and number of optimizer steps, on chat
data of mixed lengths. The engine-vs-Trainer pair sees exactly the same micro-batches (no packing, same
order), so the comparison is of the training machinery alone. Throughput is real (non-padding) tokens per
second of training (model loading excluded).

    .venv/bin/python bench/train_throughput.py [--model DIR_OR_NAME] [--steps 3] [--batch-size 4] [--seq-len 256]

Each run is a fresh child process, so its peak resident memory (ru_maxrss: model, optimizer, DeepSpeed's buffers)
is its own and is printed beside its tokens/s. Every run uses `train.gradient_checkpointing` (on by default; the HF
Trainer gets the same through TrainingArguments) except "no checkpointing", the engine with it off. `--ranks 2` adds the engine on 2 CPU ranks (DeepSpeed's launcher,
the same global batches) beside 1 rank.

Prints one line per run and the ratios.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

WORDS = "the model learns from private data that never leaves its silo and answers questions about it".split()


def mixed_chat_records(n: int, seed: int = 0) -> list[dict[str, Any]]:
    """Chat examples whose answers range from a few words to ~180 words (mixed lengths, as real chat data)."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        q = " ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 20)))
        a = " ".join(rng.choice(WORDS) for _ in range(rng.choice([3, 8, 20, 40, 90, 180])))
        out.append({"messages": [{"role": "user", "content": f"Question {i}: {q}?"}, {"role": "assistant", "content": a}]})
    return out


def resolve(model: str | None) -> Path:
    """A model folder: the given path or store name, else the embedded model prepared for the tests."""
    from fedllm.core.model_store import prepare_model, resolve_model
    from fedllm.core.settings import load_settings

    if model:
        return resolve_model(load_settings().models_dir, model)
    cache = REPO / ".cache"
    return prepare_model(cache / "test-home" / "models", cache_dir=cache / "wheels").path


def steady(times: list[float], tokens: list[int]) -> float:
    """Tokens/s from the end of step 1 to the end of the last step (the first step's warm-up excluded)."""
    return sum(tokens[1:]) / (times[-1] - times[0]) if len(times) > 1 else float("nan")


def run_engine(cfg: Any, model_dir: Path, records: list[dict[str, Any]], steps: int) -> dict[str, float]:
    """Our engine (fit_adapter, DeepSpeed in process); tokens/s over the training loop."""
    from fedllm.train import fit_adapter

    times: list[float] = []
    totals: list[float] = []

    def on_step(m: dict[str, Any]) -> None:
        times.append(m["elapsed_s"])
        totals.append(m["tokens_per_s"] * m["elapsed_s"])

    metrics = fit_adapter(cfg, model_dir, records, max_steps=steps, progress=on_step).metrics
    per_step = [round(b - a) for a, b in zip([0.0] + totals, totals)]
    return {**metrics, "steady_tokens_per_s": steady(times, per_step)}


def run_hf_trainer(cfg: Any, model_dir: Path, records: list[dict[str, Any]], steps: int) -> dict[str, float]:
    """A plain HF Trainer + peft on exactly the micro-batches our unpacked engine run sees."""
    import torch
    from torch.utils.data import SequentialSampler
    from transformers import Trainer, TrainerCallback, TrainingArguments

    from fedllm.train import data as d
    from fedllm.train import lora

    tok = lora.load_tokenizer(model_dir)
    rows = d.unpacked_rows(d.tokenize_records(tok, records, cfg.max_seq_len))
    seq = [r for i in range(steps * cfg.grad_accum) for r in d.micro_batch(rows, i, cfg.batch_size, cfg.seed)]
    dataset = [{"input_ids": r.input_ids, "labels": r.labels} for r in seq]
    tokens = sum(len(r.input_ids) for r in seq)

    def collator(features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        width = max(len(f["input_ids"]) for f in features)
        ids = torch.full((len(features), width), tok.pad_token_id)
        labels = torch.full((len(features), width), -100)
        mask = torch.zeros((len(features), width), dtype=torch.long)
        for i, f in enumerate(features):
            n = len(f["input_ids"])
            ids[i, :n], labels[i, :n], mask[i, :n] = torch.tensor(f["input_ids"]), torch.tensor(f["labels"]), 1
        return {"input_ids": ids, "labels": labels, "attention_mask": mask}

    step_times: list[float] = []

    class StepClock(TrainerCallback):
        def on_step_end(self, *args: Any, **kwargs: Any) -> None:
            step_times.append(time.perf_counter())

    per_step = [sum(len(r.input_ids) for r in seq[i * cfg.batch_size * cfg.grad_accum : (i + 1) * cfg.batch_size * cfg.grad_accum])
                for i in range(steps)]

    class InOrderTrainer(Trainer):
        def _get_train_sampler(self, *args: Any, **kwargs: Any) -> SequentialSampler:
            return SequentialSampler(self.train_dataset)

    model = lora.build_peft_model(cfg, model_dir, torch.float32)
    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(
            output_dir=out, per_device_train_batch_size=cfg.batch_size, gradient_accumulation_steps=cfg.grad_accum,
            max_steps=steps, learning_rate=cfg.lr, warmup_steps=cfg.warmup_steps, lr_scheduler_type="cosine",
            max_grad_norm=cfg.max_grad_norm, logging_steps=1, save_strategy="no", report_to=[], use_cpu=True,
            dataloader_num_workers=0, disable_tqdm=True, seed=cfg.seed, remove_unused_columns=False,
            gradient_checkpointing=cfg.gradient_checkpointing, gradient_checkpointing_kwargs={"use_reentrant": False},
        )
        trainer = InOrderTrainer(model=model, args=args, train_dataset=dataset, data_collator=collator, callbacks=[StepClock()])
        t0 = time.perf_counter()
        trainer.train()
        elapsed = time.perf_counter() - t0
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return {"tokens_per_s": tokens / elapsed, "tokens": float(tokens), "elapsed_s": elapsed,
            "train_loss": losses[-1] if losses else float("nan"), "steady_tokens_per_s": steady(step_times, per_step)}


RUNS = ("engine, packing off", "HF Trainer + peft, packing off", "engine, packing on", "engine, packing on, no checkpointing")


def run_one(name: str, args: argparse.Namespace) -> dict[str, float]:
    """One run in this (fresh) process; adds peak_rss_mb, this process's peak resident memory."""
    from fedllm.core.sections.train import TrainSettings

    model_dir = resolve(args.model)
    records = mixed_chat_records(args.examples)
    cfg = TrainSettings(batch_size=args.batch_size, max_seq_len=args.seq_len, lora_r=8, lr=2e-4, warmup_steps=1,
                        zero_stage=args.zero_stage, packing="packing on" in name,
                        gradient_checkpointing=not name.endswith("no checkpointing"))
    m = (run_hf_trainer if name.startswith("HF") else run_engine)(cfg, model_dir, records, args.steps)
    return {**m, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def run_ranks(ranks: int, args: argparse.Namespace) -> dict[str, float]:
    """The engine (packing on) on `ranks` CPU ranks under DeepSpeed's launcher: the same global batches as 1 rank."""
    from fedllm.core.atomic import write_json_atomic
    from fedllm.core.sections.train import TrainSettings
    from fedllm.train.distributed import launch_run
    from fedllm.train.run_folder import run_config

    cfg = TrainSettings(batch_size=args.batch_size, max_seq_len=args.seq_len, lora_r=8, lr=2e-4, warmup_steps=1,
                        zero_stage=args.zero_stage, packing=True, ranks=ranks, threads=max(1, (os.cpu_count() or 1) // ranks))
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data.jsonl"
        data.write_text("".join(json.dumps(r) + "\n" for r in mixed_chat_records(args.examples)))
        run_dir = Path(tmp) / "run"
        run_dir.mkdir()
        write_json_atomic(run_dir / "config.json", run_config(cfg, resolve(args.model), data, max_steps=args.steps, output="bench"))
        m = launch_run(run_dir, ranks).metrics
    return {**m, "steady_tokens_per_s": float("nan")}


def _child(name: str, argv: list[str]) -> dict[str, float] | None:
    """One run in a fresh process; None (said on stdout) when it failed, e.g. killed for memory."""
    proc = subprocess.run([sys.executable, __file__, *argv, "--only", name], capture_output=True, text=True, cwd=REPO)
    if proc.returncode != 0:
        why = "killed by signal %d (SIGKILL: often the out-of-memory killer)" % -proc.returncode if proc.returncode < 0 else f"exit {proc.returncode}"
        print(f"{name}: failed, {why}; stderr ends with:\n{proc.stderr[-1500:]}", flush=True)
        return None
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="Model folder or store name (default: embedded SmolLM2-135M).")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--zero-stage", type=int, default=2)
    parser.add_argument("--examples", type=int, default=64)
    parser.add_argument("--ranks", type=int, default=1, help="Also run the engine on this many CPU ranks (DeepSpeed's launcher).")
    parser.add_argument("--only", default=None, help=argparse.SUPPRESS)  # a child process: one run, JSON on stdout
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if args.only is not None:
        result = run_ranks(int(args.only[len("ranks:"):]), args) if args.only.startswith("ranks:") else run_one(args.only, args)
        print(json.dumps(result))
        return

    argv = sys.argv[1:]
    print(f"model {resolve(args.model).name}, {args.steps} steps, batch {args.batch_size} x seq {args.seq_len}, ZeRO-{args.zero_stage}, "
          f"{os.cpu_count()} CPUs, each run in a fresh process")
    results = {name: _child(name, argv) for name in RUNS}
    if args.ranks > 1:
        results[f"engine, {args.ranks} ranks, packing on"] = _child(f"ranks:{args.ranks}", argv)
    if any(m is None for m in results.values()):
        results = {k: m for k, m in results.items() if m is not None}
        for name, m in results.items():
            print(f"{name:32s} {m['tokens_per_s']:8.1f} tokens/s, peak RSS {m.get('peak_rss_mb', float('nan')):7.0f} MB")
        raise SystemExit("some runs failed: no ratios")
    for name, m in results.items():
        rss = f", peak RSS {m['peak_rss_mb']:7.0f} MB" if "peak_rss_mb" in m else ""
        print(f"{name:32s} {m['tokens_per_s']:8.1f} tokens/s all steps, {m['steady_tokens_per_s']:8.1f} tokens/s after step 1 "
              f"({m['tokens']:.0f} tokens in {m['elapsed_s']:.1f} s, {m['elapsed_s'] / args.steps:.2f} s/step, last loss {m['train_loss']:.3f}{rss})")
    for key, label in (("tokens_per_s", "all steps"), ("steady_tokens_per_s", "after step 1")):
        eng, hf, packed = (results[k][key] for k in RUNS[:3])
        print(f"ratio engine / HF Trainer (same batches), {label}: {eng / hf:.2f}")
        print(f"ratio packing on / off (engine), {label}:          {packed / eng:.2f}")
        print(f"ratio checkpointing on / off (engine, packing on), {label}: {packed / results[RUNS[3]][key]:.2f}")
    eng, hf = (results[k]["peak_rss_mb"] for k in RUNS[:2])
    print(f"ratio peak RSS engine / HF Trainer (same batches):  {eng / hf:.2f}")
    on, off = (results[k]["peak_rss_mb"] for k in RUNS[2:4])
    print(f"ratio peak RSS checkpointing on / off (engine, packing on): {on / off:.2f} ({on:.0f} / {off:.0f} MB)")
    if args.ranks > 1:
        many = results[f"engine, {args.ranks} ranks, packing on"]["tokens_per_s"]
        print(f"ratio {args.ranks} ranks / 1 rank (engine, packing on), all steps: {many / results[RUNS[2]]['tokens_per_s']:.2f}")


if __name__ == "__main__":
    main()
