"""Adapters tab, alias history: each move of an alias (`NAME-latest`) with when, by whom, the gate's two figures and
"held back", from the router's `GET /admin/adapters/{alias}/history`; and a Rollback button
(`POST /admin/adapters/{alias}/rollback`, optionally to a chosen version).

A promoted move of a federation round carries no figures in the router's history; when the console runs on the
coordinator's home, they come from the run's gate log (`HOME/federation/NAME/gate.jsonl`,
federation/publishing/gate.py).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fedllm.core.contracts.gate_log import read_gate_log
from fedllm.ui.context import ConsoleContext, guarded, problem
from fedllm.ui.services import ServiceUnavailable

HISTORY_HEADERS = ["version", "when", "by", "loss", "current loss", "held back", "reason"]


def aliases(entries: list[Any]) -> list[str]:
    """The aliases in the router's `GET /admin/adapters` answer, sorted."""
    return sorted({a for e in entries if isinstance(e, dict) for a in (e.get("aliases") or [])})


def gate_figures(federation_dir: Path, alias: str) -> dict[str, dict[str, Any]]:
    """The gate decisions of federation run NAME (alias NAME-latest) by served name; empty when there is no gate log."""
    return read_gate_log(federation_dir / alias.removesuffix("-latest") / "gate.jsonl")


def _num(x: Any) -> Any:
    return round(float(x), 4) if isinstance(x, (int, float)) else ""


def history_rows(history: dict[str, Any], figures: dict[str, dict[str, Any]] | None = None) -> list[list[Any]]:
    """Rows of the history table, newest first."""
    figures = figures or {}
    rows = []
    for r in reversed(history.get("history") or []):
        gate = figures.get(str(r.get("name"))) or {}
        loss = r.get("loss", gate.get("loss"))
        current = r.get("current_loss", gate.get("current_loss"))
        version = f"{r.get('name')} (v{r['version']})" if r.get("version") is not None else str(r.get("name"))
        rows.append(
            [
                version,
                r.get("at", ""),
                r.get("by", ""),
                _num(loss),
                _num(current),
                "held back" if r.get("held_back") else "",
                r.get("reason", ""),
            ]
        )
    return rows


def history_summary(history: dict[str, Any]) -> str:
    """`NAME-latest` -> the adapter it names now."""
    return f"`{history.get('alias')}` answers from **{history.get('current') or '(none)'}**"


def build(ctx: ConsoleContext) -> None:
    """Lay out the alias history and rollback inside the Adapters tab."""
    import gradio as gr

    gr.Markdown("### Alias history and rollback")
    with gr.Row():
        alias = gr.Dropdown(label="Alias", choices=[], scale=2, elem_id="history-alias")
        target = gr.Textbox(
            label="Roll back to (version number or NAME-vN; empty: the one before)", scale=2, elem_id="history-to"
        )
        show = gr.Button("Show history", scale=1, elem_id="history-show")
        roll = gr.Button("Roll back", variant="stop", scale=1, elem_id="history-rollback")
    summary = gr.Markdown("", elem_id="history-summary")
    table = gr.Dataframe(
        headers=HISTORY_HEADERS,
        value=[],
        interactive=False,
        label="Moves of the alias (newest first)",
        elem_id="history-table",
    )

    def _fail(msg: str):
        return msg, []

    @guarded(lambda msg: gr.Dropdown())
    def refresh_aliases(current: str | None):
        try:
            names = aliases(ctx.router.adapters())
        except ServiceUnavailable:
            names = []
        return gr.Dropdown(choices=names, value=current if current in names else (names[0] if names else None))

    @guarded(_fail)
    def on_show(name: str | None):
        if not name:
            return problem("Pick an alias (NAME-latest) of a published adapter."), []
        out = ctx.router.history(name)
        return history_summary(out), history_rows(out, gate_figures(ctx.settings.federation_dir, name))

    @guarded(_fail)
    def on_rollback(name: str | None, to: str | None):
        if not name:
            return problem("Pick an alias (NAME-latest) to roll back."), []
        to = (to or "").strip() or None
        moved = ctx.router.rollback(name, to)
        out = ctx.router.history(name)
        return (
            f"Rolled back: `{moved['alias']}` now names **{moved['name']}** (was {moved['from']}). "
            + history_summary(out),
            history_rows(out, gate_figures(ctx.settings.federation_dir, name)),
        )

    show.click(on_show, alias, [summary, table])
    roll.click(on_rollback, [alias, target], [summary, table])
    alias.change(on_show, alias, [summary, table])
    ctx.on_load.append((refresh_aliases, [alias], [alias]))
