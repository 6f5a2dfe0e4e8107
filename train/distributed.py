"""Training on several ranks: DeepSpeed's own launcher runs `python -m fedllm.train --from-run RUN_DIR` once per rank.

One node: `deepspeed --num_gpus N` (a rank per GPU; on a CPU-only machine DeepSpeed's launcher starts N CPU
processes and the engine joins them with gloo). Several nodes: the same launcher with a hostfile
(`HOST slots=N` per line, reached over pdsh/ssh as DeepSpeed documents). Every rank runs the same engine as
in-process training (`fit_adapter`), takes its share of every global micro-batch, and checkpoints into the run
folder; rank 0 writes metrics.jsonl, the PEFT adapter folder and result.json, which the caller reads back.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedllm.core.errors import ConfigError
from fedllm.core.processes import open_private_log
from fedllm.core.types import StateDict
from fedllm.train.engine import free_port
from fedllm.train.run_folder import read_metrics

log = logging.getLogger(__name__)

ADAPTER_DIR = "adapter"  # inside the run folder: the PEFT folder rank 0 writes
RESULT_FILE = "result.json"  # inside the run folder: {"num_examples", "metrics"} from rank 0
LAUNCHER_LOG = "launcher.log"  # inside the run folder: the launcher's and every rank's output
# Set by `python -m fedllm.train` itself (engine.init_distributed) when it had no launcher: a child must not inherit it.
_INHERITED = ("FEDLLM_SELF_ASSIGNED_DIST", "RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@dataclass(frozen=True)
class LaunchResult:
    """What the ranks produced: rank 0's adapter state, example count and metrics."""

    state: StateDict
    num_examples: int
    metrics: dict[str, float]


def launcher_command(
    ranks: int,
    module_args: list[str],
    *,
    hostfile: Path | None = None,
    master_port: int | None = None,
    module: str = "fedllm.train",
) -> list[str]:
    """The argv of DeepSpeed's launcher running `python -m MODULE MODULE_ARGS` on `ranks` ranks per node.

    Without a hostfile: one node (this one), `ranks` processes. With one: every host it lists, `ranks` per host
    (DeepSpeed's multi-node launcher; the hostfile says `HOST slots=N`).
    """
    if ranks < 1:
        raise ConfigError(f"train.ranks must be at least 1, got {ranks}")
    cmd = [sys.executable, "-u", "-m", "deepspeed.launcher.runner", "--num_gpus", str(ranks)]
    if hostfile is not None:
        if not Path(hostfile).is_file():
            raise ConfigError(f"train.hostfile {hostfile} does not exist (one `HOST slots=N` line per node)")
        cmd += ["--hostfile", str(hostfile)]
    cmd += ["--master_port", str(master_port if master_port is not None else free_port())]
    return cmd + ["--module", module, *module_args]


SHM_DIR = Path("/dev/shm")


def remove_shm_buffers(master_port: int, shm_dir: Path = SHM_DIR) -> list[Path]:
    """Remove the shared-memory all-reduce buffers the ranks of one launch left (DeepSpeed's CPU accelerator makes
    `deepspeed_allreduce_buffer_<n>_<addr>_<master_port>_<rank>`, 66 MB each, and never removes them: a silo that
    trains for weeks would fill the machine's RAM). Call it once the launch's ranks have exited; returns what went."""
    gone = []
    for path in shm_dir.glob(f"deepspeed_allreduce_buffer_*_{master_port}_*"):
        if path.name.split("_")[-2] == str(master_port):
            path.unlink(missing_ok=True)
            gone.append(path)
    return gone


def launch_env() -> dict[str, str]:
    """This process's environment without the single-process torch.distributed variables (the launcher sets its own)."""
    env = {k: v for k, v in os.environ.items() if k not in _INHERITED}
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    return env


def launch_run(
    run_dir: Path,
    ranks: int,
    *,
    resume: bool = False,
    hostfile: Path | None = None,
    progress: Callable[[dict[str, Any]], None] | None = None,
    poll_s: float = 0.5,
) -> LaunchResult:
    """Train the run prepared in `run_dir` (its config.json) on `ranks` ranks and return rank 0's result.

    Blocks until the launcher exits; `progress` gets each new metrics.jsonl step record meanwhile. A SIGTERM,
    Ctrl-C or error here stops the launcher, which stops every rank.

    Raises:
        TrainingFailed: the launcher or a rank exited non-zero (the message has the log's tail).
    """
    from fedllm.train.engine import TrainingFailed
    from fedllm.train.lora import load_state_dir

    run_dir = Path(run_dir)
    args = ["--from-run", str(run_dir)] + (["--resume"] if resume else [])
    port = free_port()
    cmd = launcher_command(ranks, args, hostfile=hostfile, master_port=port)
    (run_dir / RESULT_FILE).unlink(missing_ok=True)
    log_path = run_dir / LAUNCHER_LOG
    latest = run_dir / "checkpoints" / "latest"
    seen = (
        int("".join(c for c in latest.read_text() if c.isdigit()) or 0) if resume and latest.is_file() else 0
    )  # last step reported
    with open_private_log(log_path) as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=launch_env(), start_new_session=True)
        try:
            while proc.poll() is None:
                time.sleep(poll_s)
                seen = _forward_progress(run_dir, seen, progress)
        except BaseException:
            stop_process_group(proc)
            raise
        finally:
            if proc.poll() is not None:
                remove_shm_buffers(port)
    _forward_progress(run_dir, seen, progress)
    if proc.returncode != 0 or not (run_dir / RESULT_FILE).is_file():
        tail = log_path.read_text(encoding="utf-8", errors="replace")[-3000:]
        raise TrainingFailed(
            f"training on {ranks} ranks failed (launcher exit code {proc.returncode}); {log_path} ends with:\n{tail}"
        )
    result = json.loads((run_dir / RESULT_FILE).read_text())
    return LaunchResult(load_state_dir(run_dir / ADAPTER_DIR), int(result["num_examples"]), result["metrics"])


def _forward_progress(run_dir: Path, last_step: int, progress: Callable[[dict[str, Any]], None] | None) -> int:
    """Hand `progress` the step records after `last_step`; returns the last step handed on."""
    for record in read_metrics(run_dir / "metrics.jsonl"):
        if "loss" in record and record.get("step", 0) > last_step:
            if progress is not None:
                progress(record)
            last_step = record["step"]
    return last_step


def stop_process_group(proc: subprocess.Popen, grace_s: float = 20.0) -> None:
    """SIGTERM the launcher (it stops its ranks), then SIGKILL its whole process group after `grace_s`."""
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()
