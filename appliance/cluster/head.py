"""The cluster's head on this machine: `ray start --head` with token authentication, its dashboard (the job API) on
loopback only, the head node in its own group; and, while it runs, the job queue's reconcile loop.

Also `connect(settings)`: the scheduler for the head named by the settings, for every `job` and `node` command.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from pathlib import Path

from fedllm.appliance.cluster.head_api import HeadAPI, HeadUnavailable
from fedllm.appliance.cluster.jobs import JobStore
from fedllm.appliance.cluster.nodes import node_start_argv
from fedllm.appliance.cluster.ray_env import TOKEN_NAME, ray_env, read_token, token_path
from fedllm.appliance.cluster.scheduler import JobScheduler
from fedllm.core.errors import ApplianceError, ConfigError
from fedllm.core.processes import log_tail, start_process_group, stop_process_group

log = logging.getLogger(__name__)


def head_argv(settings) -> list[str]:
    """The head's `ray start --head --block` command line for `settings.cluster`."""
    c = settings.cluster
    ports = {
        "port": c.port,
        "dashboard-host": "127.0.0.1",
        "dashboard-port": c.dashboard_port,
        "ray-client-server-port": c.client_server_port,
        "dashboard-agent-listen-port": c.agent_port,
    }
    return node_start_argv(
        head=None,
        group=c.group,
        labels={"node": "head"},
        cpus=c.num_cpus if c.num_cpus is not None else os.cpu_count(),
        gpus=c.num_gpus,
        slots=c.slots,
        temp_dir=c.temp_dir,
        ports=ports,
        node_ip=c.host,
    ) + ["--include-dashboard", "true"]


def node_env(token_file: Path, group: str, name: str) -> dict[str, str]:
    """The environment of a node's Ray processes: the token, and what its jobs read to say where they ran."""
    return {
        **ray_env(token_file),
        "APPLIANCE_NODE_GROUP": group,
        "APPLIANCE_NODE_NAME": name,
        "APPLIANCE_PYTHON": sys.executable,
    }


def connect(settings, token_file: Path | None = None) -> JobScheduler:
    """The scheduler of the head named by `settings.cluster` (this machine's head unless `dashboard_url` says other)."""
    c = settings.cluster
    token_file = token_file or settings.keys_dir / TOKEN_NAME
    if not Path(token_file).exists():
        raise ConfigError(
            f"no cluster token at {token_file}: the head makes it when it starts (`appliance up`, or "
            "`appliance cluster head`); on another machine copy the head's keys/ray_token there"
        )
    token = read_token(token_file)
    home = c.shared_home or settings.home
    # Ray's job supervisor reads the grace period from the job's environment (SIGTERM, then SIGKILL after it).
    env = {"APPLIANCE_HOME": str(home), "RAY_JOB_STOP_WAIT_TIME_S": str(c.stop_grace_s)}
    return JobScheduler(HeadAPI(c.job_api_url(), token), JobStore(settings.jobs_dir), c.max_jobs, env)


def wait_ready(api: HeadAPI, timeout_s: float, alive=lambda: True, log_path: Path | None = None) -> float:
    """Seconds until the head's job API answered with the token.

    Raises:
        ApplianceError: the head exited, or did not answer within `timeout_s` (the end of its log is in the message).
    """
    t0 = time.monotonic()
    while not api.ready():
        if not alive():
            raise ApplianceError(f"the Ray head exited while starting. Last lines of {log_path}:\n{log_tail(log_path)}")
        if time.monotonic() - t0 > timeout_s:
            raise ApplianceError(
                f"the Ray head's job API did not answer at {api.base_url} within {timeout_s:.0f} s. "
                f"Last lines of {log_path}:\n{log_tail(log_path)}"
            )
        time.sleep(0.25)
    return time.monotonic() - t0


def run_head(settings, stop: threading.Event) -> None:
    """Run the head until `stop` is set: start Ray, wait for its job API, then reconcile the job queue every
    `cluster.reconcile_interval_s`; stop every Ray process of the head on the way out.

    Raises:
        ConfigError: `cluster.address` names another head (this machine runs none then).
        ApplianceError: Ray did not start.
    """
    c = settings.cluster
    if c.address:
        raise ConfigError(f"cluster.address is set ({c.address}): the head runs there, not here")
    token_file = token_path(settings.keys_dir)
    log_path = settings.logs_dir / "ray-head.log"
    proc = start_process_group(head_argv(settings), log_path, node_env(token_file, c.group, "head"))
    try:
        sched = connect(settings, token_file)
        took = wait_ready(sched.api, c.start_timeout_s, lambda: proc.poll() is None, log_path)
        log.info("Ray head ready in %.1f s; job API at %s", took, c.job_api_url())
        while not stop.wait(c.reconcile_interval_s):
            if proc.poll() is not None:
                raise ApplianceError(
                    f"the Ray head exited with code {proc.returncode}. Last lines of {log_path}:\n{log_tail(log_path)}"
                )
            try:
                sched.reconcile()
            except HeadUnavailable as exc:
                log.warning("reconcile skipped: %s", exc)
    finally:
        stop_process_group(proc, timeout_s=5.0)
