"""Start a command detached from the console, and record its pid and exit code on disk.

The console starts training runs, coordinators and the demo through this wrapper so they outlive the page and the
console itself, and so a run that dies before writing its own status (bad arguments, bad data, a kill) is still
reported with its exit code and the end of its log. A launch record is `APPLIANCE_HOME/ui/launches/ID.json`:
`{"id", "kind", "cmd", "pid", "wrapper_pid", "log", "started_at", "exit_code", "ended_at", "stop_requested"}`.

Run as `python -m fedllm.ui.launcher RECORD -- CMD...` (done by `launch()`; not meant for people).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

from fedllm.core.atomic import write_json_atomic
from fedllm.core.processes import open_private_log, pid_alive, process_start_ticks, same_process


def launches_dir(home: Path) -> Path:
    """Where launch records live."""
    return Path(home) / "ui" / "launches"


def launch(home: Path, kind: str, cmd: list[str], env: dict[str, str] | None = None) -> dict[str, Any]:
    """Start `cmd` detached (own session) under the recording wrapper; return its record once the pid is known.

    Args:
        home: APPLIANCE_HOME.
        kind: What it is ("train", "coordinator", "demo").
        cmd: The command line.
        env: Extra environment variables.
    """
    launch_id = f"{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
    record_path = launches_dir(home) / f"{launch_id}.json"
    log_path = launches_dir(home) / f"{launch_id}.log"
    record = {
        "id": launch_id,
        "kind": kind,
        "cmd": cmd,
        "pid": None,
        "log": str(log_path),
        "started_at": time.time(),
        "exit_code": None,
        "ended_at": None,
        "stop_requested": False,
    }
    write_json_atomic(record_path, record)
    subprocess.Popen(
        [sys.executable, "-m", "fedllm.ui.launcher", str(record_path), "--", *cmd],
        env={**os.environ, **(env or {})},
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
        cwd=str(Path(__file__).resolve().parents[1]),
    )
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        current = read_record(record_path)
        if current.get("pid"):
            return current
        time.sleep(0.05)
    return read_record(record_path)


def read_record(path: Path) -> dict[str, Any]:
    """A launch record (empty dict if unreadable)."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def list_records(home: Path, kind: str | None = None) -> list[dict[str, Any]]:
    """Launch records, newest first, optionally of one kind."""
    d = launches_dir(home)
    if not d.is_dir():
        return []
    records = [read_record(p) for p in sorted(d.glob("*.json"), reverse=True)]
    return [r for r in records if r and (kind is None or r.get("kind") == kind)]


def record_state(record: dict[str, Any], alive: str = "running") -> str:
    """What a launch record says of its process: `alive` (no exit code yet, and the process or the wrapper that will
    write its exit code alive), "done" (exit 0), "stopped" (it exited after a stop), or "failed" (another exit code,
    or gone without one)."""
    code = record.get("exit_code")
    if code is None:
        own = same_process(record.get("pid"), record.get("pid_start"))
        return alive if own or pid_alive(record.get("wrapper_pid")) else "failed"
    if record.get("stop_requested"):
        return "stopped"
    return "done" if code == 0 else "failed"


def stop(home: Path, launch_id: str, sig: int = signal.SIGTERM) -> bool:
    """Ask a launched process to stop (SIGTERM to its process group); marks the record. False if not running, or if
    its pid now names another process (the record's start time differs): that one is never signalled."""
    path = launches_dir(home) / f"{launch_id}.json"
    record = read_record(path)
    pid = record.get("pid")
    if pid is None or not same_process(pid, record.get("pid_start")):
        return False
    record["stop_requested"] = True
    write_json_atomic(path, record)
    try:
        os.killpg(int(pid), sig)
    except (ProcessLookupError, PermissionError):
        return False
    return True


def _main(argv: list[str]) -> int:
    record_path = Path(argv[0])
    cmd = argv[argv.index("--") + 1 :]
    record = read_record(record_path)
    with open_private_log(Path(record["log"])) as log:
        # The child leads its own process group so a stop reaches everything it starts (DeepSpeed, compilers).
        child = subprocess.Popen(
            cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        record["pid"] = child.pid
        record["pid_start"] = process_start_ticks(child.pid)  # so a stop never signals a later process of that pid
        record["wrapper_pid"] = os.getpid()  # alive until the exit code is written: no gap that reads as a crash
        write_json_atomic(record_path, record)
        code = child.wait()
    record = read_record(record_path) or record  # keep stop_requested written by stop()
    record.update(exit_code=code, ended_at=time.time())
    write_json_atomic(record_path, record)
    return 0


if __name__ == "__main__":
    # The wrapper and the child lead separate sessions: a stop (killpg of the child) never reaches the wrapper,
    # which lives on to record the exit code. (Ignoring SIGTERM here instead would be inherited by the child.)
    sys.exit(_main(sys.argv[1:]))
