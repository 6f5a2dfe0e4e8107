"""Fleet tab: the router's workers (region, health, load, latency, adapters), add one with its API key, drain one or
clear its quarantine, metrics at a glance."""

from __future__ import annotations

import time
from typing import Any

from fedllm.core.contracts.router_client import canary_label
from fedllm.core.contracts.router_metrics import snapshot
from fedllm.ui.context import ConsoleContext, guarded, problem
from fedllm.ui.fleet_history import FleetHistory, figures, summary_markdown
from fedllm.ui.services import ServiceUnavailable

WORKER_HEADERS = [
    "id",
    "url",
    "region",
    "healthy",
    "draining",
    "canary",
    "outstanding",
    "latency (ms)",
    "models",
    "adapters",
]


def canary_cell(worker: dict[str, Any]) -> str:
    """The canary column: QUARANTINED (no traffic until `appliance fleet clear ID`), NO TRAFFIC and why (models no
    trusted worker serves), else the last verdict."""
    return canary_label(worker)


def worker_rows(workers: list[dict[str, Any]]) -> list[list[Any]]:
    """Rows of the workers table."""
    return [
        [
            w.get("id"),
            w.get("url"),
            w.get("region"),
            "yes" if w.get("healthy") else "no",
            "yes" if w.get("draining") else "no",
            canary_cell(w),
            w.get("outstanding", 0),
            round(float(w["latency_ms"]), 1) if isinstance(w.get("latency_ms"), (int, float)) else "",
            ", ".join(w.get("models") or []),
            ", ".join(w.get("adapters") or []),
        ]
        for w in workers
    ]


def add_worker(ctx: ConsoleContext, worker_url: str, worker_region: str, api_key: str = "") -> str:
    """Register a worker with the router (admin token), with the API key the router must send it; the tab's message."""
    worker_url = worker_url.strip()
    if not worker_url.startswith(("http://", "https://")):
        return problem("The worker URL must start with http:// or https://")
    if not api_key.strip():
        return problem(
            "The worker's API key is needed: the router sends it on every call (the worker's gate refuses calls "
            "without it)"
        )
    wid = ctx.router.register_worker(worker_url, region=worker_region.strip() or "local", api_key=api_key.strip())["id"]
    return f"Added worker `{wid}` with its API key."


def clear_quarantine(ctx: ConsoleContext, wid: str | None) -> str:
    """Lift a worker's quarantine (the operator has looked at why its canary answers diverged); the tab's message."""
    if not wid:
        return problem("Pick a worker to clear.")
    ctx.router.clear(wid)
    return f"Cleared `{wid}`: it is checked again and takes traffic once its checks pass."


def build(ctx: ConsoleContext) -> None:
    """Lay out the Fleet tab inside the current `gr.Tab`."""
    import gradio as gr

    status = gr.Markdown("", elem_id="fleet-status")
    metrics = gr.Markdown("", elem_id="fleet-metrics")
    with gr.Row():
        rate_plot = gr.Plot(label="Requests and errors", elem_id="fleet-rate-plot")
        ttft_plot = gr.Plot(label="Time to first token", elem_id="fleet-ttft-plot")
    history = FleetHistory(window_s=600.0)
    workers = gr.Dataframe(
        headers=WORKER_HEADERS, value=[], interactive=False, label="Workers", elem_id="fleet-workers"
    )
    with gr.Row():
        url = gr.Textbox(label="Worker URL", placeholder="http://10.0.0.5:8100", scale=3, elem_id="fleet-url")
        region = gr.Textbox(label="Region", value=ctx.settings.serve.region, scale=1)
        api_key = gr.Textbox(
            label="Worker API key",
            type="password",
            scale=2,
            elem_id="fleet-api-key",
            placeholder="the key its vLLM (or gate) asks for",
        )
        add = gr.Button("Add worker", scale=1, elem_id="fleet-add")
    with gr.Row():
        worker_id = gr.Dropdown(label="Worker", choices=[], scale=3, elem_id="fleet-worker")
        drain = gr.Button("Drain", scale=1, elem_id="fleet-drain")
        clear = gr.Button("Clear quarantine", scale=1, elem_id="fleet-clear")
        refresh_btn = gr.Button("Refresh", scale=1)
    action = gr.Markdown("", elem_id="fleet-action")
    timer = gr.Timer(max(5.0, ctx.settings.ui.poll_interval_s))

    def refresh():
        try:
            rows = ctx.router.workers()
            snap = snapshot(ctx.router.metrics_text(), time.time())
        except ServiceUnavailable as exc:
            return problem(exc), "", [], gr.Dropdown(), gr.Plot(), gr.Plot()
        history.add(snap)
        ids = [w.get("id") for w in rows]
        note = (
            "" if rows else "No workers yet: `appliance up` starts one; remote GPUs join with `appliance worker join`."
        )
        return (note, summary_markdown(snap), worker_rows(rows), gr.Dropdown(choices=ids), *figures(history))

    @guarded(lambda msg: msg)
    def on_add(worker_url: str, worker_region: str, key: str):
        return add_worker(ctx, worker_url, worker_region, key)

    @guarded(lambda msg: msg)
    def on_clear(wid: str | None):
        return clear_quarantine(ctx, wid)

    @guarded(lambda msg: msg)
    def on_drain(wid: str | None):
        if not wid:
            return problem("Pick a worker to drain.")
        ctx.router.drain(wid)
        return f"Draining `{wid}`: it takes no new requests and leaves when idle."

    outputs = [status, metrics, workers, worker_id, rate_plot, ttft_plot]
    timer.tick(refresh, None, outputs, show_progress="hidden")
    refresh_btn.click(refresh, None, outputs)
    add.click(on_add, [url, region, api_key], action).then(refresh, None, outputs)
    clear.click(on_clear, worker_id, action).then(refresh, None, outputs)
    drain.click(on_drain, worker_id, action).then(refresh, None, outputs)
    ctx.on_load.append((refresh, [], outputs))
