"""This machine as a node of a head: `ray start --address HEAD --block` with the token, in its group, until stopped."""

from __future__ import annotations

import logging
import threading
from pathlib import Path

from fedllm.appliance.cluster.head import node_env
from fedllm.appliance.cluster.nodes import node_start_argv
from fedllm.appliance.cluster.ray_env import read_token, spare_port
from fedllm.core.errors import ApplianceError, ConfigError
from fedllm.core.processes import log_tail, start_process_group, stop_process_group

log = logging.getLogger(__name__)


def run_node(
    settings,
    *,
    head: str,
    token_file: Path,
    group: str,
    labels: dict[str, str],
    gpus: int | None,
    cpus: int | None,
    slots: int,
    name: str,
    stop: threading.Event,
    node_ip: str = "127.0.0.1",
) -> str:
    """Join `head` as node `name` of `group` and stay joined until `stop` is set; returns `name`.

    `node_ip` is the address the node announces (Ray turns 127.0.0.1 into this machine's address); nodes sharing a
    machine in a test each take their own loopback address (127.0.0.2, ...), as Ray finds a node's agent by address.

    Raises:
        ConfigError: the token file is unreadable or empty, or `head` is not HOST:PORT.
        ApplianceError: Ray refused the node (a wrong token is named) or the node process exited.
    """
    host, sep, port = head.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ConfigError(f"--head {head!r} must be HOST:PORT (the head's cluster.port, 6380 by default)")
    read_token(token_file)  # fail early, naming the file
    log_path = settings.logs_dir / f"ray-node-{name}.log"
    # Nodes sharing a machine each need their own dashboard agent port (job logs are read through it).
    ports = {"dashboard-agent-listen-port": spare_port()}
    argv = node_start_argv(
        head=head,
        group=group,
        labels={"node": name, **labels},
        cpus=cpus,
        gpus=gpus,
        slots=slots,
        temp_dir=settings.cluster.temp_dir,
        ports=ports,
        node_ip=node_ip,
    )
    proc = start_process_group(argv, log_path, node_env(token_file, group, name))
    try:
        while not stop.wait(0.5):
            if proc.poll() is not None:
                tail = log_tail(log_path)
                if "InvalidAuthToken" in tail or "AuthenticationError" in tail:
                    raise ApplianceError(
                        f"the head at {head} refused this node's token ({token_file}); copy the head's "
                        f"keys/ray_token. Last lines of {log_path}:\n{tail}"
                    )
                raise ApplianceError(f"the node exited with code {proc.returncode}. Last lines of {log_path}:\n{tail}")
        return name
    finally:
        stop_process_group(proc, timeout_s=5.0)
