"""Training runs as the console sees them: read from `runs/ID/` (docs/CONTRACTS.md) and the console's launch records.

All state comes from disk, never from a browser session, so a reload (or a restarted console) shows the same
truth. A `running` status whose process is gone is a crash and is shown as failed, with the exit code when the
console launched it, and the end of its log.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedllm.core.processes import log_tail
from fedllm.ui.launcher import list_records, pid_alive, record_state

FINAL_STATES = ("done", "failed", "stopped")


@dataclass
class RunView:
    """One run, merged from its folder and its launch record."""

    id: str
    state: str  # starting | running | done | failed | stopped
    run_dir: Path | None = None
    launch_id: str | None = None
    pid: int | None = None
    exit_code: int | None = None
    error: str | None = None
    adapter: str | None = None
    started_at: float | None = None
    metrics: list[dict[str, Any]] = field(default_factory=list)
    log_path: Path | None = None

    @property
    def last(self) -> dict[str, Any]:
        """The last optimizer-step line of metrics.jsonl (empty if none yet)."""
        steps = [m for m in self.metrics if "loss" in m]
        return steps[-1] if steps else {}


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Whole JSON lines of a file being appended to (a half-written last line is skipped)."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError:
        return []
    rows = []
    for line in text.splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows


def smooth(values: list[float], weight: float = 0.8) -> list[float]:
    """Exponential moving average with bias correction (TensorBoard-style smoothing); same length as `values`."""
    out, avg = [], 0.0
    for i, v in enumerate(values, start=1):
        avg = weight * avg + (1 - weight) * v
        out.append(avg / (1 - weight**i))
    return out


def _read_status(run_dir: Path) -> dict[str, Any]:
    try:
        data = json.loads((run_dir / "status.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def list_runs(runs_dir: Path, home: Path) -> list[RunView]:
    """Every run, newest first: run folders merged with the launch records that started them.

    A launch whose process never created a run folder (it failed on its arguments or data) is a run of its own.
    """
    launches = list_records(home, "train")
    by_pid = {r["pid"]: r for r in launches if r.get("pid")}
    runs: list[RunView] = []
    matched: set[str] = set()
    dirs = [d for d in Path(runs_dir).iterdir() if d.is_dir()] if Path(runs_dir).is_dir() else []
    for d in dirs:
        status = _read_status(d)
        launch = by_pid.get(status.get("pid")) or next((r for r in launches if r.get("run_id") == d.name), None)
        if launch:
            matched.add(launch["id"])
        runs.append(_merge(d, status, launch))
    for r in launches:
        if r["id"] not in matched:
            runs.append(_launch_only(r))
    runs.sort(key=lambda v: v.started_at or 0.0, reverse=True)
    return runs


def _merge(run_dir: Path, status: dict[str, Any], launch: dict[str, Any] | None) -> RunView:
    state = status.get("state") or "running"
    pid = status.get("pid") or (launch or {}).get("pid")
    view = RunView(
        id=run_dir.name,
        state=state,
        run_dir=run_dir,
        launch_id=(launch or {}).get("id"),
        pid=pid,
        exit_code=status.get("exit_code"),
        error=status.get("error"),
        adapter=status.get("adapter"),
        started_at=(launch or {}).get("started_at") or run_dir.stat().st_mtime,
        metrics=read_jsonl(run_dir / "metrics.jsonl"),
        log_path=run_dir / "train.log",
    )
    if launch and launch.get("exit_code") is not None and view.exit_code is None:
        view.exit_code = launch["exit_code"]
    if state not in FINAL_STATES and not pid_alive(pid) and not (launch and pid_alive(launch.get("pid"))):
        # The process is gone without writing a final status: a crash, or a kill.
        if launch and launch.get("stop_requested"):
            view.state = "stopped"
        else:
            view.state = "failed"
            view.error = view.error or f"the training process (pid {pid}) is gone without finishing (crashed or killed)"
    if view.state == "failed" and launch and Path(launch["log"]).exists():
        view.log_path = Path(launch["log"]) if not log_tail(view.log_path) else view.log_path
    return view


def _launch_only(record: dict[str, Any]) -> RunView:
    code = record.get("exit_code")
    state = record_state(record, alive="starting")
    error = None
    if state == "failed":
        error = (
            f"`appliance train` exited with code {code}"
            if code is not None
            else "the launcher died before the run started"
        )
    return RunView(
        id=f"launch-{record['id']}",
        state=state,
        launch_id=record["id"],
        pid=record.get("pid"),
        exit_code=code,
        error=error,
        started_at=record.get("started_at"),
        log_path=Path(record["log"]),
    )


def train_command(
    data: Path,
    *,
    model: str | None,
    output: str | None,
    max_steps: int,
    lr: float,
    lora_r: int,
    lora_alpha: int,
    batch_size: int,
    max_seq_len: int,
    home: Path,
) -> list[str]:
    """The `appliance train` command line for the Train tab's form."""
    cmd = [
        sys.executable,
        "-m",
        "fedllm.appliance",
        "--home",
        str(home),
        "train",
        "--data",
        str(data),
        "--max-steps",
        str(int(max_steps)),
        "--lr",
        str(lr),
        "--lora-r",
        str(int(lora_r)),
        "--lora-alpha",
        str(int(lora_alpha)),
        "--batch-size",
        str(int(batch_size)),
        "--max-seq-len",
        str(int(max_seq_len)),
    ]
    if model:
        cmd += ["--model", model]
    if output:
        cmd += ["--output", output]
    return cmd


def resume_command(run_id: str, home: Path) -> list[str]:
    """The `appliance train --resume RUN_ID` command line."""
    return [sys.executable, "-m", "fedllm.appliance", "--home", str(home), "train", "--resume", run_id]


def format_duration(seconds: float | None) -> str:
    """`H:MM:SS` or `M:SS`; "?" when unknown."""
    if seconds is None:
        return "?"
    s = int(max(0, seconds))
    h, rem = divmod(s, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"
