"""The Jobs tab's tables from `appliance node|job ls --json` output, and the console building with the tab."""

from __future__ import annotations


from fedllm.testing.factories import make_settings
from fedllm.ui.tabs.jobs import group_rows, job_rows, node_rows


def test_nodes_and_jobs_become_table_rows() -> None:
    nodes = [{"node_id": "abcdef1234567890", "group": "b", "alive": True, "is_head": False, "ip": "10.0.0.2",
              "labels": {"group": "b", "node": "gpu-1"}, "total": {"CPU": 8, "GPU": 2, "slot": 0, "memory_gb": 60.5},
              "free": {"CPU": 6, "GPU": 1, "slot": 0, "memory_gb": 50.25}}]
    jobs = [{"job_id": "j1", "state": "SUCCEEDED", "group": "b", "node_id": "abcdef1234567890", "age_s": 30.0, "attempts": 1,
             "reason": "", "command": "train --data d.jsonl"},
            {"job_id": "j2", "state": "PENDING", "group": "b", "node_id": None, "age_s": 600.0, "attempts": 1,
             "reason": "waiting for 1 GPU in group 'b'", "command": "train"}]

    assert node_rows(nodes) == [["b", "abcdef123456", "gpu-1", "alive", "6/8", "1/2", "0/0", "50.25/60.5"]]
    assert job_rows(jobs) == [["j2", "PENDING", "b", "-", "10m", 1, "waiting for 1 GPU in group 'b'"],
                              ["j1", "SUCCEEDED", "b", "abcdef123456", "30s", 1, "train --data d.jsonl"]]


def test_groups_sum_their_live_nodes_and_count_their_jobs() -> None:
    def node(group: str, alive: bool, cpu: tuple[int, int], slot: tuple[int, int]) -> dict:
        return {"node_id": "x" * 16, "group": group, "alive": alive, "labels": {},
                "free": {"CPU": cpu[0], "slot": slot[0], "memory_gb": 1.5}, "total": {"CPU": cpu[1], "slot": slot[1], "memory_gb": 2.0}}
    nodes = [node("b", True, (1, 2), (0, 1)), node("b", True, (2, 2), (1, 1)), node("b", False, (4, 4), (1, 1)),
             node("a", True, (0, 1), (0, 0))]
    jobs = [{"group": "b", "state": s} for s in ("RUNNING", "PENDING", "QUEUED", "SUCCEEDED", "FAILED")] + [
        {"group": "a", "state": "RUNNING"}, {"group": "gone", "state": "RUNNING"}]

    assert group_rows(nodes, jobs) == [
        ["a", "1/1", "0/1", "0/0", "0/0", "1.5/2", 1, 0],
        ["b", "2/3", "3/4", "0/0", "1/2", "3/4", 1, 2],  # the dead node's resources are not counted
    ]


def test_the_console_has_a_jobs_tab(tmp_path) -> None:
    from fedllm.ui.app import build_console

    demo = build_console(make_settings(tmp_path))

    labels = [getattr(b, "label", None) for b in demo.blocks.values()]
    assert "Jobs" in labels and "Groups and nodes" in labels and "Submit a training job" in labels
