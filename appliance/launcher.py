"""The supervisor behind `appliance up`: child processes in dependency order, readiness waits, restarts, clean stop.

Each child is a command line (normally a CLI command of this package run with the same interpreter), started as the
leader of its own process group with its output in `logs/NAME.log`. The supervisor

- refuses to start when a port a child needs is taken (checked for every child before any starts);
- starts children in dependency order and waits for each one's health URL to answer 2xx before the next;
- restarts a child that fails (exits non-zero or by a signal) after an exponential backoff (logged), reset once the
  child has run stably; a child that exits 0 has finished (a coordinator after its last round) and one that exits 2
  refused its settings, and neither is restarted;
- stops every child (reverse order, SIGTERM then SIGKILL of its whole group) when asked;
- keeps `run/up.json` (its pid, every child's pid, URL, state and restarts) for `appliance status`.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import socket
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedllm.core.atomic import write_json_atomic
from fedllm.core.errors import ApplianceError, ConfigError
from fedllm.core.net import connectable_host
from fedllm.core.processes import http_ok, log_tail, pid_alive, start_process_group, stop_process_group
from fedllm.core.secrets import ensure_token

log = logging.getLogger(__name__)

BAD_INPUT_EXIT = 2  # the CLI's exit code for bad settings or input (fedllm.appliance.commands.common.cli_errors)


class PortInUse(ApplianceError):
    """A port a child needs is already taken by another process."""


class ChildFailed(ApplianceError):
    """A child exited or did not become ready while the appliance was starting."""


@dataclass(frozen=True)
class ChildSpec:
    """One supervised process.

    Attributes:
        name: unique name, also the log file name (`logs/NAME.log`).
        argv: the command line.
        health_url: URL that answers 2xx once the child is ready (None: ready as soon as it runs).
        ports: TCP ports the child will listen on (checked free before anything starts).
        host: the interface those ports are bound on.
        url: the address shown to the user.
        depends_on: names of children that must be ready first.
        ready_timeout_s: seconds to wait for `health_url` at start.
        env: variables added to the supervisor's environment for this child.
        optional: a child whose failure at start is logged and left to the restart loop instead of aborting `up`.
    """

    name: str
    argv: list[str]
    health_url: str | None = None
    ports: tuple[int, ...] = ()
    host: str = "127.0.0.1"
    url: str | None = None
    depends_on: tuple[str, ...] = ()
    ready_timeout_s: float = 60.0
    env: dict[str, str] = field(default_factory=dict)
    optional: bool = False


@dataclass
class _Child:
    spec: ChildSpec
    proc: subprocess.Popen | None = None
    state: str = "pending"  # pending | starting | ready | backoff | done (exited 0) | failed (exited 2) | stopped
    restarts: int = 0
    failures: int = 0  # consecutive crashes; reset once the child stays up for `stable_after_s`
    started_at: float = 0.0
    next_start_at: float = 0.0
    last_exit: int | None = None


def port_in_use(host: str, port: int) -> bool:
    """True when something listens on `host:port` (a bind with SO_REUSEADDR fails only for a live listener)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as exc:
            return exc.errno in (errno.EADDRINUSE, errno.EACCES)
    return False


def dependency_order(specs: list[ChildSpec]) -> list[ChildSpec]:
    """`specs` sorted so that every child comes after the children it depends on (stable otherwise).

    Raises:
        ConfigError: duplicate names, an unknown dependency, or a cycle.
    """
    by_name = {s.name: s for s in specs}
    if len(by_name) != len(specs):
        raise ConfigError(f"duplicate child names in {[s.name for s in specs]}")
    unknown = [f"{s.name} -> {d}" for s in specs for d in s.depends_on if d not in by_name]
    if unknown:
        raise ConfigError(f"children depend on unknown children: {', '.join(unknown)}")
    ordered: list[ChildSpec] = []
    done: set[str] = set()
    while len(ordered) < len(specs):
        ready = [s for s in specs if s.name not in done and all(d in done for d in s.depends_on)]
        if not ready:
            raise ConfigError(f"dependency cycle among {sorted(set(by_name) - done)}")
        ordered.append(ready[0])
        done.add(ready[0].name)
    return ordered


def backoff_delay(failures: int, initial_s: float, max_s: float) -> float:
    """Seconds to wait before restart number `failures` (1, 2, ...): initial, doubled each time, capped."""
    return min(max_s, initial_s * 2 ** max(0, failures - 1))


class Supervisor:
    """Starts, watches and stops a set of child processes. Not thread-safe: drive it from one thread."""

    def __init__(
        self,
        specs: list[ChildSpec],
        logs_dir: Path,
        state_path: Path | None = None,
        *,
        backoff_initial_s: float = 1.0,
        backoff_max_s: float = 30.0,
        stable_after_s: float = 60.0,
        poll_s: float = 0.5,
        info: dict[str, Any] | None = None,
    ):
        self.children = [_Child(s) for s in dependency_order(specs)]
        self.logs_dir = Path(logs_dir)
        self.state_path = state_path
        self.backoff_initial_s = backoff_initial_s
        self.backoff_max_s = backoff_max_s
        self.stable_after_s = stable_after_s
        self.poll_s = poll_s
        self.info = info or {}

    def child(self, name: str) -> _Child:
        return next(c for c in self.children if c.spec.name == name)

    def check_ports(self) -> None:
        """Raise PortInUse naming every child port that is taken now."""
        taken = [
            f"{c.spec.name} needs {c.spec.host}:{p}"
            for c in self.children
            for p in c.spec.ports
            if port_in_use(c.spec.host, p)
        ]
        if taken:
            raise PortInUse(
                f"port already in use: {'; '.join(taken)}. Stop what uses it (or a running `appliance up`), "
                f"or choose other ports (e.g. APPLIANCE_SERVE__PORT, APPLIANCE_WORKER__BASE_PORT)"
            )

    def start(self, stop: threading.Event | None = None) -> None:
        """Check ports, then start every child in dependency order, each ready before the next starts.

        Raises:
            PortInUse: a port is taken (nothing was started).
            ChildFailed: a child exited or was not ready in time (everything started is stopped again).
        """
        stop = stop or threading.Event()
        self.check_ports()
        try:
            for child in self.children:
                if stop.is_set():
                    break
                self._spawn(child)
                try:
                    self._wait_ready(child, stop)
                except ChildFailed as exc:
                    if not child.spec.optional:
                        raise
                    log.error(
                        "%s (optional) failed to start; it will be retried with backoff: %s", child.spec.name, exc
                    )
                    child.state = "starting"  # the supervision loop notices the exit (or the late readiness)
        except BaseException:
            self.stop()
            raise

    def _spawn(self, child: _Child) -> None:
        spec = child.spec
        env = {**os.environ, **spec.env}
        child.proc = start_process_group(spec.argv, self.log_path(spec.name), env)
        child.state = "starting"
        child.started_at = time.monotonic()
        log.info("started %s (pid %s): %s", spec.name, child.proc.pid, " ".join(spec.argv))
        self.write_state()

    def log_path(self, name: str) -> Path:
        return self.logs_dir / f"{name}.log"

    def _wait_ready(self, child: _Child, stop: threading.Event) -> None:
        spec = child.spec
        deadline = time.monotonic() + spec.ready_timeout_s
        while not stop.is_set():
            if child.proc is not None and child.proc.poll() is not None:
                raise ChildFailed(self._failure(child, f"exited with code {child.proc.returncode} while starting"))
            if spec.health_url is None or http_ok(spec.health_url):
                child.state = "ready"
                log.info("%s is ready%s", spec.name, f" at {spec.url}" if spec.url else "")
                self.write_state()
                return
            if time.monotonic() > deadline:
                raise ChildFailed(
                    self._failure(child, f"was not ready after {spec.ready_timeout_s:.0f} s ({spec.health_url})")
                )
            stop.wait(self.poll_s)

    def _failure(self, child: _Child, what: str) -> str:
        path = self.log_path(child.spec.name)
        return f"{child.spec.name} {what}. Last lines of {path}:\n{log_tail(path)}"

    def poll_once(self) -> None:
        """One supervision step: notice exits, schedule and perform restarts, promote started children to ready."""
        now = time.monotonic()
        changed = False
        for child in self.children:
            proc = child.proc
            if child.state in ("starting", "ready") and proc is not None and proc.poll() is not None:
                child.last_exit = proc.returncode
                stop_process_group(proc, timeout_s=5.0)  # members of its group may linger (vLLM's engine core)
                if (
                    proc.returncode == 0
                ):  # finished its work (a coordinator after its last round), or stopped on purpose
                    child.state = "done"
                    log.info("%s finished (exit code 0); it is not restarted", child.spec.name)
                    changed = True
                    continue
                if proc.returncode == BAD_INPUT_EXIT:  # bad settings do not fix themselves; restarting would only loop
                    child.state = "failed"
                    log.error(
                        "%s refused its settings (exit code 2); it is not restarted. %s",
                        child.spec.name,
                        self._failure(child, "failed"),
                    )
                    changed = True
                    continue
                child.failures += 1
                delay = backoff_delay(child.failures, self.backoff_initial_s, self.backoff_max_s)
                child.state, child.next_start_at = "backoff", now + delay
                log.warning(
                    "%s exited with code %s; restarting it in %.1f s (consecutive failure %d)",
                    child.spec.name,
                    proc.returncode,
                    delay,
                    child.failures,
                )
                changed = True
            elif child.state == "backoff" and now >= child.next_start_at:
                if any(port_in_use(child.spec.host, p) for p in child.spec.ports):
                    child.next_start_at = now + self.poll_s  # the old process still holds the port; try shortly
                    continue
                child.restarts += 1
                log.warning("restarting %s (restart %d)", child.spec.name, child.restarts)
                self._spawn(child)
            elif child.state == "starting" and (child.spec.health_url is None or http_ok(child.spec.health_url)):
                child.state = "ready"
                log.info("%s is ready again", child.spec.name)
                changed = True
            elif child.state == "ready" and child.failures and now - child.started_at > self.stable_after_s:
                child.failures = 0
        if changed:
            self.write_state()

    def supervise(self, stop: threading.Event) -> None:
        """Poll the children until `stop` is set."""
        while not stop.wait(self.poll_s):
            self.poll_once()

    def stop(self, timeout_s: float = 30.0) -> None:
        """Stop every child, dependants first, and remove the state file."""
        for child in reversed(self.children):
            if child.proc is not None and child.proc.returncode is None:
                log.info("stopping %s (pid %s)", child.spec.name, child.proc.pid)
                stop_process_group(child.proc, timeout_s)
            child.state = "stopped"
        if self.state_path is not None:
            self.state_path.unlink(missing_ok=True)

    def state(self) -> dict[str, Any]:
        """What `run/up.json` holds: the supervisor's pid, `info`, and each child's pid, URLs, state and restarts."""
        return {
            "pid": os.getpid(),
            "updated_at": time.time(),
            **self.info,
            "children": [
                {
                    "name": c.spec.name,
                    "pid": c.proc.pid if c.proc else None,
                    "url": c.spec.url,
                    "health_url": c.spec.health_url,
                    "state": c.state,
                    "restarts": c.restarts,
                    "last_exit": c.last_exit,
                    "log": str(self.log_path(c.spec.name)),
                }
                for c in self.children
            ],
        }

    def write_state(self) -> None:
        if self.state_path is not None:
            write_json_atomic(self.state_path, self.state())


def read_state(state_path: Path) -> dict[str, Any] | None:
    """The state file of a running `appliance up`, or None when none is running (no file, or its pid is gone)."""
    try:
        state = json.loads(Path(state_path).read_text(encoding="utf-8"))
    except (FileNotFoundError, ValueError):
        return None
    return state if pid_alive(int(state.get("pid", 0))) else None


def child_health(state: dict[str, Any]) -> list[dict[str, Any]]:
    """Each child of a state file with `alive` (its pid exists) and `healthy` (its health URL answers 2xx now)."""
    out = []
    for c in state.get("children", []):
        alive = bool(c.get("pid")) and pid_alive(int(c["pid"]))
        healthy = alive and (c.get("health_url") is None or http_ok(c["health_url"]))
        out.append({**c, "alive": alive, "healthy": healthy})
    return out


# -- the appliance's own children ------------------------------------------------------------------------------------

OPTIONAL_PARTS = ("router", "coordinator", "console", "cluster")


def appliance_children(
    settings: Any, model: str, python: str, *, config_file: Path | None = None, without: frozenset[str] = frozenset()
) -> list[ChildSpec]:
    """The processes of `appliance up` for `settings`: local workers, then the router, coordinator and console.

    Args:
        settings: the effective ApplianceSettings.
        model: the prepared model's store name.
        python: the interpreter that runs `-m fedllm.appliance`.
        config_file: the YAML file `up` was given, passed on to every child.
        without: names of optional children to leave out ("router", "coordinator", "console"; "cluster" is
            `cluster_children`'s).

    Raises:
        ConfigError: `without` names something that is not optional.
    """
    unknown = set(without) - set(OPTIONAL_PARTS)
    if unknown:
        raise ConfigError(
            f"cannot leave out {', '.join(sorted(unknown))}: only {', '.join(OPTIONAL_PARTS)} are optional"
        )
    env = {"APPLIANCE_HOME": str(settings.home)}
    if config_file is not None:
        env["APPLIANCE_CONFIG"] = str(config_file)
    run = [python, "-m", "fedllm.appliance"]
    children = _worker_children(settings, model, run, env)
    if "router" not in without:
        children.append(_router_child(settings, model, run, env, depends_on=tuple(c.name for c in children)))
    if "coordinator" not in without:
        children.append(_coordinator_child(settings, run, env))
    if "console" not in without:
        children.append(
            _console_child(
                settings,
                run,
                env,
                with_coordinator="coordinator" not in without,
                depends_on=tuple(c.name for c in children if c.name in ("router", "coordinator")),
            )
        )
    return children


def worker_key_file(settings: Any, port: int) -> Path:
    """The file holding the API key of the local worker on `port`, made once (mode 0600) under `keys/`."""
    ensure_token(settings.keys_dir, f"worker_{port}_api_key")
    return settings.keys_dir / f"worker_{port}_api_key"


def _worker_children(settings: Any, model: str, run: list[str], env: dict[str, str]) -> list[ChildSpec]:
    """`worker-N`: `appliance worker start` on consecutive ports from `worker.base_port`, each with its own API key."""
    w = settings.worker
    return [
        ChildSpec(
            name=f"worker-{i}",
            argv=[
                *run,
                "worker",
                "start",
                "--model",
                model,
                "--port",
                str(port),
                "--device",
                w.device,
                "--api-key-file",
                str(worker_key_file(settings, port)),
            ],
            health_url=f"http://127.0.0.1:{port}/health",
            ports=(port,),
            url=f"http://127.0.0.1:{port}/v1",
            ready_timeout_s=w.startup_timeout_s,
            env=env,
        )
        for i, port in enumerate(range(w.base_port, w.base_port + w.count))
    ]


def _router_child(
    settings: Any, model: str, run: list[str], env: dict[str, str], depends_on: tuple[str, ...]
) -> ChildSpec:
    """`router`: `appliance serve`, told about the local workers (with their API keys, in its environment only)
    beside the configured `serve.workers`."""
    s, w = settings.serve, settings.worker
    static = [
        {**ws.model_dump(exclude={"api_key"}), "api_key": ws.api_key.get_secret_value() if ws.api_key else None}
        for ws in s.workers
    ]
    local = [
        {
            "url": f"http://127.0.0.1:{port}",
            "region": w.region,
            "models": [model],
            "max_loras": w.max_loras,
            "api_key": ensure_token(settings.keys_dir, f"worker_{port}_api_key"),
        }
        for port in range(w.base_port, w.base_port + w.count)
    ]
    return ChildSpec(
        name="router",
        argv=[*run, "serve", "--host", s.host, "--port", str(s.port)],
        health_url=f"{s.scheme}://127.0.0.1:{s.port}/health",
        ports=(s.port,),
        host=s.host,
        url=f"{s.scheme}://{connectable_host(s.host)}:{s.port}/v1",
        depends_on=depends_on,
        env={**env, "APPLIANCE_SERVE__WORKERS": json.dumps(static + local)},
    )


def _coordinator_child(settings: Any, run: list[str], env: dict[str, str]) -> ChildSpec:
    """`coordinator`: `appliance coordinator start` (optional: a failed start is retried with backoff)."""
    f = settings.federation
    return ChildSpec(
        name="coordinator",
        argv=[*run, "coordinator", "start", "--stay"],
        health_url=f"{f.scheme}://127.0.0.1:{f.status_port}/health",
        ports=tuple(p for p in (f.port, f.status_port) if p),
        host=f.bind_host,
        url=f"tcp://{connectable_host(f.bind_host)}:{f.port} (status {f.scheme}://127.0.0.1:{f.status_port}/status)",
        env=env,
        optional=True,
    )


def _console_child(
    settings: Any, run: list[str], env: dict[str, str], *, with_coordinator: bool, depends_on: tuple[str, ...]
) -> ChildSpec:
    """`console`: `appliance ui`, pointed at the local router (and coordinator, when `up` runs one)."""
    u = settings.ui
    argv = [
        *run,
        "ui",
        "--host",
        u.host,
        "--port",
        str(u.port),
        "--router-url",
        f"{settings.serve.scheme}://127.0.0.1:{settings.serve.port}",
    ]
    if with_coordinator:
        argv += ["--coordinator-url", f"{settings.federation.scheme}://127.0.0.1:{settings.federation.status_port}"]
    return ChildSpec(
        name="console",
        argv=argv,
        health_url=f"{u.scheme}://127.0.0.1:{u.port}/",
        ports=(u.port,),
        host=u.host,
        url=f"{u.scheme}://{connectable_host(u.host)}:{u.port}",
        depends_on=depends_on,
        ready_timeout_s=120.0,
        env=env,
        optional=True,
    )


def cluster_children(
    settings: Any, python: str, *, config_file: Path | None = None, without: frozenset[str] = frozenset()
) -> list[ChildSpec]:
    """`cluster`: the Ray head and its job queue (`appliance cluster head`, see appliance/cluster/), so that
    `appliance job submit` works once `up` runs; none when left out, when `cluster.enabled` is off, or when
    `cluster.address` names a head elsewhere. Optional: a head that fails to start is retried, the rest runs on."""
    c = settings.cluster
    if "cluster" in without or not c.enabled or c.address:
        return []
    env = {"APPLIANCE_HOME": str(settings.home), **({"APPLIANCE_CONFIG": str(config_file)} if config_file else {})}
    return [
        ChildSpec(
            name="cluster",
            argv=[python, "-m", "fedllm.appliance", "cluster", "head"],
            # the head node and its job agent are up
            health_url=f"http://127.0.0.1:{c.agent_port}/api/local_raylet_healthz",
            ports=(c.port, c.dashboard_port, c.client_server_port, c.agent_port),
            url=(
                f"ray://{connectable_host(c.host)}:{c.port} (jobs: `appliance job submit`; nodes join with "
                "keys/ray_token)"
            ),
            ready_timeout_s=c.start_timeout_s,
            env=env,
            optional=True,
        )
    ]
