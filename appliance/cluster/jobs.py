"""Jobs as the appliance records them: the request, its attempts (one Ray job each), and the view `job ls|show` print.

A record lives in `APPLIANCE_HOME/jobs/ID.json` on the head. Ray holds the attempts' states, logs and nodes; the
record adds what Ray does not know: the group queue, retries after a node died, and the final outcome.
"""

from __future__ import annotations

import json
import re
import secrets
import shlex
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from fedllm.appliance.cluster.group_resources import Resources
from fedllm.appliance.cluster.nodes import check_label
from fedllm.core.atomic import write_json_atomic
from fedllm.core.errors import ConfigError

QUEUED = "QUEUED"  # held by the appliance (group limit, or behind an earlier job of its group); not yet given to Ray
ACTIVE = ("PENDING", "RUNNING")
FINAL = ("SUCCEEDED", "FAILED", "STOPPED")
_RUN_RE = re.compile(r"^run (\S+?):", re.M)
_ADAPTER_RE = re.compile(r"^registered adapter (\S+)", re.M)


@dataclass(frozen=True)
class JobRequest:
    """What `appliance job submit` asks for: a command on a group, with resources and retries.

    `command` is an appliance command (`["train", "--data", ...]`) unless `program`, then any program.
    """

    command: list[str]
    group: str
    resources: Resources = field(default_factory=Resources)
    name: str | None = None
    retries: int = 0
    program: bool = False

    def __post_init__(self) -> None:
        if not self.command:
            raise ConfigError("a job needs a command after `--` (an appliance command such as `train --data FILE`)")
        if self.retries < 0:
            raise ConfigError(f"--retries must be 0 or more, got {self.retries}")
        check_label("group", self.group)
        if self.name is not None:
            check_label("job name", self.name)


@dataclass
class Attempt:
    """One Ray job of a record."""

    submission_id: str
    submitted_at: float
    status: str = "PENDING"
    node_id: str | None = None
    message: str = ""
    started_at: float | None = None
    ended_at: float | None = None
    supervisor_died_at: float | None = (
        None  # when Ray first said the attempt's supervisor died (its node's fate unknown)
    )


@dataclass
class JobRecord:
    """A job as stored on the head. `state` is QUEUED, a Ray status of the last attempt, or the final outcome."""

    job_id: str
    group: str
    command: list[str]
    program: bool
    resources: dict[str, Any]
    retries: int
    created_at: float
    env: dict[str, str] = field(default_factory=dict)
    state: str = QUEUED
    reason: str = ""
    attempts: list[Attempt] = field(default_factory=list)
    node_failures: list[str] = field(default_factory=list)
    stop_requested: bool = False

    @property
    def need(self) -> Resources:
        return Resources(**self.resources)

    @property
    def final(self) -> bool:
        return self.state in FINAL

    def entrypoint(self) -> str:
        """The shell command Ray runs: the launcher (threads, cores, where it runs), then the job's command."""
        flags = f"--cpus {self.need.cpus:g}" + (" --program" if self.program else "")
        return (
            f'"${{APPLIANCE_PYTHON:-python3}}" -m fedllm.appliance.cluster.launch {flags} -- {shlex.join(self.command)}'
        )

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "JobRecord":
        data = dict(data)
        data["attempts"] = [Attempt(**a) for a in data.get("attempts", [])]
        return cls(**data)


def new_record(req: JobRequest, env: dict[str, str], existing: set[str]) -> JobRecord:
    """A QUEUED record for `req` with a fresh id (its name, when given).

    Raises:
        ConfigError: the name is taken by another job.
    """
    job_id = req.name or f"job-{secrets.token_hex(4)}"
    if job_id in existing:
        raise ConfigError(f"a job named {job_id!r} exists already; choose another --name")
    return JobRecord(
        job_id=job_id,
        group=req.group,
        command=list(req.command),
        program=req.program,
        resources=asdict(req.resources),
        retries=req.retries,
        created_at=time.time(),
        env=env,
    )


class JobStore:
    """The records under one folder (mode 0700), one JSON file per job."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)

    def path(self, job_id: str) -> Path:
        return self.folder / f"{job_id}.json"

    def save(self, rec: JobRecord) -> None:
        self.folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        write_json_atomic(self.path(rec.job_id), rec.to_json())

    def all(self) -> list[JobRecord]:
        """Every record, oldest first."""
        if not self.folder.is_dir():
            return []
        recs = [JobRecord.from_json(json.loads(p.read_text(encoding="utf-8"))) for p in self.folder.glob("*.json")]
        return sorted(recs, key=lambda r: (r.created_at, r.job_id))

    def get(self, job_id: str) -> JobRecord:
        """The record of `job_id` (or of the one job whose id starts with it).

        Raises:
            ConfigError: no job or several jobs match.
        """
        if self.path(job_id).exists():
            return JobRecord.from_json(json.loads(self.path(job_id).read_text(encoding="utf-8")))
        hits = [r for r in self.all() if r.job_id.startswith(job_id)]
        if len(hits) != 1:
            raise ConfigError(f"{'no' if not hits else 'more than one'} job matches {job_id!r}; see `appliance job ls`")
        return hits[0]


@dataclass(frozen=True)
class JobView:
    """A job as `appliance job ls|show` print it."""

    job_id: str
    group: str
    state: str
    reason: str
    node_id: str | None
    attempts: int
    created_at: float
    started_at: float | None
    ended_at: float | None
    command: str
    resources: dict[str, Any]
    node_failures: list[str]
    run: str | None = None
    adapter: str | None = None

    @property
    def age_s(self) -> float:
        return time.time() - self.created_at

    def as_json(self) -> dict[str, Any]:
        return {**asdict(self), "age_s": round(self.age_s, 1)}


def view(rec: JobRecord, log_text: str | None = None) -> JobView:
    """What to show of `rec`; with the job's log, also the training run and adapter it produced."""
    last = rec.attempts[-1] if rec.attempts else None
    runs = _RUN_RE.findall(log_text or "")
    adapters = _ADAPTER_RE.findall(log_text or "")
    return JobView(
        job_id=rec.job_id,
        group=rec.group,
        state=rec.state,
        reason=rec.reason,
        node_id=last.node_id if last else None,
        attempts=len(rec.attempts),
        created_at=rec.created_at,
        started_at=last.started_at if last else None,
        ended_at=last.ended_at if last else None,
        command=shlex.join(rec.command),
        resources=rec.resources,
        node_failures=list(rec.node_failures),
        run=runs[-1] if runs else None,
        adapter=adapters[-1] if adapters else None,
    )
