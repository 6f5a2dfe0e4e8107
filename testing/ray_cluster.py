"""A real Ray cluster on this machine for tests and benchmarks: the appliance's head (`appliance cluster head`) and
nodes (`appliance node join`), each a separate process group with its own Ray temp dir and ports, all stopped at the
end (SIGTERM, then SIGKILL of each group), so nothing outlives the test."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]


from fedllm.appliance.cluster.ray_env import spare_port as free_port  # noqa: E402  (ports away from Ray's random ones)
from fedllm.testing.waiting import wait_until  # noqa: E402


def _pgid_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True


def _children() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            kids.setdefault(ppid, []).append(int(entry.name))
    return kids


def process_groups(root: int) -> set[int]:
    """The process groups of `root` and all its descendants (Ray's node processes, a job's processes)."""
    kids, groups, todo = _children(), set(), [root]
    while todo:
        pid = todo.pop()
        try:
            groups.add(os.getpgid(pid))
        except ProcessLookupError:
            continue
        todo += kids.get(pid, [])
    return groups


def kill_groups(groups: set[int], grace_s: float, proc: subprocess.Popen | None = None) -> None:
    """SIGTERM every group, wait up to `grace_s` for them to go, then SIGKILL what is left. `proc` (our own child,
    a member of one group) is reaped while waiting: unreaped, its zombie would keep its group alive."""

    def alive() -> bool:
        if proc is not None:
            proc.poll()
        return any(_pgid_alive(g) for g in groups)

    for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 10.0)):
        for g in groups:
            try:
                os.killpg(g, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + wait_s
        while alive() and time.monotonic() < deadline:
            time.sleep(0.1)


@dataclass
class LocalCluster:
    """A head (group `head_group`) and named nodes, each `(group, cpus, slots)`.

    `env` is the environment every appliance command of this cluster runs with (its home and ports).
    """

    home: Path
    nodes: dict[str, tuple[str, int, int]]
    head_group: str = "head"
    head_cpus: int = 0
    extra_env: dict[str, str] = field(default_factory=dict)
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.port = free_port()
        self.env = {
            **{k: v for k, v in os.environ.items() if not k.startswith(("APPLIANCE_", "RAY_"))},
            "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH", "")])),
            "APPLIANCE_HOME": str(self.home),
            "APPLIANCE_CLUSTER__PORT": str(self.port),
            "APPLIANCE_CLUSTER__DASHBOARD_PORT": str(free_port()),
            "APPLIANCE_CLUSTER__CLIENT_SERVER_PORT": str(free_port()),
            "APPLIANCE_CLUSTER__AGENT_PORT": str(free_port()),
            "APPLIANCE_CLUSTER__GROUP": self.head_group,
            "APPLIANCE_CLUSTER__NUM_CPUS": str(self.head_cpus),
            "APPLIANCE_CLUSTER__RECONCILE_INTERVAL_S": "0.5",
            "APPLIANCE_CLUSTER__TEMP_DIR": tempfile.mkdtemp(prefix="ray-", dir="/tmp"),
            # A killed node is declared dead after ~3 s instead of Ray's default ~15-30 s.
            "RAY_health_check_period_ms": "1000",
            "RAY_health_check_timeout_ms": "1000",
            "RAY_health_check_failure_threshold": "3",
            **self.extra_env,
        }

    @property
    def token_file(self) -> Path:
        return self.home / "keys" / "ray_token"

    @property
    def head_address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _spawn(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> subprocess.Popen:
        log = open(self.home / f"{name}.out", "ab")
        proc = subprocess.Popen(
            [sys.executable, "-m", "fedllm.appliance", *argv],
            env=env or self.env,
            cwd=REPO,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        self.procs[name] = proc
        return proc

    def cli(self, *args: Any, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess:
        """Run `appliance ARGS` against this cluster."""
        done = subprocess.run(
            [sys.executable, "-m", "fedllm.appliance", *map(str, args)],
            env=self.env,
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if check and done.returncode != 0:
            raise AssertionError(
                f"appliance {' '.join(map(str, args))} exited {done.returncode}:\n{done.stdout}\n{done.stderr}"
            )
        return done

    def cli_json(self, *args: Any) -> Any:
        return json.loads(self.cli(*args, "--json").stdout)

    def start(self, timeout_s: float = 120.0) -> "LocalCluster":
        """Start the head, wait for its job API, then join every node and wait until all are alive."""
        self.home.mkdir(parents=True, exist_ok=True)
        self._spawn("head", ["cluster", "head"])
        wait_until(lambda: self.cli("node", "ls", check=False).returncode == 0, timeout_s, 0.25, "the head's job API")
        for i, name in enumerate(self.nodes, start=2):  # one at a time: four raylets starting at once starve 2 cores
            self.join(name)
            wait_until(lambda: len(self.alive_nodes()) == i, timeout_s, 0.25, f"node {name} alive")
        return self

    def join(self, name: str, token_file: Path | None = None) -> subprocess.Popen:
        """Start `appliance node join` for node `name`, on its own loopback address (127.0.0.2, ...)."""
        group, cpus, slots = self.nodes[name]
        ip = f"127.0.0.{2 + list(self.nodes).index(name)}"
        return self._spawn(
            name,
            [
                "node",
                "join",
                "--head",
                self.head_address,
                "--token-file",
                str(token_file or self.token_file),
                "--group",
                group,
                "--cpus",
                str(cpus),
                "--slots",
                str(slots),
                "--name",
                name,
                "--node-ip",
                ip,
            ],
        )

    def alive_nodes(self) -> list[dict[str, Any]]:
        return [n for n in self.cli_json("node", "ls") if n["alive"]]

    def node_id(self, name: str) -> str:
        """Ray's id of node `name` (its `node` label)."""
        for n in self.cli_json("node", "ls"):
            if n["labels"].get("node") == name and n["alive"]:
                return n["node_id"]
        raise AssertionError(f"no live node named {name}")

    def kill(self, name: str) -> None:
        """SIGKILL a node's whole process group (a machine that dies)."""
        proc = self.procs[name]
        kill_groups(process_groups(proc.pid), grace_s=0.0, proc=proc)
        proc.wait(timeout=30)

    @staticmethod
    def wait(predicate, timeout_s: float, what: str, step_s: float = 0.25) -> Any:
        """`fedllm.testing.waiting.wait_until`, polling every quarter second."""
        return wait_until(predicate, timeout_s, step_s, what)

    def stop(self) -> None:
        """Stop every process group this cluster started: nodes first, then the head (SIGTERM, 10 s, SIGKILL)."""
        order = [n for n in self.procs if n != "head"] + (["head"] if "head" in self.procs else [])
        for name in order:
            proc = self.procs[name]
            kill_groups(process_groups(proc.pid), grace_s=5.0, proc=proc)
            proc.wait(timeout=10)
        import shutil

        shutil.rmtree(self.env["APPLIANCE_CLUSTER__TEMP_DIR"], ignore_errors=True)
