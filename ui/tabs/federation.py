"""Federation tab: the coordinator's live status, enrolment of silos, start/stop, and the bundled demo."""

from __future__ import annotations

import html
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from fedllm.core.processes import log_tail
from fedllm.core.sections.federation import STRATEGY_NAMES
from fedllm.federation.publishing.heldout import gate_text
from fedllm.ui import launcher
from fedllm.ui.context import ConsoleContext, bind, guarded, problem
from fedllm.ui.plots import line_figure, stacked_bar_figure
from fedllm.ui.runs import format_duration
from fedllm.ui.services import ServiceUnavailable

SILO_HEADERS = ["silo", "online", "last seen", "rounds", "examples"]
ROUND_HEADERS = [
    "round",
    "participants",
    "train loss",
    "eval loss",
    "bytes in",
    "bytes out",
    "duration (s)",
    "epsilon",
    "gate",
    "adapter",
]
TIMING_HEADERS = [
    "round",
    "silo",
    "download (s)",
    "train (s)",
    "upload (s)",
    "other (s)",
    "deadline (s)",
    "MB down",
    "MB up",
]
TIMING_PARTS = ["download", "train", "upload", "other"]  # of a silo's span, TRAIN sent to UPDATE received


def summary_markdown(status: dict[str, Any], now: float | None = None) -> str:
    """Round, phase, deadline and strategy as a short Markdown block."""
    now = time.time() if now is None else now
    deadline = status.get("deadline")
    left = (
        f"{format_duration(float(deadline) - now)} left"
        if isinstance(deadline, (int, float)) and deadline > now
        else "-"
    )
    phase = status.get("phase", "?")
    if phase == "finished":  # an ended run whose coordinator stays up for the next one (federation/runtime/runs.py)
        phase = f"finished ({status.get('ended', 'done')}): start the next run below"
    return (
        f"**Run** `{status.get('run', '?')}` · **round** {status.get('round', '?')} / {status.get('rounds_total', '?')}"
        f" · **phase** {phase} · **deadline** {left} · **strategy** {status.get('strategy', '?')}"
    )


def silo_rows(status: dict[str, Any], now: float | None = None) -> list[list[Any]]:
    """Rows of the silos table."""
    now = time.time() if now is None else now
    rows = []
    for s in status.get("silos", []):
        seen = s.get("last_seen")
        ago = f"{format_duration(now - float(seen))} ago" if isinstance(seen, (int, float)) else ""
        rows.append([s.get("id"), "yes" if s.get("online") else "no", ago, s.get("rounds", 0), s.get("examples", 0)])
    return rows


def round_rows(status: dict[str, Any]) -> list[list[Any]]:
    """Rows of the rounds table."""
    rows = []
    for r in status.get("rounds", []):
        m = r.get("metrics") or {}
        parts = r.get("participants")
        rows.append(
            [
                r.get("round"),
                ", ".join(parts) if isinstance(parts, list) else parts,
                _num(m.get("train_loss")),
                _num(m.get("eval_loss")),
                r.get("bytes_in"),
                r.get("bytes_out"),
                _num(r.get("duration_s"), 1),
                _num(r.get("epsilon"), 3),
                gate_text(r.get("gate")),
                r.get("adapter") or "",
            ]
        )
    return rows


def _last_timed_round(status: dict[str, Any]) -> dict[str, Any] | None:
    return next((r for r in reversed(status.get("rounds", [])) if r.get("timings")), None)


def silo_timing_parts(timing: dict[str, Any]) -> dict[str, float]:
    """A silo's span split into download, train, upload and other (the silo's decoding and encoding; also the transfers
    when the silo sent no timestamps or clock offset, so download and upload are unknown)."""

    def num(key: str) -> float:
        value = timing.get(key)
        return float(value) if isinstance(value, (int, float)) else 0.0

    parts = {"download": num("download_s"), "train": num("train_s"), "upload": num("upload_s")}
    parts["other"] = max(0.0, num("span_s") - sum(parts.values()))
    return parts


def timing_rows(status: dict[str, Any]) -> list[list[Any]]:
    """Rows of the per-silo timings table: every silo of the last round that has timings."""
    record = _last_timed_round(status)
    if record is None:
        return []
    rows = []
    for silo, t in sorted(record["timings"].items()):
        if not isinstance(t, dict):
            continue
        other = silo_timing_parts(t)["other"] if isinstance(t.get("span_s"), (int, float)) else None
        mb = [round(t[k] / 1e6, 2) if isinstance(t.get(k), (int, float)) else "" for k in ("bytes_down", "bytes_up")]
        rows.append(
            [
                record.get("round"),
                silo,
                _num(t.get("download_s"), 3),
                _num(t.get("train_s"), 3),
                _num(t.get("upload_s"), 3),
                _num(other, 3),
                _num((record.get("deadlines_s") or {}).get(silo), 1),
                *mb,
            ]
        )
    return rows


def timing_figure(status: dict[str, Any]):
    """Stacked bars per silo of the last round: download, train, upload, other (seconds)."""
    record = _last_timed_round(status)
    rows = (
        []
        if record is None
        else [(str(s), silo_timing_parts(t)) for s, t in sorted(record["timings"].items()) if isinstance(t, dict)]
    )
    title = f"Round {record.get('round')}: where each silo's time went" if record else "Per-silo timings"
    return stacked_bar_figure(rows, TIMING_PARTS, title, "seconds", empty_text="No round yet")


def _num(x: Any, digits: int = 4) -> Any:
    return round(float(x), digits) if isinstance(x, (int, float)) else ""


def _loss_point(metrics: Any) -> tuple[float, str] | None:
    """(loss, suffix): eval loss when the metrics have it, else train loss marked as such."""
    if not isinstance(metrics, dict):
        return None
    for key, suffix in (("eval_loss", ""), ("train_loss", " (train)")):
        if isinstance(metrics.get(key), (int, float)):
            return float(metrics[key]), suffix
    return None


def eval_frame(status: dict[str, Any]):
    """A long table (round, loss, series) of the global and per-silo loss across rounds (eval loss, else train)."""
    import pandas as pd

    rows = []
    for r in status.get("rounds", []):
        point = _loss_point(r.get("metrics"))
        if point:
            rows.append({"round": r["round"], "loss": point[0], "series": "global" + point[1]})
        for silo, sm in (r.get("per_silo") or {}).items():
            point = _loss_point(sm)
            if point:
                rows.append({"round": r["round"], "loss": point[0], "series": str(silo) + point[1]})
    return pd.DataFrame(rows, columns=["round", "loss", "series"]).astype(
        {"round": "int64", "loss": "float64", "series": "str"}
    )


def federation_figure(status: dict[str, Any]):
    """Global and per-silo loss across rounds (eval loss, else train loss, labelled)."""
    frame = eval_frame(status)
    global_first = {n: "#111827" for n in frame["series"] if n.startswith("global")}
    return line_figure(
        frame,
        "round",
        "loss",
        "Loss per round: global and per silo",
        global_first,
        empty_text="No rounds yet",
        size_in=(6.0, 3.2),
    )


def appliance_cmd(ctx: ConsoleContext, *args: str) -> list[str]:
    """`python -m fedllm.appliance --home HOME ARGS...`."""
    return [sys.executable, "-m", "fedllm.appliance", "--home", str(ctx.settings.home), *args]


def running_launch(ctx: ConsoleContext, kind: str) -> dict[str, Any] | None:
    """The newest launch of `kind` that is still running."""
    return next((r for r in launcher.list_records(ctx.settings.home, kind) if launcher.pid_alive(r.get("pid"))), None)


def launch_checked(ctx: ConsoleContext, kind: str, cmd: list[str], grace_s: float = 1.5) -> dict[str, Any]:
    """Launch `cmd` detached and give it `grace_s` to fail fast (bad flags, port taken).

    Raises:
        ServiceUnavailable: it exited with an error within the grace period (message has its log tail).
    """
    record = launcher.launch(ctx.settings.home, kind, cmd)
    path = launcher.launches_dir(ctx.settings.home) / f"{record['id']}.json"
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline and record.get("exit_code") is None:
        time.sleep(0.1)
        record = launcher.read_record(path)
    if record.get("exit_code") not in (None, 0):
        raise ServiceUnavailable(
            f"The {kind} exited with code {record['exit_code']}:\n```\n{log_tail(Path(record['log']), 12)}\n```"
        )
    return record


def refresh(ctx: ConsoleContext):
    """The live views from the coordinator's `/status`: (problem, summary, silos, rounds, plot, timings, timing
    plot)."""
    try:
        status = ctx.coordinator.request("GET", "/status")
    except ServiceUnavailable as exc:
        return problem(exc), "", [], [], federation_figure({}), [], timing_figure({})
    if not isinstance(status, dict):
        return (
            problem("The coordinator's /status did not answer a JSON object."),
            "",
            [],
            [],
            federation_figure({}),
            [],
            timing_figure({}),
        )
    return (
        "",
        summary_markdown(status),
        silo_rows(status),
        round_rows(status),
        federation_figure(status),
        timing_rows(status),
        timing_figure(status),
    )


@guarded(lambda msg: msg)
def on_enrol(ctx: ConsoleContext, name: str, key: str, examples: float | None = None) -> str:
    """Enrol a silo's public key and its declared example count with `appliance federation enroll --examples N`
    (which checks the name and the key); the count bounds the weight the silo's updates get in every round."""
    name, key = name.strip(), key.strip()
    if examples is None or examples != examples or examples < 1 or int(examples) != examples:
        return problem(
            "Declare the silo's example count (a whole number, at least 1): its updates never weigh more "
            "than that in a round."
        )
    result = subprocess.run(
        appliance_cmd(ctx, "federation", "enroll", "--examples", str(int(examples)), "--", name, key),
        capture_output=True,
        text=True,
        timeout=60,
    )
    if result.returncode != 0:
        return problem(
            " ".join((result.stderr or result.stdout).split()) or f"enrolment failed (exit code {result.returncode})"
        )
    return f"Enrolled silo **{html.escape(name)}** ({int(examples)} examples declared); it can join at the next round."


@guarded(lambda msg: msg)
def on_start(ctx: ConsoleContext, rounds_n: float, strat: str, min_n: float, steps: float) -> str:
    """Start `appliance coordinator start` detached with the tab's settings."""
    if running_launch(ctx, "coordinator"):
        return problem("A coordinator started from this console is already running; stop it first.")
    cmd = appliance_cmd(
        ctx,
        "coordinator",
        "start",
        "--rounds",
        str(int(rounds_n)),
        "--strategy",
        strat,
        "--min-silos",
        str(int(min_n)),
        "--local-steps",
        str(int(steps)),
    )
    record = launch_checked(ctx, "coordinator", cmd)
    return f"Started the coordinator (pid {record.get('pid')}); log: `{record['log']}`."


@guarded(lambda msg: msg)
def on_next_run(
    ctx: ConsoleContext, run_name: str | None, rounds_n: float, strat: str, min_n: float, steps: float
) -> str:
    """Ask a coordinator whose run has ended (`phase` finished) to start the next run (`POST /runs/next`,
    federation/runtime/runs.py): the same run for more rounds, or a new run when a name is given."""
    body: dict[str, Any] = {
        "rounds": int(rounds_n),
        "strategy": strat,
        "min_silos": int(min_n),
        "local_steps": int(steps),
    }
    if run_name and run_name.strip():
        body["run"] = run_name.strip()
    status = ctx.coordinator.request("GET", "/status")
    if isinstance(status, dict) and status.get("phase") != "finished":
        return problem(
            f"The coordinator's run `{status.get('run')}` is still {status.get('phase')}; the next run starts "
            f"once it has ended."
        )
    out = ctx.coordinator.request("POST", "/runs/next", json=body)
    return f"Started run `{out['run']}` (up to round {out['rounds']})."


@guarded(lambda msg: msg)
def on_stop(ctx: ConsoleContext) -> str:
    """Stop the coordinator or demo this console started."""
    for kind in ("coordinator", "demo"):
        record = running_launch(ctx, kind)
        if record and launcher.stop(ctx.settings.home, record["id"]):
            return f"Asked the {kind} (pid {record['pid']}) to stop."
    return problem("No coordinator or demo started from this console is running.")


def demo_markdown(ctx: ConsoleContext) -> str:
    """The last demo's verdict from its `result.json`: the share of the centralized gain recovered on each silo."""
    import json

    path = ctx.settings.home / "ui" / "demo" / "result.json"
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
        shares = ", ".join(f"{html.escape(str(org))} **{float(share):.0%}**" for org, share in doc["recovered"].items())
        beats = "beats" if doc.get("federated_beats_local_cross_silo") else "does not beat"
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return ""
    return (
        f"**Last demo**: the federated adapter recovered {shares} of the centralized gain (held-out loss); it {beats} "
        f"every local-only adapter on the other silos' data."
    )


@guarded(lambda msg: msg)
def on_demo(ctx: ConsoleContext) -> str:
    """Start `appliance demo federation` detached."""
    if running_launch(ctx, "demo"):
        return problem("The demo is already running.")
    out = ctx.settings.home / "ui" / "demo"
    record = launch_checked(ctx, "demo", appliance_cmd(ctx, "demo", "federation", "--out", str(out)))
    return (
        f"Started the 3-silo demo (pid {record.get('pid')}) in `{out}`; it prints base, local-only, federated and "
        f"centralized held-out losses at the end of its log: `{record['log']}`."
    )


def build(ctx: ConsoleContext) -> None:
    """Lay out the Federation tab inside the current `gr.Tab` and wire its handlers."""
    import gradio as gr

    fed = ctx.settings.federation
    status_md = gr.Markdown("", elem_id="fed-status")
    summary = gr.Markdown("", elem_id="fed-summary")
    with gr.Row():
        silos = gr.Dataframe(headers=SILO_HEADERS, value=[], interactive=False, label="Silos", elem_id="fed-silos")
        plot = gr.Plot(federation_figure({}), show_label=False, elem_id="fed-plot")
    rounds = gr.Dataframe(headers=ROUND_HEADERS, value=[], interactive=False, label="Rounds", elem_id="fed-rounds")
    with gr.Row():
        timings = gr.Dataframe(
            headers=TIMING_HEADERS,
            value=[],
            interactive=False,
            elem_id="fed-timings",
            label="Last round per silo: download, train, upload (s); deadline after the round's start",
        )
        timing_plot = gr.Plot(timing_figure({}), show_label=False, elem_id="fed-timing-plot")
    with gr.Row():
        with gr.Column():
            gr.Markdown("#### Enrol a silo")
            silo_name = gr.Textbox(label="Silo name", elem_id="fed-silo-name")
            silo_key = gr.Textbox(label="Silo public key (z85, 40 characters)", elem_id="fed-silo-key")
            silo_examples = gr.Number(
                label="Declared example count (bounds the silo's weight)",
                value=None,
                precision=0,
                minimum=1,
                elem_id="fed-silo-examples",
            )
            enrol = gr.Button("Enrol", elem_id="fed-enrol")
        with gr.Column():
            gr.Markdown("#### Run a federation")
            with gr.Row():
                n_rounds = gr.Number(label="Rounds", value=fed.rounds, precision=0, minimum=1)
                strategy = gr.Dropdown(label="Strategy", value=fed.strategy, choices=list(STRATEGY_NAMES))
            with gr.Row():
                min_silos = gr.Number(label="Min silos", value=fed.min_silos, precision=0, minimum=1)
                local_steps = gr.Number(label="Local steps", value=fed.local_steps, precision=0, minimum=1)
            with gr.Row():
                start = gr.Button("Start coordinator", variant="primary", elem_id="fed-start")
                stop = gr.Button("Stop", elem_id="fed-stop")
                demo = gr.Button("Run the 3-silo demo", elem_id="fed-demo")
            with gr.Row():
                next_name = gr.Textbox(
                    label="Next run name (empty: the same run, more rounds)", elem_id="fed-next-name"
                )
                next_run = gr.Button("Start next run", elem_id="fed-next-run")
    action = gr.Markdown("", elem_id="fed-action")
    demo_result = gr.Markdown("", elem_id="fed-demo-result")
    timer = gr.Timer(ctx.settings.ui.poll_interval_s)
    timer.tick(bind(demo_markdown, ctx), None, demo_result, show_progress="hidden")
    ctx.on_load.append((bind(demo_markdown, ctx), [], [demo_result]))

    outputs = [status_md, summary, silos, rounds, plot, timings, timing_plot]
    timer.tick(bind(refresh, ctx), None, outputs, show_progress="hidden")
    enrol.click(bind(on_enrol, ctx), [silo_name, silo_key, silo_examples], action)
    start.click(bind(on_start, ctx), [n_rounds, strategy, min_silos, local_steps], action)
    stop.click(bind(on_stop, ctx), None, action)
    demo.click(bind(on_demo, ctx), None, action)
    next_run.click(bind(on_next_run, ctx), [next_name, n_rounds, strategy, min_silos, local_steps], action)
    ctx.on_load.append((bind(refresh, ctx), [], outputs))
