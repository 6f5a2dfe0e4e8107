"""`appliance train`, `appliance eval`, `appliance export`: the training engine's commands."""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Any, Optional

import typer

from fedllm.appliance.commands.common import cli_errors, console, needs, settings_from
from fedllm.appliance.commands.progress import progress_bar


def _overrides(**train: Any) -> dict[str, Any]:
    return {"train": {k: v for k, v in train.items() if v is not None}}


def train(
    ctx: typer.Context,
    data: Optional[Path] = typer.Option(
        None,
        "--data",
        help=(
            "Training data: JSONL, JSON, CSV, Parquet or a saved datasets folder (messages, prompt/completion, "
            "instruction/output, or text)."
        ),
    ),
    eval_data: Optional[Path] = typer.Option(
        None, "--eval", help="Held-out data (same formats as --data) evaluated at the end."
    ),
    model: Optional[str] = typer.Option(
        None, "--model", help="Prepared model name or HF model folder (default: settings.model)."
    ),
    lora_r: Optional[int] = typer.Option(None, "--lora-r", help="LoRA rank."),
    lora_alpha: Optional[int] = typer.Option(None, "--lora-alpha", help="LoRA alpha."),
    lora_dropout: Optional[float] = typer.Option(None, "--lora-dropout", help="LoRA dropout."),
    target_modules: Optional[str] = typer.Option(
        None, "--target-modules", help="Comma-separated module names, or all-linear."
    ),
    zero_stage: Optional[int] = typer.Option(None, "--zero-stage", help="DeepSpeed ZeRO stage 0-3."),
    max_steps: Optional[int] = typer.Option(None, "--max-steps", help="Optimizer steps."),
    epochs: Optional[float] = typer.Option(None, "--epochs", help="Passes over the data (instead of --max-steps)."),
    lr: Optional[float] = typer.Option(None, "--lr", help="Peak learning rate."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help="Micro-batch size (sequences)."),
    grad_accum: Optional[int] = typer.Option(None, "--grad-accum", help="Gradient accumulation steps."),
    max_seq_len: Optional[int] = typer.Option(None, "--max-seq-len", help="Tokens per (packed) sequence."),
    ranks: Optional[int] = typer.Option(
        None, "--ranks", help="Ranks per node (GPUs, or CPU processes), via DeepSpeed's launcher."
    ),
    hostfile: Optional[Path] = typer.Option(
        None, "--hostfile", help="DeepSpeed hostfile (HOST slots=N lines) for several nodes."
    ),
    output: Optional[str] = typer.Option(None, "--output", help="Adapter name to register (default: DATA-lora)."),
    resume: Optional[str] = typer.Option(None, "--resume", help="Continue run RUN_ID from its last checkpoint."),
    dry_run: bool = typer.Option(
        False,
        "--dry-run",
        help="Train nothing: check --data/--eval (if given) and print parameter counts and targeted modules.",
    ),
) -> None:
    """Fine-tune a LoRA adapter and register it (APPLIANCE_HOME/adapters/NAME/VERSION)."""
    with cli_errors():
        if max_steps is not None and epochs is not None:
            raise typer.BadParameter("give --max-steps or --epochs, not both")
        targets = [t.strip() for t in target_modules.split(",") if t.strip()] if target_modules else None
        settings = settings_from(
            ctx,
            {
                "model": model,
                **_overrides(
                    lora_r=lora_r,
                    lora_alpha=lora_alpha,
                    lora_dropout=lora_dropout,
                    target_modules=targets,
                    zero_stage=zero_stage,
                    max_steps=max_steps,
                    epochs=epochs,
                    lr=lr,
                    batch_size=batch_size,
                    grad_accum=grad_accum,
                    max_seq_len=max_seq_len,
                    ranks=ranks,
                    hostfile=str(hostfile.resolve()) if hostfile else None,
                ),
            },
        )
        if dry_run:
            _print_dry_run(settings, [p for p in (data, eval_data) if p is not None])
            return
        from fedllm.train.runs import job_run, resume_run, start_run

        if resume is None and data is None:
            raise typer.BadParameter("--data is required (or --resume RUN_ID, or --dry-run)")
        run_id = None
        if resume is None and (job_id := os.environ.get("APPLIANCE_JOB_ID")):  # a job's retry resumes its run
            run_id, resumable = job_run(settings, job_id)
            if resumable:
                console.print(f"job {job_id}: resuming run {run_id} from its last checkpoint", highlight=False)
                resume = run_id
        with progress_bar(console) as on_step:
            if resume:
                outcome = resume_run(settings, resume, progress=on_step)
            else:
                assert data is not None  # refused above unless resuming
                outcome = start_run(
                    settings,
                    data,
                    eval_data=eval_data,
                    max_steps=max_steps,
                    output=output,
                    progress=on_step,
                    run_id=run_id,
                )
        m = outcome.result.metrics
        extra = f", eval_loss {m['eval_loss']:.4f}" if "eval_loss" in m else ""
        console.print(
            f"run {outcome.run_id}: train_loss {m['train_loss']:.4f}{extra}, {m['tokens_per_s']:.0f} tokens/s",
            highlight=False,
        )
        console.print(
            f"registered adapter [bold]{outcome.adapter.ref}[/] (served as {outcome.adapter.served_name}) at "
            f"{outcome.adapter.path}"
        )


def _print_dry_run(settings: Any, data_paths: list[Path]) -> None:
    from collections import Counter

    from fedllm.core.model_store import resolve_model
    from fedllm.train.data import load_data, record_format
    from fedllm.train.lora import count_parameters

    for path in data_paths:  # checked first: bad data is named (file and line or row) before any weights are read
        kinds = Counter(record_format(r) for r in load_data(path))
        console.print(
            f"data: {path}: {sum(kinds.values())} records ({', '.join(f'{n} {k}' for k, n in kinds.most_common())})",
            highlight=False,
        )

    path = Path(settings.model)
    model_dir = path if path.is_file() else resolve_model(settings.models_dir, settings.model)
    r = count_parameters(settings.train, model_dir)
    console.print(f"model: {settings.model} ({r.model_type})", highlight=False)
    console.print(f"total parameters: {r.total_params:,}", highlight=False)
    console.print(
        f"trainable LoRA parameters: {r.trainable_params:,} ({100 * r.trainable_share:.4f} %)", highlight=False
    )
    console.print(f"adapter bytes: fp32 {r.adapter_bytes_fp32:,}, bf16 {r.adapter_bytes_bf16:,}", highlight=False)
    console.print(
        f"target modules: {', '.join(r.target_modules)} ({r.targeted_layers} layers, {r.adapter_tensors} tensors)",
        highlight=False,
    )


def eval_(
    ctx: typer.Context,
    adapter: Optional[str] = typer.Option(None, "--adapter", help="NAME[:VERSION] of a registered adapter."),
    model: Optional[str] = typer.Option(
        None, "--model", help="Evaluate this base model (no adapter); with --compare, the base."
    ),
    compare: Optional[str] = typer.Option(
        None, "--compare", help="base,NAME[:VERSION],...: score each on the same data, one table."
    ),
    data: Optional[Path] = typer.Option(None, "--data", help="Eval data (default: the adapter's training data)."),
    generate: bool = typer.Option(
        True, "--generate/--no-generate", help="Also score generated answers (exact match, token F1)."
    ),
    max_new_tokens: int = typer.Option(64, "--max-new-tokens", help="Generation budget per answer."),
    max_generate: int = typer.Option(
        50, "--max-generate", help="Score generated answers of at most this many examples."
    ),
    json_out: Optional[Path] = typer.Option(
        None, "--json-out", help="Also write the results as JSON here (after each model)."
    ),
) -> None:
    """Evaluate a base model or adapters: loss, perplexity, and exact-match / token-F1 of generated answers."""
    with cli_errors():
        from fedllm.train.compare import (
            BASE,
            default_data,
            evaluate_targets,
            format_table,
            parse_targets,
            resolve_targets,
            write_report,
        )

        if (adapter is not None and compare is not None) or (adapter is None and compare is None and model is None):
            raise typer.BadParameter("give --adapter NAME[:V], --model BASE, or --compare base,NAME[:V],...")
        settings = settings_from(ctx)
        refs = parse_targets(compare) if compare else [adapter or BASE]
        targets = resolve_targets(settings, refs, model)
        source = data or default_data(targets)
        if source is None:
            raise typer.BadParameter("--data is required: no adapter's meta names its training data")
        report = functools.partial(write_report, json_out, refs, source) if json_out else None
        if report:
            report([])  # 0 of N scored: a watcher (the console) sees the run has started
        rows = evaluate_targets(
            targets, source, generate=generate, max_new_tokens=max_new_tokens, max_generate=max_generate, on_row=report
        )
        if compare:
            console.print(format_table(rows), highlight=False)
            return
        for key, value in rows[0][1].items():
            console.print(f"{key}: {value:.4f}" if isinstance(value, float) else f"{key}: {value}", highlight=False)


def export(
    ctx: typer.Context,
    adapter: str = typer.Option(..., "--adapter", help="NAME[:VERSION] of a registered adapter."),
    merge: bool = typer.Option(False, "--merge", help="Merge into the base model and write a full safetensors model."),
    out: Optional[Path] = typer.Option(None, "--out", help="Output folder (default: ./NAME-vVERSION[-merged])."),
) -> None:
    """Export an adapter as a PEFT folder, or merged into its base model."""
    with cli_errors():
        from fedllm.core.adapter_registry import AdapterRegistry
        from fedllm.train.export import export_adapter, export_merged
        from fedllm.train.runs import adapter_base_dir

        settings = settings_from(ctx)
        av = AdapterRegistry(settings.adapters_dir).get(adapter)
        target = out or Path(f"{av.served_name}{'-merged' if merge else ''}")
        if merge:
            export_merged(av.path, adapter_base_dir(settings, av), target)
        else:
            export_adapter(av.path, target)
        console.print(f"exported {av.ref} to {target}{' (merged full model)' if merge else ''}", highlight=False)


def register(app: typer.Typer) -> None:
    """Add this module's commands to the `appliance` CLI."""
    app.command("train")(needs("silo", for_what="`appliance train`")(train))
    app.command("eval")(needs("silo", for_what="`appliance eval`")(eval_))
    app.command("export")(needs("silo", for_what="`appliance export`")(export))
