"""What a job asks of its group, in Ray's terms, and what the group can give: the refusal at submit when no node of
the group could ever hold the job, and the reason a job waits."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from fedllm.appliance.cluster.nodes import GIB, GROUP_LABEL, SLOT, NodeView
from fedllm.core.errors import ConfigError


@dataclass(frozen=True)
class Resources:
    """What one job needs on one node: CPUs, GPUs, slots (GPU stand-ins on CPU-only machines) and memory in GiB."""

    cpus: float = 1.0
    gpus: float = 0.0
    slots: float = 0.0
    memory_gb: float | None = None

    def __post_init__(self) -> None:
        bad = [
            f"{k}={v}"
            for k, v in (
                ("cpus", self.cpus),
                ("gpus", self.gpus),
                ("slots", self.slots),
                ("memory_gb", self.memory_gb or 0.0),
            )
            if v < 0
        ]
        if bad:
            raise ConfigError(f"job resources cannot be negative: {', '.join(bad)}")

    def wanted(self) -> dict[str, float]:
        """The non-zero requests under the names `NodeView` uses (CPU, GPU, slot, memory_gb)."""
        out = {"CPU": self.cpus, "GPU": self.gpus, SLOT: self.slots, "memory_gb": self.memory_gb or 0.0}
        return {k: v for k, v in out.items() if v}

    def ray_options(self, group: str) -> dict[str, Any]:
        """`JobSubmissionClient.submit_job` keywords: entrypoint resources and the group's label selector."""
        opts: dict[str, Any] = {"entrypoint_num_cpus": self.cpus, "entrypoint_label_selector": {GROUP_LABEL: group}}
        if self.gpus:
            opts["entrypoint_num_gpus"] = self.gpus
        if self.slots:
            opts["entrypoint_resources"] = {SLOT: self.slots}
        if self.memory_gb:
            opts["entrypoint_memory"] = int(self.memory_gb * GIB)
        return opts


def describe(resources: dict[str, float]) -> str:
    """`{"CPU": 2, "slot": 1}` as "2 CPU, 1 slot" (memory as GiB)."""
    parts = []
    for k, v in resources.items():
        amount = f"{v:g}"
        parts.append(f"{amount} GiB memory" if k == "memory_gb" else f"{amount} {k}")
    return ", ".join(parts) or "nothing"


def check_fits(need: Resources, group: str, nodes: list[NodeView]) -> None:
    """Refuse a job that no live node of `group` could hold even when idle (a job runs on one node).

    Raises:
        ConfigError: the group has no live node, or the request exceeds every node of it; the message names the
            group's capacity per node.
    """
    live = [n for n in nodes if n.group == group and n.alive]
    if not live:
        groups = sorted({n.group for n in nodes if n.alive})
        raise ConfigError(
            f"group {group!r} has no live node; groups with live nodes: {', '.join(groups) or 'none'} "
            "(add one with `appliance node join --group NAME`)"
        )
    wanted = need.wanted()
    if any(all(n.total.get(k, 0.0) >= v for k, v in wanted.items()) for n in live):
        return
    capacity = "; ".join(f"node {n.node_id[:12]}: {describe({k: n.total.get(k, 0.0) for k in wanted})}" for n in live)
    raise ConfigError(
        f"the job asks {describe(wanted)} on one node, more than any node of group {group!r} has "
        f"(capacity per node: {capacity})"
    )


def pending_reason(need: Resources, group: str, nodes: list[NodeView]) -> str:
    """Why a job that Ray holds pending waits: what it asks, and what each live node of its group has free now."""
    wanted = need.wanted()
    live = [n for n in nodes if n.group == group and n.alive]
    if any(all(n.free.get(k, 0.0) >= v for k, v in wanted.items()) for n in live):
        return f"starting: a node of group {group!r} has {describe(wanted)} free"
    free = "; ".join(
        f"node {n.node_id[:12]} has {describe({k: n.free.get(k, 0.0) for k in wanted})} free" for n in live
    )
    return f"waiting for {describe(wanted)} in group {group!r}: {free or 'no live node'}"
