"""Adapters tab: every registered version with its lineage; publish to / unpublish from the fleet; download."""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

from appliance.core.adapter_registry import AdapterVersion
from appliance.core.router_client import latest_alias
from ui.context import ConsoleContext, guarded, problem
from ui.services import ServiceUnavailable

ADAPTER_HEADERS = ["adapter", "served", "served as", "base model", "from", "data sha256", "metrics"]


def lineage_source(meta: dict[str, Any]) -> str:
    """Where a version came from: a training run or a federation round."""
    if meta.get("round") is not None:
        fed = meta.get("federation") or meta.get("run")
        return f"round {meta['round']} of federation {fed}" if fed else f"federation round {meta['round']}"
    run = meta.get("run_id") or meta.get("run")
    return f"run {run}" if run else str(meta.get("source", ""))


def adapter_rows(versions: list[AdapterVersion], served: set[str]) -> list[list[Any]]:
    """Rows of the adapters table; `served` is what the router currently serves."""
    rows = []
    for v in versions:
        m = v.meta
        metrics = m.get("metrics") or {}
        metric_text = ", ".join(f"{k}={val:.4g}" if isinstance(val, float) else f"{k}={val}" for k, val in metrics.items()
                                if isinstance(val, (int, float)))
        data_hash = str(m.get("data_sha256") or m.get("data_hash") or "")[:12]
        rows.append([v.ref, "yes" if v.served_name in served else "no", v.served_name, m.get("base_model") or m.get("model") or "",
                     lineage_source(m), data_hash, metric_text])
    return rows


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


def build(ctx: ConsoleContext) -> None:
    """Lay out the Adapters tab inside the current `gr.Tab`."""
    import gradio as gr

    status = gr.Markdown("", elem_id="adapters-status")
    table = gr.Dataframe(headers=ADAPTER_HEADERS, value=[], interactive=False, label="Registered adapters",
                         elem_id="adapters-table")
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
            served = served_names(ctx.router.adapters())
        except ServiceUnavailable as exc:
            served, note = set(), problem(exc)
        refs = [v.ref for v in versions]
        value = current if current in refs else (refs[-1] if refs else None)
        return note, adapter_rows(versions, served), gr.Dropdown(choices=refs, value=value)

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
        return gr.File(value=str(path), visible=True), f"Exported `{ref}` as {path.name} (PEFT folder: adapter_config.json, adapter_model.safetensors, meta.json)."

    outputs = [status, table, pick]
    refresh_btn.click(refresh, pick, outputs)
    pick.change(show_meta, pick, detail)
    publish.click(on_publish, pick, action).then(refresh, pick, outputs)
    unpublish.click(on_unpublish, pick, action).then(refresh, pick, outputs)
    export.click(on_export, pick, [download, action])
    ctx.on_load.append((refresh, [pick], outputs))
