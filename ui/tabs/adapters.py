"""Adapters tab: every registered version with its lineage; publish to / unpublish from the fleet; download; compare
the base model and adapter versions on eval data (`appliance eval --compare`, launched detached, read from disk)."""

from __future__ import annotations

import json
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Any

from fedllm.core.adapter_registry import AdapterVersion
from fedllm.core.contracts.records import load_file
from fedllm.core.contracts.router_client import latest_alias
from fedllm.core.errors import ConfigError
from fedllm.ui import evals, launcher
from fedllm.ui.context import ConsoleContext, bind, guarded, problem
from fedllm.ui.services import ServiceUnavailable
from fedllm.ui.tabs import adapter_history
from fedllm.ui.tabs.train import UPLOAD_SUFFIXES, data_choices, data_dir, on_upload

ADAPTER_HEADERS = ["adapter", "served", "served as", "regions", "base model", "from", "data sha256", "metrics"]


def lineage_source(meta: dict[str, Any]) -> str:
    """Where a version came from: a training run or a federation round."""
    if meta.get("round") is not None:
        fed = meta.get("federation") or meta.get("run")
        return f"round {meta['round']} of federation {fed}" if fed else f"federation round {meta['round']}"
    run = meta.get("run_id") or meta.get("run")
    return f"run {run}" if run else str(meta.get("source", ""))


def adapter_rows(
    versions: list[AdapterVersion], served: set[str], regions: dict[str, list[str]] | None = None
) -> list[list[Any]]:
    """Rows of the adapters table; `served` is what the router currently serves, `regions` the regions a served
    name is limited to (data residency; a served name not in it may be served anywhere)."""
    regions = regions or {}
    rows = []
    for v in versions:
        m = v.meta
        metrics = m.get("metrics") or {}
        metric_text = ", ".join(
            f"{k}={val:.4g}" if isinstance(val, float) else f"{k}={val}"
            for k, val in metrics.items()
            if isinstance(val, (int, float))
        )
        data_hash = str(m.get("data_sha256") or m.get("data_hash") or "")[:12]
        is_served = v.served_name in served
        where = (", ".join(regions[v.served_name]) if regions.get(v.served_name) else "anywhere") if is_served else ""
        rows.append(
            [
                v.ref,
                "yes" if is_served else "no",
                v.served_name,
                where,
                m.get("base_model") or m.get("model") or "",
                lineage_source(m),
                data_hash,
                metric_text,
            ]
        )
    return rows


def served_regions(entries: list[Any]) -> dict[str, list[str]]:
    """Served name -> the regions it is limited to, for the publications of `GET /admin/adapters` that name regions."""
    return {str(e["name"]): list(e["regions"]) for e in entries if isinstance(e, dict) and e.get("regions")}


def served_names(entries: list[Any]) -> set[str]:
    """Names (and aliases) in the router's `GET /admin/adapters` answer."""
    names: set[str] = set()
    for e in entries:
        if isinstance(e, str):
            names.add(e)
        elif isinstance(e, dict):
            names.add(str(e.get("name")))
            names.update(e.get("aliases") or [])
    return names


def zip_adapter(version: AdapterVersion) -> Path:
    """A zip of the version's PEFT folder (with meta.json) in a temp folder, for download."""
    out_dir = Path(tempfile.mkdtemp(prefix="adapter-export-"))
    return Path(shutil.make_archive(str(out_dir / version.served_name), "zip", version.path))


def compare_choices(ctx: ConsoleContext) -> list[str]:
    """What a comparison may score: the base model, then every registered version (NAME:VERSION)."""
    return [evals.BASE, *(v.ref for v in ctx.registry.list())]


@guarded(lambda msg: msg)
def on_compare(
    ctx: ConsoleContext,
    targets: list[str] | None,
    data_path: str | None,
    generate: bool,
    max_generate: float,
    max_new_tokens: float = 64,
) -> str:
    """Check the form, then start `appliance eval --compare` detached; returns the message shown under the button.

    Everything a person could get wrong is checked here, before anything starts: no model or one alone, no data or a
    file the console did not receive as an upload, a data file that is missing or has a bad row (named), an unknown
    adapter, a comparison already running.
    """
    picked = [t for t in (targets or []) if t]
    if len(picked) < 2:
        return problem("Pick at least two models to compare (for example base and an adapter version).")
    if not data_path:
        return problem("Upload or pick an eval data file.")
    if Path(data_path).resolve().parent != data_dir(ctx).resolve():
        return problem(
            "Pick an eval data file uploaded to the console (or run `appliance eval --compare` on a file where it "
            "lies)."
        )
    records = load_file(Path(data_path))  # DataError names the file and the bad line or row (changed since its upload)
    for ref in picked:
        if ref != evals.BASE:
            ctx.registry.get(ref)  # ModelNotFound names it
    running = evals.latest_compare(ctx.settings.home)
    if running is not None and running.state == "running":
        raise ConfigError(f"a comparison is already running (launch {running.id}); wait for it to finish")
    out = evals.evals_dir(ctx.settings.home) / f"{uuid.uuid4().hex[:12]}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    cmd = evals.compare_command(
        ctx.settings.home,
        picked,
        Path(data_path),
        out,
        generate=bool(generate),
        max_generate=int(max_generate),
        max_new_tokens=int(max_new_tokens),
    )
    record = launcher.launch(ctx.settings.home, evals.KIND, cmd)
    return (
        f"Started `appliance eval --compare {','.join(picked)}` on {Path(data_path).name} ({len(records)} records, "
        f"pid {record.get('pid')}). The table fills in as each model is scored."
    )


def _compare_failed(msg: str):
    return msg, [], evals.loss_figure(None)


@guarded(_compare_failed)
def refresh_compare(ctx: ConsoleContext):
    """The newest comparison from disk: (progress, table rows, loss bars)."""
    view = evals.latest_compare(ctx.settings.home)
    return evals.progress_html(view), evals.table_rows(view), evals.loss_figure(view)


def refresh_compare_form(ctx: ConsoleContext, picked: list[str] | None, data: str | None):
    """The model checkboxes and the data dropdown with what exists now, keeping the current picks."""
    import gradio as gr

    choices = compare_choices(ctx)
    return (
        gr.CheckboxGroup(choices=choices, value=[p for p in (picked or []) if p in choices]),
        gr.Dropdown(choices=data_choices(ctx), value=data),
    )


def build(ctx: ConsoleContext) -> None:
    """Lay out the Adapters tab inside the current `gr.Tab`."""
    import gradio as gr

    status = gr.Markdown("", elem_id="adapters-status")
    table = gr.Dataframe(
        headers=ADAPTER_HEADERS, value=[], interactive=False, label="Registered adapters", elem_id="adapters-table"
    )
    with gr.Row():
        pick = gr.Dropdown(label="Adapter version", choices=[], scale=3, elem_id="adapters-pick")
        publish = gr.Button("Publish to fleet", variant="primary", scale=1, elem_id="adapters-publish")
        unpublish = gr.Button("Unpublish", scale=1, elem_id="adapters-unpublish")
        export = gr.Button("Export (zip)", scale=1, elem_id="adapters-export")
        refresh_btn = gr.Button("Refresh", scale=1)
    download = gr.File(label="Download", interactive=False, visible=False, elem_id="adapters-download")
    detail = gr.Code(label="meta.json", language="json", elem_id="adapters-meta")
    action = gr.Markdown("", elem_id="adapters-action")

    @guarded(lambda msg: (msg, [], gr.Dropdown()))
    def refresh(current: str | None):
        versions = ctx.registry.list()
        note = "" if versions else "No adapters yet: train one in the Train tab or run a federation."
        try:
            entries = ctx.router.adapters()
            served, regions = served_names(entries), served_regions(entries)
        except ServiceUnavailable as exc:
            served, regions, note = set(), {}, problem(exc)
        refs = [v.ref for v in versions]
        value = current if current in refs else (refs[-1] if refs else None)
        return note, adapter_rows(versions, served, regions), gr.Dropdown(choices=refs, value=value)

    @guarded(lambda msg: "")
    def show_meta(ref: str | None):
        return json.dumps(ctx.registry.get(ref).meta, indent=2, default=str) if ref else ""

    @guarded(lambda msg: msg)
    def on_publish(ref: str | None):
        if not ref:
            return problem("Pick an adapter version.")
        v = ctx.registry.get(ref)
        ctx.router.publish_version(v)
        return f"Published `{v.served_name}` (alias `{latest_alias(v.name)}`): pick it in the Chat tab."

    @guarded(lambda msg: msg)
    def on_unpublish(ref: str | None):
        if not ref:
            return problem("Pick an adapter version.")
        v = ctx.registry.get(ref)
        ctx.router.unpublish(v.served_name)
        return f"Unpublished `{v.served_name}`."

    @guarded(lambda msg: (gr.File(visible=False), msg))
    def on_export(ref: str | None):
        if not ref:
            return gr.File(visible=False), problem("Pick an adapter version.")
        path = zip_adapter(ctx.registry.get(ref))
        return gr.File(
            value=str(path), visible=True
        ), f"Exported `{ref}` as {path.name} (PEFT folder: adapter_config.json, adapter_model.safetensors, meta.json)."

    adapter_history.build(ctx)  # alias history with the gate's figures, and Rollback (ui/tabs/adapter_history.py)

    gr.Markdown("### Compare on eval data")
    with gr.Row():
        with gr.Column(scale=2):
            compare_pick = gr.CheckboxGroup(
                label="Models", choices=compare_choices(ctx), value=[], elem_id="compare-models"
            )
            with gr.Row():
                compare_generate = gr.Checkbox(
                    label="Also generate answers (exact match, token F1)", value=True, elem_id="compare-generate"
                )
                compare_max = gr.Number(
                    label="Generate for at most (examples)",
                    value=20,
                    precision=0,
                    minimum=1,
                    elem_id="compare-max-generate",
                )
                compare_tokens = gr.Number(
                    label="Max new tokens per answer",
                    value=64,
                    precision=0,
                    minimum=1,
                    elem_id="compare-max-new-tokens",
                )
        with gr.Column(scale=2):
            compare_upload = gr.File(
                label="Upload eval data (JSONL, JSON, CSV, Parquet)",
                file_types=list(UPLOAD_SUFFIXES),
                type="filepath",
                elem_id="compare-upload",
            )
            compare_check = gr.Markdown("", elem_id="compare-data-check")
            # Only files uploaded to the console (as in the Train tab): a typed path would let the page read any file.
            compare_data = gr.Dropdown(label="Eval data", choices=data_choices(ctx), value=None, elem_id="compare-data")
    compare_btn = gr.Button("Compare", variant="primary", elem_id="compare-start")
    compare_msg = gr.Markdown("", elem_id="compare-message")
    compare_progress = gr.HTML(evals.progress_html(None), elem_id="compare-progress")
    compare_table = gr.Dataframe(
        headers=evals.HEADERS, value=[], interactive=False, label="Scores on the same data", elem_id="compare-table"
    )
    compare_plot = gr.Plot(evals.loss_figure(None), show_label=False, elem_id="compare-plot")
    compare_timer = gr.Timer(ctx.settings.ui.poll_interval_s)

    compare_outputs = [compare_progress, compare_table, compare_plot]
    compare_upload.upload(bind(on_upload, ctx), compare_upload, [compare_check, compare_data])
    compare_inputs = [compare_pick, compare_data, compare_generate, compare_max, compare_tokens]
    compare_btn.click(bind(on_compare, ctx), compare_inputs, compare_msg).then(
        bind(refresh_compare, ctx), None, compare_outputs
    )
    compare_timer.tick(bind(refresh_compare, ctx), None, compare_outputs, show_progress="hidden")
    ctx.on_load.append((bind(refresh_compare, ctx), [], compare_outputs))
    ctx.on_load.append((bind(refresh_compare_form, ctx), [compare_pick, compare_data], [compare_pick, compare_data]))

    outputs = [status, table, pick]
    refresh_btn.click(refresh, pick, outputs).then(
        bind(refresh_compare_form, ctx), [compare_pick, compare_data], [compare_pick, compare_data]
    )
    pick.change(show_meta, pick, detail)
    publish.click(on_publish, pick, action).then(refresh, pick, outputs)
    unpublish.click(on_unpublish, pick, action).then(refresh, pick, outputs)
    export.click(on_export, pick, [download, action])
    ctx.on_load.append((refresh, [pick], outputs))
