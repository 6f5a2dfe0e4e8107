"""Child processes and their logs, shared by `appliance up`, the worker launcher and the console.

Process groups (start one, stop all of it), a signal-to-event switch for commands that must stop their children
in order, a health probe, and the tail of a log file.
"""

from __future__ import annotations

import logging
import os
import signal
import ssl
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import BinaryIO, Callable

log = logging.getLogger(__name__)

_PR_SET_PDEATHSIG = 1
_TAIL_BYTES = 64 * 1024


def pid_alive(pid: int | None) -> bool:
    """Whether a process with this pid exists and is not a zombie waiting to be reaped."""
    if not pid:
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{int(pid)}/stat", encoding="utf-8") as f:
            return f.read().rsplit(")", 1)[-1].split()[0] != "Z"
    except OSError:
        return True


def log_tail(path: Path | None, lines: int = 30) -> str:
    """The last `lines` lines of a text file, joined by newlines ("" if there is no such file).

    Reads at most the last 64 KiB, so a huge log costs no more than a small one.
    """
    if path is None:
        return ""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - _TAIL_BYTES))
            text = f.read().decode("utf-8", "replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


def http_ok(url: str, timeout_s: float = 2.0) -> bool:
    """True when GET `url` answers 2xx within `timeout_s`.

    A readiness probe of a local child: it sends no secret and reads only the status, so an https URL is probed
    without checking the certificate (made for the service's public name, it need not match 127.0.0.1).
    """
    context = None
    if url.startswith("https://"):
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    try:
        with urllib.request.urlopen(url, timeout=timeout_s, context=context) as resp:
            return 200 <= resp.status < 300
    except (urllib.error.URLError, OSError, ValueError):
        return False


def _die_with_parent() -> None:  # pragma: no cover - runs in the forked child
    """SIGTERM when the parent dies (Linux), so no child outlives its launcher."""
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def _new_group_die_with_parent() -> None:  # pragma: no cover - runs in the forked child
    os.setsid()
    _die_with_parent()


def process_start_ticks(pid: int | None) -> int | None:
    """When process `pid` started (clock ticks since boot, /proc/PID/stat field 22), None when it does not exist.

    A pid is reused once its process is gone; a pid together with its start time names one process for good, so a
    stop can check that the pid it read from a record is still the process that record started.
    """
    if not pid:
        return None
    try:
        with open(f"/proc/{int(pid)}/stat", encoding="utf-8") as f:
            return int(f.read().rsplit(")", 1)[-1].split()[19])
    except (OSError, ValueError, IndexError):
        return None


def same_process(pid: int | None, start_ticks: int | None) -> bool:
    """Whether `pid` is alive and is the process that started at `start_ticks` (a record without a start time, from
    an earlier version, trusts the pid alone)."""
    if not pid_alive(pid):
        return False
    return start_ticks is None or process_start_ticks(pid) == start_ticks


def open_private_log(path: Path) -> BinaryIO:
    """Open a log for appending, readable by its owner only (0600, also when it already existed; its folder 0700):
    logs carry prompts' metadata, paths and peers' addresses."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    os.fchmod(fd, 0o600)
    return os.fdopen(fd, "ab")


def start_process_group(
    argv: list[str], log_path: Path, env: dict[str, str] | None = None, *, new_group: bool = True
) -> subprocess.Popen:
    """Start `argv` with stdout and stderr appended to `log_path`, SIGTERMed if this process dies.

    With `new_group` (the default) it leads a new process group, so `stop_process_group` reaches all its descendants;
    without, it stays in the caller's group (whoever supervises the caller then stops both with one group signal).
    """
    with open_private_log(log_path) as logf:
        logf.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} starting: {' '.join(argv)}\n".encode())
        logf.flush()
        return subprocess.Popen(
            argv,
            stdout=logf,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            close_fds=True,
            preexec_fn=_new_group_die_with_parent if new_group else _die_with_parent,
        )


def stop_process(proc: subprocess.Popen, timeout_s: float = 20.0) -> int | None:
    """SIGTERM `proc` alone, wait up to `timeout_s`, then SIGKILL it. Returns the exit code."""
    for sig, wait_s in ((signal.SIGTERM, timeout_s), (signal.SIGKILL, 5.0)):
        try:
            proc.send_signal(sig)
        except ProcessLookupError:
            pass
        try:
            return proc.wait(timeout=wait_s)
        except subprocess.TimeoutExpired:
            log.warning("process %s did not stop after %s", proc.pid, sig.name)
    return proc.returncode


def stop_process_group(proc: subprocess.Popen, timeout_s: float = 20.0) -> int | None:
    """SIGTERM the whole process group of `proc`, wait up to `timeout_s`, then SIGKILL it. Returns the exit code."""
    try:
        pgid = os.getpgid(proc.pid)
    except ProcessLookupError:
        pgid = proc.pid
    for sig, wait_s in ((signal.SIGTERM, timeout_s), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            pass
        try:
            proc.wait(timeout=wait_s)
            break
        except subprocess.TimeoutExpired:
            log.warning("process %s did not stop after %s; sending SIGKILL", proc.pid, sig.name)
    # Members of the group (vLLM's engine core) may outlive the leader by a moment; make sure they go.
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    return proc.returncode


def stop_on_signals() -> threading.Event:
    """Install SIGINT/SIGTERM handlers that set (and return) an event, so a command can shut its children down
    in order instead of dying at once and orphaning them. Call it before starting any child."""
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    return stop


def wait_for_signal(
    stop: threading.Event, still_running: Callable[[], bool] = lambda: True, poll_s: float = 1.0
) -> bool:
    """Block until `stop` is set (returns True) or `still_running()` turns False (returns False)."""
    while not stop.wait(poll_s):
        if not still_running():
            return False
    return True
