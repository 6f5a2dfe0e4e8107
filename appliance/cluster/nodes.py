"""Nodes of the cluster: how a machine joins a group (`ray start` with the token, a group label and resources), what
each node has and has free, and draining or removing one."""

from __future__ import annotations

import json
import re
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedllm.appliance.cluster.head_api import HeadAPI
from fedllm.appliance.cluster.ray_env import ray_env, ray_executable
from fedllm.core.errors import ApplianceError, ConfigError

GROUP_LABEL = "group"
SLOT = "slot"  # the custom resource that stands for a GPU on CPU-only machines
_LABEL_RE = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9._-]{0,61}[A-Za-z0-9])?$")
GIB = 2**30


@dataclass(frozen=True)
class NodeView:
    """One node as `appliance node ls` shows it. Resources are Ray's: CPU, GPU, slot, memory (GiB)."""

    node_id: str
    group: str
    alive: bool
    is_head: bool
    ip: str
    labels: dict[str, str] = field(default_factory=dict)
    total: dict[str, float] = field(default_factory=dict)
    free: dict[str, float] = field(default_factory=dict)

    def as_json(self) -> dict[str, Any]:
        return {
            "node_id": self.node_id,
            "group": self.group,
            "alive": self.alive,
            "is_head": self.is_head,
            "ip": self.ip,
            "labels": self.labels,
            "total": self.total,
            "free": self.free,
        }


def check_label(what: str, value: str) -> str:
    """`value` if it is a valid Ray label value (letters, digits, `.-_`, at most 63), else ConfigError naming `what`."""
    if not _LABEL_RE.match(value):
        raise ConfigError(
            f"{what} {value!r} is not valid: use letters, digits, '.', '-' or '_' (at most 63, starting "
            "and ending with a letter or digit)"
        )
    return value


def _shown(resources: dict[str, float]) -> dict[str, float]:
    out = {
        "CPU": resources.get("CPU", 0.0),
        "GPU": resources.get("GPU", 0.0),
        SLOT: resources.get(SLOT, 0.0),
        "memory_gb": round(resources.get("memory", 0.0) / GIB, 2),
    }
    return {k: float(v) for k, v in out.items()}


def list_nodes(api: HeadAPI) -> list[NodeView]:
    """Every node Ray knows (dead ones too), by group then id, with total and free CPUs, GPUs, slots and memory."""
    usage = api.usage_by_node()
    views = []
    for rec in api.node_records():
        labels = {k: v for k, v in (rec.get("labels") or {}).items() if not k.startswith("ray.io/")}
        total = _shown(rec.get("resources_total") or {})
        alive = rec.get("state") == "ALIVE"
        used = {r: u for r, (u, _t) in usage.get(rec["node_id"], {}).items()}
        free = {
            k: (round(v - (used.get("memory", 0.0) / GIB), 2) if k == "memory_gb" else v - used.get(k, 0.0))
            for k, v in total.items()
        }
        views.append(
            NodeView(
                node_id=rec["node_id"],
                group=labels.get(GROUP_LABEL, "?"),
                alive=alive,
                is_head=bool(rec.get("is_head_node")),
                ip=rec.get("node_ip", ""),
                labels=labels,
                total=total,
                free=free if alive else {k: 0.0 for k in total},
            )
        )
    return sorted(views, key=lambda n: (n.group, not n.alive, n.node_id))


def find_node(nodes: list[NodeView], prefix: str) -> NodeView:
    """The node whose id starts with `prefix`.

    Raises:
        ConfigError: no node or several nodes match.
    """
    hits = [n for n in nodes if n.node_id.startswith(prefix)]
    if len(hits) != 1:
        known = ", ".join(n.node_id[:12] for n in nodes) or "none"
        raise ConfigError(
            f"{'no' if not hits else 'more than one'} node id starts with {prefix!r}; known nodes: {known}"
        )
    return hits[0]


def node_start_argv(
    *,
    head: str | None,
    group: str,
    labels: dict[str, str],
    cpus: int | None,
    gpus: int | None,
    slots: int,
    temp_dir: Path,
    ports: dict[str, int],
    node_ip: str = "127.0.0.1",
) -> list[str]:
    """The `ray start --block` command line of a node (the head when `head` is None) in `group`.

    `ports` maps `ray start` port options (`port`, `dashboard-port`, `dashboard-agent-listen-port`, ...) to values;
    nodes sharing a machine need their own agent ports. The token comes from the environment (`ray_env`).
    """
    check_label("group", group)
    all_labels = {**labels, GROUP_LABEL: group}
    for k, v in all_labels.items():
        check_label(f"label {k}=", v)
    argv = [
        ray_executable(),
        "start",
        "--block",
        "--disable-usage-stats",
        "--node-ip-address",
        node_ip,
        "--temp-dir",
        str(temp_dir),
        "--labels",
        ",".join(f"{k}={v}" for k, v in sorted(all_labels.items())),
    ]
    argv += ["--head"] if head is None else ["--address", head]
    if cpus is not None:
        argv += ["--num-cpus", str(cpus)]
    if gpus is not None:
        argv += ["--num-gpus", str(gpus)]
    if slots:
        argv += ["--resources", json.dumps({SLOT: slots})]
    for option, port in ports.items():
        argv += [f"--{option}", str(port)]
    return argv


def drain_node(head_address: str, token_file: Path, node_id: str, *, remove: bool) -> None:
    """Ask Ray's GCS to drain `node_id`: no new work lands there and Ray takes the node out once idle (drain), or
    takes it out now (remove; refused while it runs work).

    Raises:
        ApplianceError: Ray refused the request (its reason is in the message).
    """
    reason = "DRAIN_NODE_REASON_IDLE_TERMINATION" if remove else "DRAIN_NODE_REASON_PREEMPTION"
    argv = [
        ray_executable(),
        "drain-node",
        "--address",
        head_address,
        "--node-id",
        node_id,
        "--reason",
        reason,
        "--reason-message",
        "removed by `appliance node remove`" if remove else "drained by `appliance node drain`",
    ]
    if remove:
        argv += ["--deadline-remaining-seconds", "0"]
    done = subprocess.run(argv, env=ray_env(token_file), capture_output=True, text=True, timeout=60)
    if done.returncode != 0:
        tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
        raise ApplianceError(f"Ray did not accept to {'remove' if remove else 'drain'} node {node_id[:12]}: {tail[0]}")
