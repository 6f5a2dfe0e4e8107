"""Jobs tab: device groups (their nodes' resources summed, jobs running and waiting) and their nodes (free/used
resources), jobs (state, node, age, reason), a live log tail, Stop, and a form that queues a training job on a group.
Talks to the cluster through `appliance node|job` (fedllm.ui.jobs_client)."""

from __future__ import annotations

from typing import Any

from fedllm.ui.context import ConsoleContext, guarded, problem
from fedllm.ui.jobs_client import JobsClient
from fedllm.ui.services import ServiceUnavailable

GROUP_HEADERS = [
    "group",
    "nodes alive/total",
    "CPU free/total",
    "GPU free/total",
    "slot free/total",
    "memory GiB free/total",
    "jobs running",
    "jobs waiting",
]
NODE_HEADERS = [
    "group",
    "node",
    "name",
    "state",
    "CPU free/total",
    "GPU free/total",
    "slot free/total",
    "memory GiB free/total",
]
JOB_HEADERS = ["job", "state", "group", "node", "age", "attempts", "reason / command"]


def _pair(n: dict[str, Any], key: str) -> str:
    return f"{n['free'].get(key, 0):g}/{n['total'].get(key, 0):g}"


def node_rows(nodes: list[dict[str, Any]]) -> list[list[Any]]:
    """Rows of the nodes table, by group."""
    return [
        [
            n["group"],
            n["node_id"][:12],
            n["labels"].get("node", ""),
            "alive" if n["alive"] else "dead",
            _pair(n, "CPU"),
            _pair(n, "GPU"),
            _pair(n, "slot"),
            _pair(n, "memory_gb"),
        ]
        for n in nodes
    ]


def group_rows(nodes: list[dict[str, Any]], jobs: list[dict[str, Any]]) -> list[list[Any]]:
    """One row per device group: its live nodes' free and total resources summed, and its jobs running and waiting
    (queued or pending). A dead node counts in the group's nodes but not in its resources."""
    groups: dict[str, dict[str, Any]] = {}
    for n in nodes:
        g = groups.setdefault(n["group"], {"alive": 0, "nodes": 0, "free": {}, "total": {}, "running": 0, "waiting": 0})
        g["nodes"] += 1
        if n["alive"]:
            g["alive"] += 1
            for side in ("free", "total"):
                for key, value in n[side].items():
                    g[side][key] = g[side].get(key, 0) + value
    for j in jobs:
        group = groups.get(j["group"])
        if group is not None:
            group["running"] += j["state"] == "RUNNING"
            group["waiting"] += j["state"] in ("QUEUED", "PENDING")
    return [
        [
            name,
            f"{g['alive']}/{g['nodes']}",
            *(_pair(g, key) for key in ("CPU", "GPU", "slot", "memory_gb")),
            g["running"],
            g["waiting"],
        ]
        for name, g in sorted(groups.items())
    ]


def age(seconds: float) -> str:
    """A short age for the jobs table: seconds, then minutes, then hours."""
    return (
        f"{seconds:.0f}s" if seconds < 120 else f"{seconds / 60:.0f}m" if seconds < 7200 else f"{seconds / 3600:.0f}h"
    )


def job_rows(jobs: list[dict[str, Any]]) -> list[list[Any]]:
    """Rows of the jobs table, newest first."""
    return [
        [
            j["job_id"],
            j["state"],
            j["group"],
            (j.get("node_id") or "-")[:12],
            age(j["age_s"]),
            j["attempts"],
            j.get("reason") or j["command"],
        ]
        for j in reversed(jobs)
    ]


def build(ctx: ConsoleContext) -> None:
    """Lay out the Jobs tab inside the current `gr.Tab`."""
    import gradio as gr

    client = JobsClient(ctx.settings.home)
    status = gr.Markdown("", elem_id="jobs-status")
    groups = gr.Dataframe(
        headers=GROUP_HEADERS, value=[], interactive=False, label="Device groups", elem_id="jobs-groups"
    )
    nodes = gr.Dataframe(
        headers=NODE_HEADERS, value=[], interactive=False, label="Groups and nodes", elem_id="jobs-nodes"
    )
    jobs = gr.Dataframe(headers=JOB_HEADERS, value=[], interactive=False, label="Jobs", elem_id="jobs-table")
    with gr.Row():
        job_id = gr.Dropdown(label="Job", choices=[], scale=3, elem_id="jobs-job")
        stop = gr.Button("Stop", scale=1, elem_id="jobs-stop")
        refresh_btn = gr.Button("Refresh", scale=1)
    log = gr.Textbox(label="Log (last lines)", lines=12, max_lines=12, interactive=False, elem_id="jobs-log")
    with gr.Accordion("Submit a training job", open=False):
        with gr.Row():
            group = gr.Textbox(label="Group", value=ctx.settings.cluster.group, scale=1, elem_id="jobs-group")
            data = gr.Textbox(label="Data (a path on the node that runs it)", scale=3, elem_id="jobs-data")
            output = gr.Textbox(label="Adapter name", scale=1, elem_id="jobs-output")
        with gr.Row():
            steps = gr.Number(label="Max steps", value=20, precision=0, elem_id="jobs-steps")
            cpus = gr.Number(label="CPUs", value=1, elem_id="jobs-cpus")
            slots = gr.Number(label="Slots / GPUs", value=0, elem_id="jobs-slots")
            submit = gr.Button("Submit", elem_id="jobs-submit")
    action = gr.Markdown("", elem_id="jobs-action")
    timer = gr.Timer(max(5.0, ctx.settings.ui.poll_interval_s))

    def refresh(selected: str | None):
        try:
            node_list, job_list = client.nodes(), client.jobs()
            tail = client.log_tail(selected) if selected else ""
        except ServiceUnavailable as exc:
            return problem(exc), [], [], [], gr.Dropdown(), ""
        ids = [j["job_id"] for j in reversed(job_list)]
        note = (
            ""
            if job_list
            else "No jobs yet: submit one below or with `appliance job submit --group NAME -- train ...`."
        )
        return (
            note,
            group_rows(node_list, job_list),
            node_rows(node_list),
            job_rows(job_list),
            gr.Dropdown(choices=ids, value=selected if selected in ids else None),
            tail,
        )

    @guarded(lambda msg: msg)
    def on_stop(selected: str | None):
        if not selected:
            return problem("Pick a job to stop.")
        return client.stop(selected)

    @guarded(lambda msg: msg)
    def on_submit(group_: str, data_: str, output_: str, steps_: float, cpus_: float, slots_: float):
        if not data_.strip():
            return problem("The data path is needed (a file on the node that runs the job).")
        return client.submit_training(
            group_.strip(), data_.strip(), int(steps_ or 1), float(cpus_ or 1), float(slots_ or 0), output_.strip()
        )

    outputs = [status, groups, nodes, jobs, job_id, log]
    timer.tick(refresh, job_id, outputs, show_progress="hidden")
    refresh_btn.click(refresh, job_id, outputs)
    job_id.change(refresh, job_id, outputs, show_progress="hidden")
    stop.click(on_stop, job_id, action).then(refresh, job_id, outputs)
    submit.click(on_submit, [group, data, output, steps, cpus, slots], action).then(refresh, job_id, outputs)
    ctx.on_load.append((refresh, [job_id], outputs))
