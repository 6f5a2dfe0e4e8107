"""`appliance node ...` and `appliance job ...`: machines joined to the appliance's Ray cluster in device groups, and
jobs (any appliance command) placed on a group. Thin: the work is in `fedllm.appliance.cluster`."""

from __future__ import annotations

import json
import logging
import socket
import time
from pathlib import Path
from typing import Optional

import typer

from fedllm.appliance.commands.common import cli_errors, console, err_console, needs, settings_from
from fedllm.core.errors import ConfigError

logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request to the head would drown the output

node_app = typer.Typer(
    help=(
        "Machines of the appliance's cluster. A node belongs to one device group (a label); jobs name the group "
        "they run on. `node join` adds this machine to a head (token from the head's keys/ray_token); `node ls` "
        "shows every node with total and free CPUs, GPUs, slots and memory."
    ),
    no_args_is_help=True,
)
job_app = typer.Typer(
    help=(
        "Jobs on the appliance's cluster: any appliance command (`train ...`, `eval ...`, `silo join ...`, "
        "`worker join ...`) run on a node of a device group, queued while the group is full, with logs and stop. Run "
        "these on the head (the machine of `appliance up`)."
    ),
    no_args_is_help=True,
)
cluster_app = typer.Typer(
    help="The cluster head (`appliance up` runs it; use it alone to run only the head).", no_args_is_help=True
)


def _parse_labels(labels: list[str]) -> dict[str, str]:
    out = {}
    for item in labels:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--label {item!r} must be KEY=VALUE")
        out[key] = value
    return out


@cluster_app.command("head")
@needs("cluster", for_what="`appliance head`")
def head(ctx: typer.Context) -> None:
    """Run the Ray head (token auth, job API on 127.0.0.1) and the job queue until Ctrl-C."""
    from fedllm.appliance.cluster.head import run_head
    from fedllm.core.processes import stop_on_signals

    with cli_errors():
        settings = settings_from(ctx)
        stop = stop_on_signals()
        run_head(settings, stop)


@node_app.command("join")
@needs("cluster", for_what="`appliance node join`")
def node_join(
    ctx: typer.Context,
    head: str = typer.Option(..., "--head", help="The head's HOST:PORT (cluster.port on the head, 6380 by default)."),
    token_file: Path = typer.Option(..., "--token-file", help="A copy of the head's keys/ray_token (mode 0600)."),
    group: str = typer.Option(..., "--group", help="Device group of this node (jobs name it with --group)."),
    label: list[str] = typer.Option([], "--label", help="Extra node label KEY=VALUE, e.g. region=eu (repeatable)."),
    gpus: Optional[int] = typer.Option(None, "--gpus", help="GPUs offered to jobs (default: what Ray detects)."),
    cpus: Optional[int] = typer.Option(None, "--cpus", help="CPUs offered to jobs (default: all)."),
    slots: int = typer.Option(0, "--slots", help="`slot` resources: stand-ins for GPUs on a CPU-only machine."),
    name: Optional[str] = typer.Option(None, "--name", help="Name of this node in job records (default: host name)."),
    node_ip: str = typer.Option(
        "127.0.0.1", "--node-ip", help="Address this node announces (default: Ray picks this machine's)."
    ),
) -> None:
    """Join this machine to a head as a node of GROUP and stay joined until Ctrl-C (the node leaves when it stops)."""
    from fedllm.appliance.cluster.node_process import run_node
    from fedllm.core.processes import stop_on_signals

    with cli_errors():
        settings = settings_from(ctx)
        stop = stop_on_signals()
        node = run_node(
            settings,
            head=head,
            token_file=token_file,
            group=group,
            labels=_parse_labels(label),
            gpus=gpus,
            cpus=cpus,
            slots=slots,
            name=name or socket.gethostname(),
            stop=stop,
            node_ip=node_ip,
        )
        console.print(f"node {node} left the cluster", highlight=False)


@node_app.command("ls")
@needs("cluster", for_what="`appliance node ls`")
def node_ls(ctx: typer.Context, as_json: bool = typer.Option(False, "--json", help="Print JSON.")) -> None:
    """List nodes by group with total and free CPU, GPU, slot and memory (GiB), alive or not."""
    from fedllm.appliance.cluster.head import connect
    from fedllm.appliance.cluster.nodes import list_nodes

    with cli_errors():
        nodes = list_nodes(connect(settings_from(ctx)).api)
        if as_json:
            print(json.dumps([n.as_json() for n in nodes], indent=2))
            return
        console.print(
            f"{'GROUP':<10} {'NODE':<14} {'STATE':<6} {'CPU free/total':<15} {'GPU':<9} {'slot':<9} "
            f"{'mem GiB':<13} LABELS",
            highlight=False,
        )
        for n in nodes:
            pair = lambda k: f"{n.free.get(k, 0):g}/{n.total.get(k, 0):g}"  # noqa: E731
            labels = ",".join(f"{k}={v}" for k, v in n.labels.items() if k != "group")
            console.print(
                f"{n.group:<10} {n.node_id[:12]:<14} {'alive' if n.alive else 'dead':<6} {pair('CPU'):<15} "
                f"{pair('GPU'):<9} {pair('slot'):<9} {pair('memory_gb'):<13} {labels}{' (head)' if n.is_head else ''}",
                highlight=False,
                soft_wrap=True,
            )


def _drain(ctx: typer.Context, node_id: str, remove: bool) -> None:
    from fedllm.appliance.cluster.head import connect
    from fedllm.appliance.cluster.nodes import drain_node, find_node, list_nodes
    from fedllm.appliance.cluster.ray_env import token_path

    with cli_errors():
        settings = settings_from(ctx)
        node = find_node(list_nodes(connect(settings).api), node_id)
        address = settings.cluster.address or f"127.0.0.1:{settings.cluster.port}"
        drain_node(address, token_path(settings.keys_dir), node.node_id, remove=remove)
        console.print(
            f"node {node.node_id[:12]} (group {node.group}) "
            f"{'removed' if remove else 'drained: no new job lands there; it leaves once idle'}",
            highlight=False,
        )


@node_app.command("drain")
@needs("cluster", for_what="`appliance node drain`")
def node_drain(ctx: typer.Context, node_id: str = typer.Argument(..., help="Node id (or a unique prefix).")) -> None:
    """Drain a node: no new job lands there, and Ray takes it out of the cluster once what it runs has ended."""
    _drain(ctx, node_id, remove=False)


@node_app.command("remove")
@needs("cluster", for_what="`appliance node remove`")
def node_remove(ctx: typer.Context, node_id: str = typer.Argument(..., help="Node id (or a unique prefix).")) -> None:
    """Take an idle node out of the cluster now (Ray refuses while it runs work: drain it instead)."""
    _drain(ctx, node_id, remove=True)


def _scheduler(ctx: typer.Context):
    from fedllm.appliance.cluster.head import connect

    return connect(settings_from(ctx))


@job_app.command("submit", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
@needs("cluster", for_what="`appliance job submit`")
def job_submit(
    ctx: typer.Context,
    group: Optional[str] = typer.Option(
        None, "--group", help="Device group to run on (default: cluster.group, the head's)."
    ),
    cpus: float = typer.Option(
        1.0, "--cpus", help="CPUs for the job; its compute threads follow (OMP/MKL/torch), cores pinned where allowed."
    ),
    gpus: float = typer.Option(0.0, "--gpus", help="GPUs for the job (Ray sets CUDA_VISIBLE_DEVICES)."),
    slots: float = typer.Option(0.0, "--slots", help="Slots for the job (GPU stand-ins of CPU-only nodes)."),
    memory: Optional[float] = typer.Option(None, "--memory", help="Memory to reserve, in GiB."),
    name: Optional[str] = typer.Option(None, "--name", help="Job id (default: job-XXXXXXXX)."),
    retries: int = typer.Option(
        0, "--retries", help="Run it again on another node of the group this many times if its node dies."
    ),
    program: bool = typer.Option(False, "--program", help="COMMAND is any program, not an appliance command."),
) -> None:
    """Queue `-- COMMAND ...` (an appliance command, e.g. `-- train --data d.jsonl --max-steps 20`) on a group.

    Data paths in COMMAND are paths on the node that runs it (a silo's data never travels). Refused at once when no
    node of the group could hold the job; otherwise it waits (PENDING, with the reason) until resources free up.
    """
    from fedllm.appliance.cluster.group_resources import Resources
    from fedllm.appliance.cluster.jobs import JobRequest

    with cli_errors():
        settings = settings_from(ctx)
        req = JobRequest(
            command=list(ctx.args),
            group=group or settings.cluster.group,
            name=name,
            retries=retries,
            program=program,
            resources=Resources(cpus=cpus, gpus=gpus, slots=slots, memory_gb=memory),
        )
        rec = _scheduler(ctx).submit(req)
        console.print(
            f"job {rec.job_id} {rec.state} on group {rec.group}{': ' + rec.reason if rec.reason else ''}",
            highlight=False,
            soft_wrap=True,
        )


def _age(seconds: float) -> str:
    return (
        f"{seconds:.0f}s" if seconds < 120 else f"{seconds / 60:.0f}m" if seconds < 7200 else f"{seconds / 3600:.0f}h"
    )


@job_app.command("ls")
@needs("cluster", for_what="`appliance job ls`")
def job_ls(ctx: typer.Context, as_json: bool = typer.Option(False, "--json", help="Print JSON.")) -> None:
    """List jobs, newest last: state, group, node, age and (for waiting or failed jobs) the reason."""
    from fedllm.appliance.cluster.jobs import view

    with cli_errors():
        sched = _scheduler(ctx)
        sched.reconcile()
        views = [view(r) for r in sched.store.all()]
        if as_json:
            print(json.dumps([v.as_json() for v in views], indent=2))
            return
        console.print(
            f"{'JOB':<18} {'STATE':<10} {'GROUP':<10} {'NODE':<14} {'AGE':<6} REASON / COMMAND", highlight=False
        )
        for v in views:
            console.print(
                f"{v.job_id:<18} {v.state:<10} {v.group:<10} {(v.node_id or '-')[:12]:<14} {_age(v.age_s):<6} "
                f"{v.reason or v.command}",
                highlight=False,
                soft_wrap=True,
            )


@job_app.command("show")
@needs("cluster", for_what="`appliance job show`")
def job_show(
    ctx: typer.Context,
    job_id: str = typer.Argument(..., help="Job id (or a unique prefix)."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """One job: state and reason, node, attempts and node failures, and for a training job its run and adapter."""
    from fedllm.appliance.cluster.jobs import view

    with cli_errors():
        sched = _scheduler(ctx)
        rec = sched.reconcile_one(job_id)
        v = view(rec, sched.logs(rec.job_id) if rec.attempts else None)
        if as_json:
            print(json.dumps(v.as_json(), indent=2))
            return
        for key, value in v.as_json().items():
            if value not in (None, [], ""):
                console.print(f"{key:<14} {value}", highlight=False, soft_wrap=True)


@job_app.command("logs")
@needs("cluster", for_what="`appliance job logs`")
def job_logs(
    ctx: typer.Context,
    job_id: str = typer.Argument(..., help="Job id (or a unique prefix)."),
    follow: bool = typer.Option(False, "--follow", "-f", help="Keep printing until the job ends."),
) -> None:
    """Print a job's output (every attempt); with -f, stream it live."""
    import sys

    with cli_errors():
        sched = _scheduler(ctx)
        if follow:
            for chunk in sched.follow(job_id):
                sys.stdout.write(chunk)
                sys.stdout.flush()
            return
        sys.stdout.write(sched.logs(sched.reconcile_one(job_id).job_id))


@job_app.command("stop")
@needs("cluster", for_what="`appliance job stop`")
def job_stop(
    ctx: typer.Context,
    job_id: str = typer.Argument(..., help="Job id (or a unique prefix)."),
    wait_s: float = typer.Option(30.0, "--wait-s", help="Seconds to wait for the job to end."),
) -> None:
    """Stop a job: its whole process tree ends (SIGTERM, then SIGKILL); a queued job never starts."""
    from fedllm.appliance.cluster.jobs import FINAL

    with cli_errors():
        sched = _scheduler(ctx)
        rec = sched.stop(job_id)
        deadline = time.monotonic() + wait_s
        while rec.state not in FINAL and time.monotonic() < deadline:
            time.sleep(0.5)
            rec = sched.reconcile_one(rec.job_id)
        console.print(f"job {rec.job_id} {rec.state}", highlight=False)
        if rec.state not in FINAL:
            err_console.print(f"job {rec.job_id} has not ended after {wait_s:g} s")
            raise typer.Exit(code=1)


def register(app: typer.Typer) -> None:
    """Add this module's commands to the `appliance` CLI."""
    app.add_typer(node_app, name="node")
    app.add_typer(job_app, name="job")
    app.add_typer(cluster_app, name="cluster")
