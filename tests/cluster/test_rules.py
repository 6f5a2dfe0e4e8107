"""The cluster's rules without a cluster: what a job asks of Ray, refusals that name the group's capacity, the
launcher's threads and cores, records and settings."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from fedllm.appliance.cluster.group_resources import Resources, check_fits, pending_reason
from fedllm.appliance.cluster.jobs import JobRecord, JobRequest, new_record, view
from fedllm.appliance.cluster.nodes import NodeView, node_start_argv
from fedllm.core.errors import ConfigError
from fedllm.testing.factories import REPO, make_settings


def _node(group: str, cpu: float, slot: float, free_slot: float | None = None, alive: bool = True, nid: str = "n" * 20) -> NodeView:
    return NodeView(node_id=nid, group=group, alive=alive, is_head=False, ip="127.0.0.2",
                    total={"CPU": cpu, "GPU": 0.0, "slot": slot, "memory_gb": 4.0},
                    free={"CPU": cpu, "GPU": 0.0, "slot": slot if free_slot is None else free_slot, "memory_gb": 4.0})


def test_a_request_becomes_ray_entrypoint_resources_and_the_groups_label_selector() -> None:
    opts = Resources(cpus=2, gpus=1, slots=1, memory_gb=1.5).ray_options("b")

    assert opts == {"entrypoint_num_cpus": 2, "entrypoint_num_gpus": 1, "entrypoint_resources": {"slot": 1},
                    "entrypoint_memory": int(1.5 * 2**30), "entrypoint_label_selector": {"group": "b"}}
    assert Resources().ray_options("a") == {"entrypoint_num_cpus": 1.0, "entrypoint_label_selector": {"group": "a"}}


def test_negative_resources_and_bad_names_are_refused_naming_them() -> None:
    with pytest.raises(ConfigError, match="slots=-1"):
        Resources(slots=-1)
    with pytest.raises(ConfigError, match="group 'b c'"):
        JobRequest(command=["train"], group="b c")
    with pytest.raises(ConfigError, match="command after `--`"):
        JobRequest(command=[], group="a")
    with pytest.raises(ConfigError, match="--retries"):
        JobRequest(command=["x"], group="a", retries=-1)


def test_a_job_bigger_than_every_node_of_its_group_is_refused_with_the_capacity_named() -> None:
    nodes = [_node("b", 2, 1, nid="b1" * 10), _node("b", 1, 1, nid="b2" * 10), _node("a", 8, 4, nid="a1" * 10)]

    check_fits(Resources(cpus=2, slots=1), "b", nodes)  # the first node of b holds it
    with pytest.raises(ConfigError) as too_big:
        check_fits(Resources(cpus=2, slots=2), "b", nodes)
    with pytest.raises(ConfigError, match="group 'z' has no live node; groups with live nodes: a, b"):
        check_fits(Resources(), "z", nodes)
    with pytest.raises(ConfigError, match="no live node"):
        check_fits(Resources(), "d", [_node("d", 4, 4, alive=False)])

    assert "asks 2 CPU, 2 slot" in str(too_big.value)
    assert "node b1b1b1b1b1b1: 2 CPU, 1 slot; node b2b2b2b2b2b2: 1 CPU, 1 slot" in str(too_big.value)


def test_a_pending_job_says_what_it_waits_for() -> None:
    busy = [_node("a", 1, 1, free_slot=0)]
    assert pending_reason(Resources(slots=1), "a", busy) == \
        "waiting for 1 CPU, 1 slot in group 'a': node nnnnnnnnnnnn has 1 CPU, 0 slot free"
    assert pending_reason(Resources(slots=1), "a", [_node("a", 1, 1)]).startswith("starting")


def test_a_record_runs_the_launcher_with_its_cpus_and_names_are_unique(tmp_path: Path) -> None:
    req = JobRequest(command=["train", "--data", "my file.jsonl"], group="a", resources=Resources(cpus=2), name="t1")
    rec = new_record(req, {"APPLIANCE_HOME": "/h"}, set())

    assert rec.entrypoint() == ('"${APPLIANCE_PYTHON:-python3}" -m fedllm.appliance.cluster.launch --cpus 2 -- '
                                "train --data 'my file.jsonl'")
    assert JobRecord.from_json(json.loads(json.dumps(rec.to_json()))) == rec
    with pytest.raises(ConfigError, match="'t1' exists already"):
        new_record(req, {}, {"t1"})


def test_show_finds_the_run_and_adapter_a_training_job_printed() -> None:
    rec = new_record(JobRequest(command=["train"], group="a"), {}, set())
    log = "appliance-job: {}\nrun 20261207-abc: train_loss 2.3\nregistered adapter mine:3 (served as mine-v3) at /x\n"

    v = view(rec, log)

    assert (v.run, v.adapter) == ("20261207-abc", "mine:3")


def test_the_launcher_sizes_threads_to_the_cpus_and_two_jobs_take_different_cores(tmp_path: Path) -> None:
    probe = "import os, json; print(json.dumps([os.environ['OMP_NUM_THREADS'], os.environ['MKL_NUM_THREADS'], sorted(os.sched_getaffinity(0))]))"
    env = {"PYTHONPATH": str(REPO), "APPLIANCE_CORE_LOCKS": str(tmp_path / "locks"), "PATH": "/usr/bin:/bin"}
    holder = subprocess.Popen([sys.executable, "-m", "fedllm.appliance.cluster.launch", "--cpus", "1", "--program", "--", "sleep", "30"],
                              env=env, stdout=subprocess.PIPE, text=True)
    try:
        first = json.loads(holder.stdout.readline().split(":", 1)[1])
        second = subprocess.run([sys.executable, "-m", "fedllm.appliance.cluster.launch", "--cpus", "1.7", "--program", "--",
                                 sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=60)
    finally:
        holder.kill()
        holder.wait()
    mark, out = second.stdout.splitlines()
    info = json.loads(mark.split(":", 1)[1])

    assert first["threads"] == 1 and first["pinned"] and len(first["cores"]) == 1
    assert info["threads"] == 1 and json.loads(out)[:2] == ["1", "1"]
    assert info["pinned"] and json.loads(out)[2] == info["cores"] and info["cores"] != first["cores"]


def test_node_command_lines_carry_the_group_label_and_never_the_token(tmp_path: Path) -> None:
    argv = node_start_argv(head="10.0.0.1:6380", group="b", labels={"region": "eu"}, cpus=4, gpus=1, slots=2,
                           temp_dir=tmp_path, ports={"dashboard-agent-listen-port": 23456})

    assert argv[1:3] == ["start", "--block"] and "--head" not in argv
    assert argv[argv.index("--labels") + 1] == "group=b,region=eu" and argv[argv.index("--address") + 1] == "10.0.0.1:6380"
    assert argv[argv.index("--resources") + 1] == '{"slot": 2}' and argv[argv.index("--num-gpus") + 1] == "1"
    assert not any("token" in a.lower() for a in argv)


def test_cluster_settings_defaults_and_limits(tmp_path: Path) -> None:
    s = make_settings(tmp_path, cluster={"max_jobs_per_group": {"a": 2}, "default_max_jobs": 5})
    assert s.cluster.max_jobs("a") == 2 and s.cluster.max_jobs("b") == 5
    assert s.cluster.job_api_url() == "http://127.0.0.1:8265" and s.jobs_dir == tmp_path / "jobs"
    with pytest.raises(ConfigError, match="max_jobs_per_group"):
        make_settings(tmp_path, cluster={"max_jobs_per_group": {"a": 0}})


def test_job_commands_without_a_head_say_where_the_token_should_be(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from fedllm.appliance.cli import app

    listed = CliRunner().invoke(app, ["--home", str(tmp_path), "job", "ls"])
    bad_label = CliRunner().invoke(app, ["--home", str(tmp_path), "node", "join", "--head", "h:1", "--token-file", str(tmp_path / "t"),
                                         "--group", "g", "--label", "novalue"])

    assert listed.exit_code == 2 and f"no cluster token at {tmp_path / 'keys' / 'ray_token'}" in " ".join(listed.output.split())
    assert not (tmp_path / "keys").exists()  # a client never makes a token; the head does
    assert bad_label.exit_code == 2 and "--label 'novalue' must be KEY=VALUE" in " ".join(bad_label.output.split())


class _StubHead:
    """A head API that answers what the scheduler asks of Ray: node records and one job's info (the real Ray path is
    tests/cluster/test_jobs_on_ray.py; this one fixes the order in which Ray reports a killed node's two deaths)."""

    def __init__(self, info: dict) -> None:
        self.info, self.node_state, self.submitted = info, "ALIVE", []

    def usage_by_node(self) -> dict:
        return {}

    def node_records(self) -> list[dict]:
        return [{"node_id": "n" * 56, "state": self.node_state, "labels": {"group": "b"}, "resources_total": {}}]

    def jobs(self):
        from types import SimpleNamespace

        return SimpleNamespace(get_job_info=lambda sid: SimpleNamespace(**self.info),
                               stop_job=lambda sid: None,
                               submit_job=lambda **kw: self.submitted.append(kw["submission_id"]))


def test_a_job_whose_supervisor_died_before_its_node_was_seen_dead_is_retried_not_failed(tmp_path: Path) -> None:
    from fedllm.appliance.cluster.jobs import Attempt, JobStore
    from fedllm.appliance.cluster.scheduler import JobScheduler

    head = _StubHead({"status": "FAILED", "driver_node_id": "n" * 56, "start_time": None, "end_time": None,
                      "message": "Job supervisor actor died: the actor's node died", "error_type": "JOB_SUPERVISOR_ACTOR_DIED"})
    store = JobStore(tmp_path / "jobs")
    rec = new_record(JobRequest(command=["x"], group="b", resources=Resources(cpus=1), name="r", retries=1), {}, set())
    rec.attempts.append(Attempt(submission_id="r-1", submitted_at=0.0))
    rec.state = "RUNNING"
    store.save(rec)
    scheduler = JobScheduler(head, store, lambda group: None, {})

    # Ray has failed the attempt but still lists its node alive: not FAILED yet, waiting to learn the node's fate.
    [held] = scheduler.reconcile()
    assert held.state == "RUNNING" and "supervisor died" in held.reason and head.submitted == []
    # The node is then seen dead: the attempt counts as a node failure and the job is submitted again.
    head.node_state = "DEAD"
    [retried] = scheduler.reconcile()
    assert retried.state == "PENDING" and head.submitted == [f"{rec.job_id}-2"] and len(retried.node_failures) == 1
