"""Model comparisons as the console sees them: `appliance eval --compare ... --json-out FILE`, launched detached.

The console starts the same command a person types (so the scores are those of `appliance eval --compare`), through
`fedllm.ui.launcher` (kind "eval"), and reads everything back from disk: the launch record (pid, exit code, log) and the
JSON the command rewrites after each model (`{"targets", "data", "done", "total", "rows": [{"model", "metrics"}]}`).
A reload, or a restarted console, shows the same comparison.
"""

from __future__ import annotations

import html
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedllm.core.processes import log_tail
from fedllm.ui.launcher import list_records, read_record, record_state

# (metric key in `appliance eval`'s results, column title); lower loss / perplexity and higher match / F1 are better.
COLUMNS = (
    ("eval_loss", "loss"),
    ("perplexity", "perplexity"),
    ("exact_match", "exact match"),
    ("token_f1", "token F1"),
    ("tokens", "tokens"),
)
BASE = "base"
KIND = "eval"


def evals_dir(home: Path) -> Path:
    """Where the comparisons' JSON results live."""
    return Path(home) / "ui" / "evals"


def compare_command(
    home: Path, targets: list[str], data: Path, out: Path, *, generate: bool, max_generate: int, max_new_tokens: int
) -> list[str]:
    """The `appliance eval --compare` command line for the Adapters tab's form."""
    return [
        sys.executable,
        "-m",
        "fedllm.appliance",
        "--home",
        str(home),
        "eval",
        "--compare",
        ",".join(targets),
        "--data",
        str(data),
        "--json-out",
        str(out),
        "--generate" if generate else "--no-generate",
        "--max-generate",
        str(int(max_generate)),
        "--max-new-tokens",
        str(int(max_new_tokens)),
    ]


@dataclass
class CompareView:
    """One comparison, merged from its launch record and its JSON results."""

    id: str
    state: str  # running | done | failed | stopped
    targets: list[str] = field(default_factory=list)
    data: str = ""
    rows: list[dict[str, Any]] = field(default_factory=list)
    total: int = 0
    exit_code: int | None = None
    error: str | None = None
    started_at: float | None = None
    ended_at: float | None = None


def latest_compare(home: Path) -> CompareView | None:
    """The newest comparison launched from the console, or None."""
    records = list_records(home, KIND)
    return compare_view(records[0]) if records else None


def compare_view(record: dict[str, Any]) -> CompareView:
    """A launch record (with its results file, named after `--json-out` in its command) as a view."""
    cmd = record.get("cmd") or []
    out = Path(cmd[cmd.index("--json-out") + 1]) if "--json-out" in cmd else None
    report = read_record(out) if out is not None else {}
    targets = report.get("targets") or (cmd[cmd.index("--compare") + 1].split(",") if "--compare" in cmd else [])
    code = record.get("exit_code")
    state = record_state(record)
    error = None
    if state == "failed":
        error = _error_line(Path(record["log"])) if record.get("log") else None
        error = error or (
            f"`appliance eval` exited with code {code}" if code is not None else "the comparison process is gone"
        )
    return CompareView(
        id=record.get("id", ""),
        state=state,
        targets=targets,
        data=str(report.get("data") or ""),
        rows=list(report.get("rows") or []),
        total=int(report.get("total") or len(targets)),
        exit_code=code,
        error=error,
        started_at=record.get("started_at"),
        ended_at=record.get("ended_at"),
    )


def _error_line(log: Path) -> str | None:
    """The CLI's `error: ...` message at the end of its log (it may wrap over several lines), or None."""
    tail = log_tail(log, 20)
    if "error:" not in tail:
        return None
    return " ".join(tail[tail.rindex("error:") :].split())


def table_rows(view: CompareView | None) -> list[list[Any]]:
    """One row per model scored so far: the model, then COLUMNS (None where a metric is missing)."""
    if view is None:
        return []
    return [[row.get("model"), *(_round(row.get("metrics", {}).get(key)) for key, _ in COLUMNS)] for row in view.rows]


HEADERS = ["model", *(title for _, title in COLUMNS)]


def _round(value: Any) -> Any:
    return round(float(value), 4) if isinstance(value, float) else value


def progress_html(view: CompareView | None) -> str:
    """The status line: state, models scored of all, the data file, and the error of a failed comparison."""
    if view is None:
        return "<div id='compare-empty'>No comparison yet: pick models and eval data, then press Compare.</div>"
    colour = {"running": "#2563eb", "done": "#16a34a", "failed": "#dc2626", "stopped": "#a16207"}.get(
        view.state, "#6b7280"
    )
    scored = ", ".join(html.escape(str(r.get("model"))) for r in view.rows)
    parts = [
        f"<div class='compare-progress' data-state='{view.state}' data-done='{len(view.rows)}'>",
        f"<span class='compare-state' style='color:white;background:{colour};padding:1px 8px;border-radius:8px'>"
        f"{view.state}</span> scored {len(view.rows)} of {view.total} models"
        f"{' (' + scored + ')' if scored else ''} on <code>{html.escape(Path(view.data).name or '?')}</code>",
    ]
    if view.state == "running" and len(view.rows) < len(view.targets):
        parts.append(f" · now scoring <code>{html.escape(view.targets[len(view.rows)])}</code>")
    if view.state == "failed":
        parts.append(f"<div class='compare-error' style='color:#dc2626'>failed: {html.escape(view.error or '')}</div>")
    parts.append("</div>")
    return "".join(parts)


def loss_figure(view: CompareView | None) -> Any:
    """Bars of eval loss per model (lower is better), the base model in grey."""
    from fedllm.ui.plots import bar_figure

    rows = [
        (str(r.get("model")), float(r["metrics"]["eval_loss"]))
        for r in (view.rows if view else [])
        if isinstance(r.get("metrics", {}).get("eval_loss"), (int, float))
    ]
    return bar_figure(
        [m for m, _ in rows],
        [v for _, v in rows],
        "Eval loss per model (lower is better)",
        "eval loss",
        colors={BASE: "#9ca3af"},
        empty_text="No scores yet",
    )
