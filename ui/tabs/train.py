"""Train tab: validate a data file (JSONL, JSON, CSV, Parquet), start `appliance train` as a detached process, and watch
runs from disk.

Everything shown comes from `runs/ID/` and the launch records (see `fedllm.ui.runs`), polled by a `gr.Timer`, so the
progress and the loss plot survive a page reload and keep moving while the run trains.
"""

from __future__ import annotations

import html
import time
from pathlib import Path
from typing import Any

from fedllm.core.atomic import write_bytes_atomic
from fedllm.core.contracts.records import load_file
from fedllm.core.errors import DataError
from fedllm.core.processes import log_tail
from fedllm.ui import launcher
from fedllm.ui.context import ConsoleContext, bind, guarded, problem
from fedllm.ui.plots import line_figure
from fedllm.ui.runs import RunView, format_duration, list_runs, resume_command, smooth, train_command

STATE_COLOURS = {
    "running": "#2563eb",
    "starting": "#2563eb",
    "done": "#16a34a",
    "failed": "#dc2626",
    "stopped": "#a16207",
}


def data_dir(ctx: ConsoleContext) -> Path:
    """Where the console keeps uploaded training files."""
    return ctx.settings.home / "ui" / "data"


# File types an upload may have (read by `fedllm.core.contracts.records.load_file`; a saved `datasets` folder is not a
# file a browser uploads: train on it with `appliance train --data FOLDER`).
UPLOAD_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")


def data_choices(ctx: ConsoleContext) -> list[str]:
    """Uploaded data files, newest first."""
    d = data_dir(ctx)
    found = [p for p in d.iterdir() if p.is_file() and p.suffix.lower() in UPLOAD_SUFFIXES] if d.is_dir() else []
    files = sorted(found, key=lambda p: p.stat().st_mtime, reverse=True)
    return [str(p) for p in files]


def progress_html(run: RunView | None) -> str:
    """The progress block: state badge, a bar with steps, elapsed and remaining time, error and exit code."""
    if run is None:
        return "<div id='run-progress-empty'>No training runs yet. Upload data and press Start.</div>"
    last = run.last
    step, total = int(last.get("step", 0)), int(last.get("total_steps", 0) or 0)
    pct = 100.0 * step / total if total else (100.0 if run.state == "done" else 0.0)
    colour = STATE_COLOURS.get(run.state, "#6b7280")
    parts = [
        f"<div class='run-progress' data-state='{run.state}' data-step='{step}'>",
        f"<b>{html.escape(run.id)}</b> <span class='run-state' style='color:white;background:{colour};padding:1px 8px;"
        f"border-radius:8px'>{run.state}</span>",
        f"<div style='background:#e5e7eb;border-radius:6px;height:14px;margin:6px 0'><div style='width:{pct:.1f}%;"
        f"background:{colour};height:14px;border-radius:6px'></div></div>",
        f"<span class='run-steps'>step {step} / {total or '?'}</span> · elapsed "
        f"{format_duration(last.get('elapsed_s'))}"
        " · remaining "
        f"{format_duration(last.get('eta_s')) if run.state == 'running' else '0:00' if run.state == 'done' else '-'}",
    ]
    if "loss" in last:
        parts.append(f" · loss {float(last['loss']):.4f}")
    if last.get("tokens_per_s"):
        parts.append(f" · {float(last['tokens_per_s']):.0f} tokens/s")
    if run.adapter:
        parts.append(f"<br>adapter <code>{html.escape(run.adapter)}</code>")
    if run.state == "failed":
        code = "unknown" if run.exit_code is None else run.exit_code
        parts.append(
            f"<div class='run-error' style='color:#dc2626'>failed · exit code {code} · "
            f"{html.escape(run.error or '')}</div>"
        )
    parts.append("</div>")
    return "".join(parts)


def loss_frame(run: RunView | None):
    """A long-format table (step, loss, series) of raw and smoothed loss, plus eval loss."""
    import pandas as pd

    rows: list[dict[str, Any]] = []
    if run is not None:
        steps = [m for m in run.metrics if "loss" in m and "step" in m]
        raw = [float(m["loss"]) for m in steps]
        for m, s in zip(steps, smooth(raw)):
            rows.append({"step": int(m["step"]), "loss": float(m["loss"]), "series": "raw"})
            rows.append({"step": int(m["step"]), "loss": s, "series": "smoothed"})
        rows += [
            {"step": int(m["step"]), "loss": float(m["eval_loss"]), "series": "eval"}
            for m in run.metrics
            if "eval_loss" in m and "step" in m
        ]
    # Typed columns even when empty: the plot takes its axis types (quantitative, not nominal) from them.
    return pd.DataFrame(rows, columns=["step", "loss", "series"]).astype(
        {"step": "int64", "loss": "float64", "series": "str"}
    )


LOSS_COLOURS = {"raw": "#93c5fd", "smoothed": "#1d4ed8", "eval": "#dc2626"}


def loss_figure(run: RunView | None):
    """The loss plot of a run: raw and smoothed training loss, and eval loss where there is one."""
    return line_figure(
        loss_frame(run),
        "step",
        "loss",
        "Training loss (raw and smoothed)",
        LOSS_COLOURS,
        empty_text="No loss yet" if run is not None else "No run selected",
    )


def loss_caption(run: RunView | None) -> str:
    """One line under the plot: how many steps are plotted, last raw and smoothed loss, last eval loss."""
    if run is None:
        return ""
    raw = [float(m["loss"]) for m in run.metrics if "loss" in m and "step" in m]
    if not raw:
        return "No loss yet: the first step is on its way."
    evals = [float(m["eval_loss"]) for m in run.metrics if "eval_loss" in m]
    text = f"{len(raw)} steps plotted · last loss {raw[-1]:.4f} · smoothed {smooth(raw)[-1]:.4f}"
    return text + (f" · eval loss {evals[-1]:.4f}" if evals else "")


def runs_table(runs: list[RunView]) -> list[list[Any]]:
    """Rows of the past-runs table."""
    out = []
    for r in runs:
        last = r.last
        out.append(
            [
                r.id,
                r.state,
                f"{last.get('step', 0)}/{last.get('total_steps', '?')}",
                round(float(last["loss"]), 4) if "loss" in last else None,
                r.adapter or "",
                "" if r.exit_code is None else r.exit_code,
                time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(r.started_at)) if r.started_at else "",
            ]
        )
    return out


RUN_HEADERS = ["run", "state", "steps", "last loss", "adapter", "exit code", "started"]


def save_upload(ctx: ConsoleContext, path: Path) -> tuple[Path, int]:
    """Check an uploaded training file and keep a copy under `data_dir` (mode 0600, written atomically).

    Returns:
        The stored copy and its number of records.

    Raises:
        DataError: the file is not JSONL, JSON, CSV or Parquet, is larger than `ui.max_upload_mb`, or is not valid
            training data (every problem listed, by line or row).
    """
    if path.suffix.lower() not in UPLOAD_SUFFIXES:
        raise DataError(
            f"{path.name}: the console reads {', '.join(UPLOAD_SUFFIXES)} files (a saved datasets folder: "
            "`appliance train --data FOLDER`)"
        )
    limit_mb = ctx.settings.ui.max_upload_mb
    size = path.stat().st_size
    if size > limit_mb * 2**20:
        raise DataError(
            f"{path.name} is {size / 2**20:.1f} MB; the console accepts training files up to {limit_mb:g} MB "
            "(ui.max_upload_mb), or start `appliance train` on the file where it lies"
        )
    records = load_file(path)
    dest = data_dir(ctx) / path.name
    write_bytes_atomic(dest, path.read_bytes())
    return dest, len(records)


def on_upload(ctx: ConsoleContext, path: str | None):
    """Validate and store an uploaded file: (message, data dropdown update)."""
    import gradio as gr

    if not path:
        return "", gr.Dropdown()
    try:
        dest, rows = save_upload(ctx, Path(path))
    except DataError as exc:
        lines = [html.escape(x.strip()) for x in str(exc).replace(str(path), Path(path).name).splitlines() if x.strip()]
        bullets = "\n".join(f"- {x}" for x in lines[1:])
        return f"**Invalid data** - nothing was saved. {lines[0] if lines else ''}\n\n{bullets}", gr.Dropdown()
    return f"**Valid:** {dest.name}: {rows} valid records", gr.Dropdown(choices=data_choices(ctx), value=str(dest))


def _dropdown_unchanged(msg: str):
    import gradio as gr

    return msg, gr.Dropdown()


@guarded(_dropdown_unchanged)
def on_start(
    ctx: ConsoleContext,
    data_path: str | None,
    model_name: str,
    out: str,
    steps: float,
    rate: float,
    bs: float,
    r: float,
    alpha: float,
    seq: float,
):
    """Start `appliance train` detached: (message, run dropdown update following the new launch)."""
    import gradio as gr

    if not data_path:
        return problem("Upload or pick a training file first."), gr.Dropdown()
    cmd = train_command(
        Path(data_path),
        model=model_name.strip() or None,
        output=out.strip() or None,
        max_steps=int(steps),
        lr=float(rate),
        lora_r=int(r),
        lora_alpha=int(alpha),
        batch_size=int(bs),
        max_seq_len=int(seq),
        home=ctx.settings.home,
    )
    record = launcher.launch(ctx.settings.home, "train", cmd)
    value = f"launch-{record['id']}"
    choices = [run.id for run in list_runs(ctx.settings.runs_dir, ctx.settings.home)]
    return (
        f"Started `appliance train` (pid {record.get('pid')}).",
        gr.Dropdown(choices=choices if value in choices else [value, *choices], value=value),
    )


def find_run(runs: list[RunView], run_id: str | None) -> RunView | None:
    """The run picked as `run_id` (a launch id follows its run once it has one); the newest run when none is picked."""
    if run_id and run_id.startswith("launch-"):
        # A launch becomes a real run once its process writes status.json: follow it.
        launch_id = run_id[len("launch-") :]
        return next((r for r in runs if r.launch_id == launch_id), None)
    return next((r for r in runs if r.id == run_id), runs[0] if runs else None)


def _refresh_failed(msg: str):
    import gradio as gr

    return gr.Dropdown(), progress_html(None), loss_figure(None), "", "", [], msg


@guarded(_refresh_failed)
def refresh(ctx: ConsoleContext, run_id: str | None):
    """The run views from disk: (run dropdown, progress, plot, caption, log tail, runs table, problem)."""
    import gradio as gr

    runs = list_runs(ctx.settings.runs_dir, ctx.settings.home)
    run = find_run(runs, run_id)
    log_text = log_tail(run.log_path, 25) if run else ""
    choices = [r.id for r in runs]
    # Set the pick only to follow a launch to its run (or to pick the newest when none is picked): a timer tick
    # computed from the previous pick must not take back a pick the user (or Start) made while it was in flight.
    picks = (
        gr.Dropdown(choices=choices, value=run.id)
        if run is not None and run.id != run_id
        else gr.Dropdown(choices=choices)
    )
    return (picks, progress_html(run), loss_figure(run), loss_caption(run), log_text, runs_table(runs), "")


@guarded(lambda msg: msg)
def on_stop(ctx: ConsoleContext, run_id: str | None) -> str:
    """Stop a run this console launched."""
    run = find_run(list_runs(ctx.settings.runs_dir, ctx.settings.home), run_id)
    if run is None or run.state not in ("running", "starting"):
        return problem("That run is not running.")
    if run.launch_id and launcher.stop(ctx.settings.home, run.launch_id):
        return f"Asked {run.id} to stop."
    return problem(f"{run.id} was not started from this console; stop it where it runs (pid {run.pid}).")


@guarded(lambda msg: msg)
def on_resume(ctx: ConsoleContext, run_id: str | None) -> str:
    """Resume a stopped or failed run from its last checkpoint (`appliance train --resume`)."""
    run = find_run(list_runs(ctx.settings.runs_dir, ctx.settings.home), run_id)
    if run is None or run.run_dir is None:
        return problem("Pick a run that has a run folder to resume.")
    if run.state in ("running", "starting"):
        return problem(f"{run.id} is still running.")
    record = launcher.launch(ctx.settings.home, "train", resume_command(run.id, ctx.settings.home))
    return f"Resuming {run.id} (pid {record.get('pid')})."


def refresh_data_choices(ctx: ConsoleContext, current: str | None):
    """The data dropdown with the stored files, keeping the current pick."""
    import gradio as gr

    return gr.Dropdown(choices=data_choices(ctx), value=current)


def build(ctx: ConsoleContext) -> None:
    """Lay out the Train tab inside the current `gr.Tab` and wire its handlers."""
    import gradio as gr

    cfg = ctx.settings.train
    status = gr.Markdown("", elem_id="train-status")
    with gr.Row():
        with gr.Column(scale=1):
            upload = gr.File(
                label="Upload training data (JSONL, JSON, CSV, Parquet)",
                file_types=list(UPLOAD_SUFFIXES),
                type="filepath",
                elem_id="train-upload",
            )
            data_check = gr.Markdown("", elem_id="train-data-check")
            data = gr.Dropdown(label="Training data", choices=data_choices(ctx), value=None, elem_id="train-data")
        with gr.Column(scale=2):
            with gr.Row():
                model = gr.Textbox(label="Base model", value=ctx.settings.model, elem_id="train-model")
                output = gr.Textbox(label="Adapter name", value="my-adapter", elem_id="train-output")
            with gr.Row():
                max_steps = gr.Number(
                    label="Max steps", value=cfg.max_steps, precision=0, minimum=1, elem_id="train-steps"
                )
                lr = gr.Number(label="Learning rate", value=cfg.lr)
                batch_size = gr.Number(
                    label="Batch size", value=cfg.batch_size, precision=0, minimum=1, elem_id="train-batch"
                )
            with gr.Row():
                lora_r = gr.Number(label="LoRA r", value=cfg.lora_r, precision=0, minimum=1)
                lora_alpha = gr.Number(label="LoRA alpha", value=cfg.lora_alpha, precision=0, minimum=1)
                max_seq_len = gr.Number(
                    label="Max sequence length", value=cfg.max_seq_len, precision=0, minimum=16, elem_id="train-seq"
                )
            start = gr.Button("Start training", variant="primary", elem_id="train-start")
    gr.Markdown("### Runs")
    with gr.Row():
        run_pick = gr.Dropdown(
            label="Run", choices=[], value=None, allow_custom_value=True, scale=4, elem_id="train-run"
        )
        stop = gr.Button("Stop", scale=1, elem_id="train-stop")
        resume = gr.Button("Resume", scale=1, elem_id="train-resume")
    progress = gr.HTML(progress_html(None), elem_id="train-progress")
    plot = gr.Plot(loss_figure(None), show_label=False, elem_id="train-loss")
    caption = gr.Markdown("", elem_id="train-loss-caption")
    log = gr.Textbox(label="Log (last lines)", lines=6, max_lines=12, interactive=False, elem_id="train-log")
    table = gr.Dataframe(headers=RUN_HEADERS, value=[], interactive=False, label="All runs", elem_id="train-runs")
    live_status = gr.Markdown("", elem_id="train-live-status")
    timer = gr.Timer(ctx.settings.ui.poll_interval_s)

    upload.upload(bind(on_upload, ctx), upload, [data_check, data])
    start.click(
        bind(on_start, ctx),
        [data, model, output, max_steps, lr, batch_size, lora_r, lora_alpha, max_seq_len],
        [status, run_pick],
    )
    outputs = [run_pick, progress, plot, caption, log, table, live_status]
    timer.tick(bind(refresh, ctx), run_pick, outputs, show_progress="hidden")
    run_pick.input(bind(refresh, ctx), run_pick, outputs, show_progress="hidden")
    stop.click(bind(on_stop, ctx), run_pick, status)
    resume.click(bind(on_resume, ctx), run_pick, status)
    ctx.on_load.append((bind(refresh, ctx), [run_pick], outputs))
    ctx.on_load.append((bind(refresh_data_choices, ctx), [data], [data]))
