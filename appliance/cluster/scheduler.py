"""The appliance's side of job scheduling over Ray: submit, the group queue, retries after a node died, stop, logs.

Ray places each attempt (resources, the group's label selector) and holds it PENDING while its group is full. The
appliance gives Ray at most one pending job per group, in submission order, and none beyond the group's limit of
concurrent jobs, so jobs of a group start in the order they were submitted. `reconcile` moves the queue on; the head
process calls it every few seconds, and every `job` command calls it once.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import time
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

from fedllm.appliance.cluster.group_resources import check_fits, pending_reason
from fedllm.appliance.cluster.head_api import HeadAPI
from fedllm.appliance.cluster.jobs import ACTIVE, FINAL, QUEUED, Attempt, JobRecord, JobRequest, JobStore, new_record
from fedllm.appliance.cluster.nodes import NodeView, list_nodes
from fedllm.core.errors import ConfigError

log = logging.getLogger(__name__)

AGENT_WAIT_S = 30.0  # how long a submit waits for the job agent of a head that has just started
SUPERVISOR_DIED_GRACE_S = 60.0  # how long a failed attempt whose supervisor died waits to learn its node died


class JobScheduler:
    """Submits, tracks and stops the appliance's jobs on one head.

    Args:
        api: the head's HTTP API.
        store: where the records live (the head's `jobs/`).
        max_jobs: group -> concurrent jobs allowed (None: as many as fit).
        job_env: variables every job gets (APPLIANCE_HOME of the shared storage, ...).
    """

    def __init__(self, api: HeadAPI, store: JobStore, max_jobs: Callable[[str], int | None], job_env: dict[str, str]):
        self.api = api
        self.store = store
        self.max_jobs = max_jobs
        self.job_env = job_env

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """One reconciler at a time (the head's loop and a CLI command may run together)."""
        self.store.folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        with open(self.store.folder / ".lock", "w") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            yield

    def submit(self, req: JobRequest) -> JobRecord:
        """Record `req` and hand it to Ray as soon as its group's queue allows (now, when nothing is ahead).

        Raises:
            ConfigError: the group has no live node or none that could hold the job (capacity named), or the name
                is taken.
            HeadUnavailable: the head does not answer.
        """
        check_fits(req.resources, req.group, list_nodes(self.api))
        with self._locked():
            rec = new_record(req, {**self.job_env}, {r.job_id for r in self.store.all()})
            self.store.save(rec)
            self._reconcile()
        return self.store.get(rec.job_id)

    def reconcile(self) -> list[JobRecord]:
        """Refresh every unfinished job from Ray, retry jobs whose node died, and start what the queues allow."""
        with self._locked():
            return self._reconcile()

    def _reconcile(self) -> list[JobRecord]:
        records = [r for r in self.store.all() if not r.final]
        if not records:
            return []
        nodes = list_nodes(self.api)
        dead = {n.node_id: n for n in nodes if not n.alive}
        for rec in records:
            if rec.attempts and rec.state != QUEUED:
                self._refresh(rec, dead)
        active = Counter(r.group for r in records if r.state in ACTIVE)
        pending = Counter(r.group for r in records if r.state == "PENDING")
        for rec in records:
            if rec.state != QUEUED:
                continue
            limit = self.max_jobs(rec.group)
            if rec.stop_requested:
                rec.state, rec.reason = "STOPPED", "stopped before it started"
            elif limit is not None and active[rec.group] >= limit:
                rec.reason = (
                    f"group {rec.group!r} runs {active[rec.group]} jobs, its limit (cluster.max_jobs_per_group)"
                )
            elif pending[rec.group]:
                rec.reason = f"behind an earlier job of group {rec.group!r} that waits for resources"
            else:
                self._start_attempt(rec)
                active[rec.group] += 1
                pending[rec.group] += 1
            self.store.save(rec)
        for rec in records:
            if rec.state == "PENDING":
                rec.reason = pending_reason(rec.need, rec.group, nodes)
                self.store.save(rec)
        return records

    def _start_attempt(self, rec: JobRecord) -> None:
        sid = f"{rec.job_id}-{len(rec.attempts) + 1}"
        env = {**rec.env, "APPLIANCE_JOB_ID": rec.job_id}
        deadline = time.monotonic() + AGENT_WAIT_S
        while True:
            try:
                self.api.jobs().submit_job(
                    entrypoint=rec.entrypoint(),
                    submission_id=sid,
                    runtime_env={"env_vars": env},
                    metadata={"appliance_job": rec.job_id, "group": rec.group},
                    **rec.need.ray_options(rec.group),
                )
                break
            except RuntimeError as exc:  # a head just started answers before its job agent is up
                if "agent" not in str(exc).lower() or time.monotonic() > deadline:
                    raise
                time.sleep(0.5)
        rec.attempts.append(Attempt(submission_id=sid, submitted_at=time.time()))
        rec.state, rec.reason = "PENDING", ""
        log.info("job %s: attempt %d submitted to group %s", rec.job_id, len(rec.attempts), rec.group)

    def _refresh(self, rec: JobRecord, dead: dict[str, NodeView]) -> None:
        """Bring `rec` up to date with its last attempt in Ray; a node death becomes a retry or a FAILED naming it."""
        att = rec.attempts[-1]
        info = self.api.jobs().get_job_info(att.submission_id)
        att.status = str(info.status.value if hasattr(info.status, "value") else info.status)
        att.node_id = info.driver_node_id or att.node_id
        att.message = info.message or ""
        att.started_at = (info.start_time / 1000) if info.start_time else att.started_at
        att.ended_at = (info.end_time / 1000) if info.end_time else att.ended_at
        node_died = att.node_id in dead and att.status in ("RUNNING", "FAILED")
        if not node_died and not rec.stop_requested and _supervisor_died(att, info):
            # Ray saw the job's supervisor die before it saw its node die (a killed node): a retry or a FAILED waits
            # until the node is known dead, for at most SUPERVISOR_DIED_GRACE_S.
            att.supervisor_died_at = att.supervisor_died_at or time.time()
            if time.time() - att.supervisor_died_at < SUPERVISOR_DIED_GRACE_S:
                rec.state = "RUNNING"
                rec.reason = f"its Ray supervisor died; waiting to learn whether node {str(att.node_id)[:12]} died"
                self.store.save(rec)
                return
        if node_died and not rec.stop_requested:
            if att.status == "RUNNING":  # Ray has not noticed yet; make sure the attempt is over before another
                with contextlib.suppress(RuntimeError):
                    self.api.jobs().stop_job(att.submission_id)
            node = dead[str(att.node_id)]  # a key of `dead`: node_died
            rec.node_failures.append(f"attempt {len(rec.attempts)}: node {node.node_id[:12]} (group {node.group}) died")
            att.status = "FAILED"
            if len(rec.node_failures) <= rec.retries:
                rec.state, rec.reason = (
                    QUEUED,
                    f"node {node.node_id[:12]} died; retry {len(rec.node_failures)} of {rec.retries}",
                )
                log.warning("job %s: node %s died; submitting it again", rec.job_id, node.node_id[:12])
            else:
                rec.state = "FAILED"
                rec.reason = f"node {node.node_id[:12]} (group {node.group}) died while the job ran" + (
                    f"; no retry left (--retries {rec.retries})" if rec.retries else ""
                )
        elif att.status in FINAL:
            rec.state = att.status
            rec.reason = (
                "stopped by `appliance job stop`" if rec.stop_requested and att.status == "STOPPED" else att.message
            )
        else:
            rec.state = att.status
            if att.status == "RUNNING":
                rec.reason = ""
        self.store.save(rec)

    def stop(self, job_id: str) -> JobRecord:
        """Stop a job: Ray ends its attempt's whole process group (SIGTERM, then SIGKILL); a queued job never starts."""
        with self._locked():
            rec = self.store.get(job_id)
            if rec.final:
                raise ConfigError(f"job {rec.job_id} has ended already ({rec.state})")
            rec.stop_requested = True
            if rec.attempts and rec.state in ACTIVE:
                self.api.jobs().stop_job(rec.attempts[-1].submission_id)
            self.store.save(rec)
            self._reconcile()
        return self.store.get(rec.job_id)

    def logs(self, job_id: str) -> str:
        """The output of every attempt of a job (headed by the attempt when there were several)."""
        rec = self.store.get(job_id)
        parts = []
        for i, att in enumerate(rec.attempts, 1):
            try:
                text = self.api.jobs().get_job_logs(att.submission_id)
            except RuntimeError as exc:  # the node that held the log is gone (it died), or Ray lost the job
                text = f"(the output of {att.submission_id} cannot be read: {str(exc).splitlines()[0][:200]})\n"
            parts.append(text if len(rec.attempts) == 1 else f"--- attempt {i} ({att.submission_id})\n{text}")
        return "".join(parts)

    def follow(self, job_id: str) -> Iterator[str]:
        """The last attempt's output as it comes, until the job ends (waits while the job is queued)."""
        import asyncio

        while True:
            rec = self.reconcile_one(job_id)
            if rec.attempts and rec.state != QUEUED:
                break
            if rec.final:
                return
            time.sleep(1.0)
        sid = rec.attempts[-1].submission_id
        queue: list[str] = []

        async def pump() -> None:
            async for chunk in self.api.jobs().tail_job_logs(sid):
                queue.append(chunk)

        loop = asyncio.new_event_loop()
        try:
            task = loop.create_task(pump())
            while not task.done():
                loop.run_until_complete(asyncio.wait([task], timeout=0.2))
                while queue:
                    yield queue.pop(0)
            while queue:
                yield queue.pop(0)
        finally:
            loop.close()

    def reconcile_one(self, job_id: str) -> JobRecord:
        self.reconcile()
        return self.store.get(job_id)


def _supervisor_died(att: Attempt, info: Any) -> bool:
    """Whether Ray failed the attempt because its supervisor actor died (as when its node is killed)."""
    error_type = getattr(info, "error_type", None)
    kind = str(getattr(error_type, "value", error_type) or "")
    return att.status == "FAILED" and (
        kind == "JOB_SUPERVISOR_ACTOR_DIED" or att.message.startswith("Job supervisor actor died")
    )
