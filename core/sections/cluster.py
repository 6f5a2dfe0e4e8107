"""Settings of the appliance's Ray cluster: the head `appliance up` starts, its nodes' groups, and job limits."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, model_validator

from fedllm.core.sections.base import Section


class ClusterSettings(Section):
    """The Ray head (started by `appliance up` unless `address` names one), device groups and job scheduling."""

    enabled: bool = Field(
        True, description="`appliance up` starts (or connects to) a Ray head so `appliance job submit` works."
    )
    address: str | None = Field(
        None,
        description=(
            "HOST:PORT of an existing Ray head to use instead of starting one (its dashboard_url must be set too)."
        ),
    )
    dashboard_url: str | None = Field(
        None, description="Job API (Ray dashboard) base URL of the head; None = http://127.0.0.1:<dashboard_port>."
    )
    host: str = Field(
        "127.0.0.1",
        description=(
            "Address the head announces to nodes (Ray replaces 127.0.0.1 by this machine's address on Linux; "
            "nodes beyond it need a routable one)."
        ),
    )
    port: int = Field(
        6380,
        ge=1,
        le=65535,
        description="Port of the head's GCS, the address nodes join (keep it outside Ray's worker ports 10002-19999).",
    )
    dashboard_port: int = Field(
        8265, ge=1, le=65535, description="Port of the head's dashboard/job API; always bound to 127.0.0.1."
    )
    client_server_port: int = Field(
        6382, ge=1, le=65535, description="Port of the head's Ray client server (Ray always starts one)."
    )
    agent_port: int = Field(
        6383, ge=1, le=65535, description="Port of the head's dashboard agent (job logs are read through it)."
    )
    group: str = Field(
        "local", min_length=1, description="Device group of the head node; jobs without --group go here."
    )
    num_cpus: int | None = Field(None, ge=0, description="CPUs the head offers to jobs; None = all of this machine's.")
    num_gpus: int | None = Field(None, ge=0, description="GPUs the head offers to jobs; None = what Ray detects.")
    slots: int = Field(
        0, ge=0, description="`slot` resources of the head (on CPU-only machines a slot stands for a GPU)."
    )
    max_jobs_per_group: dict[str, int] = Field(
        default_factory=dict,
        description="Concurrent jobs allowed per group (group -> limit); groups not named use default_max_jobs.",
    )
    default_max_jobs: int | None = Field(
        None,
        ge=1,
        description="Concurrent jobs allowed in a group not named in max_jobs_per_group; None = as many as fit.",
    )
    shared_home: Path | None = Field(
        None,
        description="APPLIANCE_HOME given to jobs (shared storage seen by every node); None = this appliance's home.",
    )
    temp_dir: Path = Field(
        Path("/tmp/appliance-ray"),
        description=(
            "Ray's session folder, the same path on every node (Ray's agents assume so); short, as Ray's unix "
            "sockets live in it."
        ),
    )
    start_timeout_s: float = Field(90.0, gt=0, description="Seconds `appliance up` waits for the head's job API.")
    stop_grace_s: int = Field(
        45,
        ge=1,
        description=(
            "Seconds a stopped job has between SIGTERM and SIGKILL (a `worker join` job drains its requests in "
            "it; keep it above its --drain-s)."
        ),
    )
    reconcile_interval_s: float = Field(
        2.0, gt=0, description="Seconds between the head's passes over queued and retried jobs."
    )

    @model_validator(mode="after")
    def _limits_positive(self) -> "ClusterSettings":
        bad = [f"{g}={n}" for g, n in self.max_jobs_per_group.items() if n < 1]
        if bad:
            raise ValueError(f"cluster.max_jobs_per_group must be at least 1 per group, found {', '.join(bad)}")
        return self

    def max_jobs(self, group: str) -> int | None:
        """Concurrent jobs allowed in `group` (None: no limit beyond its resources)."""
        return self.max_jobs_per_group.get(group, self.default_max_jobs)

    def job_api_url(self) -> str:
        """Base URL of the head's job API."""
        return (self.dashboard_url or f"http://127.0.0.1:{self.dashboard_port}").rstrip("/")
