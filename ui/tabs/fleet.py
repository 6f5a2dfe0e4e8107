"""Fleet tab: the router's workers (region, health, load, latency, adapters), add or drain one, metrics at a glance."""

from __future__ import annotations

from typing import Any

from ui.context import ConsoleContext, guarded, problem
from ui.services import ServiceUnavailable, summarize_metrics

WORKER_HEADERS = ["id", "url", "region", "healthy", "draining", "canary", "outstanding", "latency (ms)", "models", "adapters"]


def canary_cell(worker: dict[str, Any]) -> str:
    """The canary column: QUARANTINED (no traffic until `appliance fleet clear ID`), else the last verdict."""
    return "QUARANTINED" if worker.get("quarantined") else str(worker.get("canary") or "")


def worker_rows(workers: list[dict[str, Any]]) -> list[list[Any]]:
    """Rows of the workers table."""
    return [[w.get("id"), w.get("url"), w.get("region"), "yes" if w.get("healthy") else "no",
             "yes" if w.get("draining") else "no", canary_cell(w), w.get("outstanding", 0),
             round(float(w["latency_ms"]), 1) if isinstance(w.get("latency_ms"), (int, float)) else "",
             ", ".join(w.get("models") or []), ", ".join(w.get("adapters") or [])] for w in workers]


def metrics_markdown(sums: dict[str, float]) -> str:
    """Requests, errors and mean latency from summed Prometheus samples (names matched loosely)."""
    def pick(*needles: str, suffix: str = "") -> float | None:
        for name, value in sums.items():
            if all(n in name for n in needles) and name.endswith(suffix):
                return value
        return None

    requests = pick("request", suffix="_total")
    errors = pick("error", suffix="_total")
    lat_sum, lat_count = pick("latency", suffix="_sum") or pick("duration", suffix="_sum"), \
        pick("latency", suffix="_count") or pick("duration", suffix="_count")
    mean_ms = f"{1000 * lat_sum / lat_count:.1f} ms" if lat_sum is not None and lat_count else "-"
    return (f"**Requests** {int(requests) if requests is not None else '-'} · **errors** "
            f"{int(errors) if errors is not None else 0} · **mean latency** {mean_ms}")


def build(ctx: ConsoleContext) -> None:
    """Lay out the Fleet tab inside the current `gr.Tab`."""
    import gradio as gr

    status = gr.Markdown("", elem_id="fleet-status")
    metrics = gr.Markdown("", elem_id="fleet-metrics")
    workers = gr.Dataframe(headers=WORKER_HEADERS, value=[], interactive=False, label="Workers", elem_id="fleet-workers")
    with gr.Row():
        url = gr.Textbox(label="Worker URL", placeholder="http://10.0.0.5:8100", scale=3, elem_id="fleet-url")
        region = gr.Textbox(label="Region", value=ctx.settings.serve.region, scale=1)
        add = gr.Button("Add worker", scale=1, elem_id="fleet-add")
    with gr.Row():
        worker_id = gr.Dropdown(label="Worker", choices=[], scale=3, elem_id="fleet-worker")
        drain = gr.Button("Drain", scale=1, elem_id="fleet-drain")
        refresh_btn = gr.Button("Refresh", scale=1)
    action = gr.Markdown("", elem_id="fleet-action")
    timer = gr.Timer(max(5.0, ctx.settings.ui.poll_interval_s))

    def refresh():
        try:
            rows = ctx.router.workers()
            sums = summarize_metrics(ctx.router.metrics_text())
        except ServiceUnavailable as exc:
            return problem(exc), "", [], gr.Dropdown()
        ids = [w.get("id") for w in rows]
        note = "" if rows else "No workers yet: `appliance up` starts one; remote GPUs join with `appliance worker join`."
        return note, metrics_markdown(sums), worker_rows(rows), gr.Dropdown(choices=ids)

    @guarded(lambda msg: msg)
    def on_add(worker_url: str, worker_region: str):
        if not worker_url.strip().startswith(("http://", "https://")):
            return problem("The worker URL must start with http:// or https://")
        wid = ctx.router.register_worker(worker_url.strip(), region=worker_region.strip() or "local")["id"]
        return f"Added worker `{wid}`."

    @guarded(lambda msg: msg)
    def on_drain(wid: str | None):
        if not wid:
            return problem("Pick a worker to drain.")
        ctx.router.drain(wid)
        return f"Draining `{wid}`: it takes no new requests and leaves when idle."

    outputs = [status, metrics, workers, worker_id]
    timer.tick(refresh, None, outputs, show_progress="hidden")
    refresh_btn.click(refresh, None, outputs)
    add.click(on_add, [url, region], action).then(refresh, None, outputs)
    drain.click(on_drain, worker_id, action).then(refresh, None, outputs)
    ctx.on_load.append((refresh, [], outputs))
