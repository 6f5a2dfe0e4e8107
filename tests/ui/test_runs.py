"""How the console reads runs from disk: crashes, kills, stops and launches that never made a run folder."""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path

import pytest

from fedllm.testing.factories import wait_until
from fedllm.ui import launcher
from fedllm.ui.runs import list_runs, read_jsonl, smooth

# A stand-in for `appliance train`: writes a run folder with a running status and metrics, then trains "forever".
FAKE_TRAIN = """
import json, os, sys, time, pathlib
run = pathlib.Path(sys.argv[1]); run.mkdir(parents=True)
(run / "status.json").write_text(json.dumps({"state": "running", "pid": os.getpid()}))
for step in range(1, 100000):
    with open(run / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"step": step, "total_steps": 100000, "loss": 2.0 / step, "elapsed_s": step}) + "\\n")
    print("step", step, flush=True)
    time.sleep(0.05)
"""


@pytest.fixture
def home(tmp_path: Path):
    (tmp_path / "runs").mkdir()
    yield tmp_path
    for record in launcher.list_records(tmp_path):  # never leave a fake trainer behind
        if launcher.pid_alive(record.get("pid")):
            launcher.stop(tmp_path, record["id"], signal.SIGKILL)


def launch_fake(home: Path, run_id: str) -> dict:
    script = home / "fake_train.py"
    script.write_text(FAKE_TRAIN)
    return launcher.launch(home, "train", [sys.executable, str(script), str(home / "runs" / run_id)])


def test_killed_run_is_failed_with_exit_code_and_log(home):
    record = launch_fake(home, "r1")
    run = wait_until(lambda: next((r for r in list_runs(home / "runs", home) if r.id == "r1" and r.metrics), None))
    assert run.state == "running" and run.launch_id == record["id"]

    os.kill(record["pid"], signal.SIGKILL)
    run = wait_until(lambda: next((r for r in list_runs(home / "runs", home) if r.id == "r1" and r.exit_code is not None), None))
    assert run.state == "failed"
    assert run.exit_code == -9
    assert "gone without finishing" in run.error
    assert len(list_runs(home / "runs", home)) == 1, "the launch is merged with its run folder, not listed twice"


def test_stopped_run_is_stopped_not_failed(home):
    record = launch_fake(home, "r2")
    wait_until(lambda: (home / "runs" / "r2" / "metrics.jsonl").exists())
    assert launcher.stop(home, record["id"])
    run = wait_until(lambda: next((r for r in list_runs(home / "runs", home) if r.exit_code is not None), None))
    assert run.state == "stopped"


def test_running_status_with_dead_pid_is_a_crash(home):
    # A run started elsewhere (no launch record) whose process vanished.
    run_dir = home / "runs" / "orphan"
    run_dir.mkdir()
    (run_dir / "status.json").write_text(json.dumps({"state": "running", "pid": 2**22 + 12345}))
    [run] = list_runs(home / "runs", home)
    assert run.state == "failed" and run.exit_code is None


def test_launch_that_failed_before_a_run_folder_is_listed(home):
    record = launcher.launch(home, "train", [sys.executable, "-c", "import sys; print('bad data at line 3'); sys.exit(2)"])
    run = wait_until(lambda: next((r for r in list_runs(home / "runs", home) if r.exit_code is not None), None))
    assert run.id == f"launch-{record['id']}" and run.state == "failed" and run.exit_code == 2
    assert "bad data at line 3" in Path(run.log_path).read_text()


def test_read_jsonl_skips_a_half_written_last_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "lo')
    assert read_jsonl(path) == [{"step": 1, "loss": 2.0}]


def test_smoothing_of_a_constant_is_the_constant_and_follows_a_trend():
    assert smooth([3.0] * 5) == pytest.approx([3.0] * 5)
    falling = smooth([4.0, 3.0, 2.0, 1.0])
    assert falling[0] == pytest.approx(4.0) and all(a > b for a, b in zip(falling, falling[1:]))
