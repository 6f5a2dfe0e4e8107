"""Logs are the owner's alone (0600), and a stop never signals a process that only reuses a recorded pid (issue 19)."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import time

from fedllm.core.processes import (open_private_log, process_start_ticks, same_process, start_process_group,
                                      stop_process_group)


def test_logs_are_created_and_kept_0600(tmp_path):
    # Arrange: a log that already exists world-readable (written by an earlier version).
    old = tmp_path / "logs" / "old.log"
    old.parent.mkdir()
    old.write_text("earlier\n")
    old.chmod(0o644)
    # Act
    with open_private_log(old) as f:
        f.write(b"more\n")
    proc = start_process_group([sys.executable, "-c", "print('child')"], tmp_path / "logs" / "child.log")
    proc.wait(10)
    # Assert
    for path in (old, tmp_path / "logs" / "child.log"):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    assert old.read_text() == "earlier\nmore\n" and "child" in (tmp_path / "logs" / "child.log").read_text()


def test_a_pid_with_its_start_time_names_one_process(tmp_path):
    proc = start_process_group([sys.executable, "-c", "import time; time.sleep(30)"], tmp_path / "sleep.log")
    try:
        ticks = process_start_ticks(proc.pid)
        assert ticks is not None and same_process(proc.pid, ticks)
        assert not same_process(proc.pid, ticks + 1)  # the same pid, started at another time: another process
        assert same_process(proc.pid, None)  # a record without a start time trusts the pid
    finally:
        stop_process_group(proc)
    assert not same_process(proc.pid, ticks) and process_start_ticks(proc.pid) is None


def test_the_console_stop_refuses_a_pid_that_now_names_another_process(tmp_path):
    from fedllm.core.atomic import write_json_atomic
    from fedllm.ui.launcher import launch, launches_dir, read_record, stop

    # Arrange: a launched command, then its record edited as if the pid had been reused by another process.
    record = launch(tmp_path, "train", [sys.executable, "-c", "import time; time.sleep(60)"])
    path = launches_dir(tmp_path) / f"{record['id']}.json"
    assert record["pid_start"] == process_start_ticks(record["pid"])
    forged = {**read_record(path), "pid_start": record["pid_start"] - 1}
    write_json_atomic(path, forged)
    try:
        # Act / Assert: not signalled (it keeps running); with the true start time, it is stopped.
        assert stop(tmp_path, record["id"]) is False
        time.sleep(0.3)
        assert same_process(record["pid"], record["pid_start"])
        write_json_atomic(path, {**forged, "pid_start": record["pid_start"]})
        assert stop(tmp_path, record["id"]) is True
        deadline = time.monotonic() + 10
        while same_process(record["pid"], record["pid_start"]) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not same_process(record["pid"], record["pid_start"])
        assert stat.S_IMODE(os.stat(record["log"]).st_mode) == 0o600
    finally:
        try:
            os.killpg(record["pid"], 9)
        except ProcessLookupError:
            pass
