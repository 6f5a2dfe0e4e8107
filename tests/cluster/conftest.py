"""A real Ray cluster for the cluster tests: the appliance's head and three nodes (group a: a1; group b: b1, b2),
each a separate `ray start` process tree on its own loopback address, started once per file and stopped at its end."""

from __future__ import annotations

import json
import re

import pytest

from fedllm.testing.ray_cluster import LocalCluster

JOB_MARK = re.compile(r"^appliance-job: (\{.*\})$", re.M)


def where_it_ran(log_text: str) -> list[dict]:
    """The launcher's own records of where each attempt of a job ran (one per attempt, in order)."""
    return [json.loads(m) for m in JOB_MARK.findall(log_text)]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory):
    # Group b runs one job at a time (cluster.max_jobs_per_group), though its two nodes could hold two.
    c = LocalCluster(tmp_path_factory.mktemp("cluster") / "home", {"a1": ("a", 1, 1), "b1": ("b", 1, 1), "b2": ("b", 1, 1)},
                     extra_env={"APPLIANCE_CLUSTER__MAX_JOBS_PER_GROUP": '{"b": 1}'})
    try:
        yield c.start()
    finally:
        c.stop()
