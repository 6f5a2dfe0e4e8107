"""The first process of every job, on the node that runs it: size threads to the job's CPUs, pin cores, say where it
runs, then become the job's command (exec, so stopping the job stops the command's whole process group).

    python -m fedllm.appliance.cluster.launch --cpus N [--program] -- COMMAND ...

Without `--program`, COMMAND is an appliance command (`train ...`) run with this interpreter. Cores are claimed with
`flock` on one file per core in a node-local folder; the locks pass through exec and go when the job's process dies,
so jobs sharing a node take different cores while there are enough.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import math
import os
import socket
import sys
import tempfile
from pathlib import Path

from fedllm.core.cores import available_cores

THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "NUMEXPR_NUM_THREADS")
MARK = "appliance-job:"


def thread_count(cpus: float) -> int:
    """Compute threads for a job given `cpus` (Ray allows fractions): at least 1."""
    return max(1, math.floor(cpus))


def claim_cores(n: int, lock_dir: Path) -> list[int]:
    """Up to `n` cores of this process's affinity whose lock files this process could lock (held until it exits);
    fewer (possibly none) when other jobs hold the rest."""
    lock_dir.mkdir(parents=True, exist_ok=True)
    claimed: list[int] = []
    for core in available_cores():
        if len(claimed) == n:
            break
        fd = os.open(lock_dir / f"core-{core}", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            continue
        os.set_inheritable(fd, True)  # kept open through exec: the lock lives as long as the job's process
        claimed.append(core)
    return claimed


def prepare(cpus: float, lock_dir: Path) -> dict[str, object]:
    """Set this process's thread variables and affinity for a job of `cpus`; what was done, for the job's log."""
    threads = thread_count(cpus)
    for var in THREAD_VARS:
        os.environ[var] = str(threads)
    cores = claim_cores(threads, lock_dir)
    pinned = False
    if len(cores) == threads:
        try:
            os.sched_setaffinity(0, cores)
            pinned = True
        except OSError:  # a container may forbid it; the thread count still holds
            pass
    return {"threads": threads, "cores": cores if pinned else [], "pinned": pinned}


def where() -> dict[str, object]:
    """Where this job runs, from its own environment: host, the node's group and name (set by `appliance node join`),
    and Ray's node id when Ray gives it."""
    return {
        "host": socket.gethostname(),
        "group": os.environ.get("APPLIANCE_NODE_GROUP"),
        "node_name": os.environ.get("APPLIANCE_NODE_NAME"),
        "ray_node_id": os.environ.get("RAY_NODE_ID"),
        "job": os.environ.get("APPLIANCE_JOB_ID"),
        "pid": os.getpid(),
    }


def main(argv: list[str] | None = None) -> None:
    """Run the launcher: `--cpus N [--program] -- COMMAND ...`."""
    parser = argparse.ArgumentParser(prog="python -m fedllm.appliance.cluster.launch")
    parser.add_argument("--cpus", type=float, required=True)
    parser.add_argument("--program", action="store_true")
    parser.add_argument("command", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("no command after --")
    lock_dir = Path(
        os.environ.get("APPLIANCE_CORE_LOCKS", Path(tempfile.gettempdir()) / f"appliance-cores-{os.getuid()}")
    )
    info = {**where(), **prepare(args.cpus, lock_dir)}
    print(f"{MARK} {json.dumps(info)}", flush=True)
    if not args.program:
        command = [sys.executable, "-m", "fedllm.appliance", *command]
    os.execvp(command[0], command)


if __name__ == "__main__":
    main()
