"""A serving fleet across the bed's regions, brought up with the product's own commands.

The router runs `appliance serve` in its region, bound to that region's address (so API keys are required, as on a
real public bind). Each worker region runs a backend (the fast fake OpenAI backend, or real vLLM) and joins it with
`appliance worker join`, exactly as the README tells a GPU owner: the join token in `APPLIANCE_JOIN_TOKEN`, the
worker's region, and `--advertise` set to the address the router reaches it by (here: the bed's link).
"""

from __future__ import annotations

import json
import logging
import secrets
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedllm.core.secrets import ensure_token
from fedllm.testbed.bed import Bed

logger = logging.getLogger(__name__)

FAKE_MODEL = "geo-fake"
CHECKOUT = Path(__file__).resolve().parents[1]  # holds testing/ (the fake worker) next to testbed/


def appliance_argv(*args: str) -> list[str]:
    """`python -m fedllm.appliance ARGS` with this interpreter (the console script may not be on PATH)."""
    return [sys.executable, "-m", "fedllm.appliance", *args]


@dataclass
class FleetWorker:
    """A worker of the fleet: where it runs and how the router and the test reach it."""

    name: str
    region: str
    port: int
    url: str  # the backend's own URL, inside its region
    advertised: str  # the URL the router uses (through the bed's link)


@dataclass
class GeoFleet:
    """Router + workers on a `Bed`. Call `start_router()`, then `add_fake_worker()` / `add_vllm_worker()`.

    Args:
        bed: the test bed (already started).
        router_region: where the router runs.
        home: the router's APPLIANCE_HOME (tokens, keys, logs).
        serve_env: extra `APPLIANCE_SERVE__*` settings for the router, e.g. {"HEALTH_INTERVAL_S": "1"}.
    """

    bed: Bed
    router_region: str
    home: Path
    serve_env: dict[str, str] = field(default_factory=dict)
    workers: dict[str, FleetWorker] = field(default_factory=dict)
    api_key: str = ""
    router_port: int = 0

    @property
    def admin_token(self) -> str:
        return ensure_token(self.home / "keys", "admin_token")

    @property
    def join_token(self) -> str:
        return ensure_token(self.home / "keys", "join_token")

    def _router_env(self) -> dict[str, str]:
        # Every worker of this fleet joins and no trusted (static) worker serves their model, so nothing could check
        # them: the test bed allows unverified models (serve.allow_unverified) unless serve_env says otherwise. Its
        # links are plain HTTP between simulated regions (no certificates): the operator's explicit opt-in.
        env = {
            "APPLIANCE_HOME": str(self.home),
            "APPLIANCE_SERVE__ALLOW_UNVERIFIED": "true",
            "APPLIANCE_SERVE__ALLOW_PLAIN_HTTP_WORKERS": "true",
        }
        env.update({f"APPLIANCE_SERVE__{k.upper()}": str(v) for k, v in self.serve_env.items()})
        return env

    def start_router(self, timeout_s: float = 180.0) -> str:
        """Create an API key (`appliance keys create`) and start `appliance serve` in the router's region."""
        import subprocess

        self.home.mkdir(parents=True, exist_ok=True)
        self.admin_token, self.join_token  # noqa: B018 - create both tokens before the router reads them
        out = subprocess.run(
            appliance_argv("keys", "create", "--name", "geo-clients"),
            env=_env(self._router_env()),
            capture_output=True,
            text=True,
            check=True,
        )
        self.api_key = out.stdout.strip().splitlines()[-1].strip()
        self.router_port = self.bed.free_port(self.router_region)
        self.bed.spawn(
            self.router_region,
            "router",
            appliance_argv("serve", "--host", self.bed.address(self.router_region), "--port", str(self.router_port)),
            env=self._router_env(),
        )
        self.wait(lambda: self.admin("GET", "/health") is not None, timeout_s, "the router to answer /health", "router")
        return self.router_url(self.router_region)

    def router_url(self, client_region: str) -> str:
        """The router's base URL as seen from `client_region` (through the bed's link)."""
        return self.bed.url(client_region, self.router_region, self.router_port)

    def add_fake_worker(
        self, region: str, name: str | None = None, *fake_args: str, join_args: tuple[str, ...] = ()
    ) -> FleetWorker:
        """Start the fake vLLM worker in `region` with its own API key (`VLLM_API_KEY`, as vLLM reads it) and join it
        with `appliance worker join --url ... --advertise ...` (the key in the same variable)."""
        if not (CHECKOUT / "testing" / "fake_vllm.py").exists():
            raise FileNotFoundError(
                f"the fake vLLM worker (testing/fake_vllm.py) is not in {CHECKOUT}: the test bed's fake "
                "workers need the appliance's `testing` package next to `testbed`"
            )
        name = name or f"fake-{region}"
        port = self.bed.free_port(region)
        url = f"http://{self.bed.address(region)}:{port}"
        key = {"VLLM_API_KEY": secrets.token_urlsafe(24)}
        self.bed.spawn(
            region,
            name,
            [
                sys.executable,
                "-m",
                "fedllm.testing.fake_vllm",
                "--host",
                self.bed.address(region),
                "--port",
                str(port),
                "--model",
                FAKE_MODEL,
                "--name",
                name,
                *fake_args,
            ],
            env=key,
            cwd=CHECKOUT,
        )
        self.wait(
            lambda: self.bed.call(region, lambda: _http_status(f"{url}/health")) == 200, 120, f"{name} to answer", name
        )
        return self._join(region, name, port, url, ["--url", url, *join_args], key)

    def add_vllm_worker(
        self, region: str, model_dir: Path, name: str | None = None, extra_env: dict[str, str] | None = None
    ) -> FleetWorker:
        """Start and join a real vLLM worker with `appliance worker join --model DIR --host ADDR --port P --advertise
        URL`."""
        name = name or f"vllm-{region}"
        port = self.bed.free_port(region)
        url = f"http://{self.bed.address(region)}:{port}"
        args = ["--model", str(model_dir), "--host", self.bed.address(region), "--port", str(port)]
        return self._join(region, name, port, url, args, extra_env)

    def _join(
        self, region: str, name: str, port: int, url: str, args: list[str], extra_env: dict[str, str] | None = None
    ) -> FleetWorker:
        advertised = self.bed.url(self.router_region, region, port)
        worker_home = self.home.parent / f"home-{name}"
        self.bed.spawn(
            region,
            f"join-{name}",
            appliance_argv(
                "worker",
                "join",
                "--router",
                self.bed.url(region, self.router_region, self.router_port),
                "--region",
                region,
                "--advertise",
                advertised,
                "--heartbeat-s",
                "2",
                *args,
            ),
            # The bed's private network is plain HTTP: the join token may cross it (the README's worker uses https).
            env={
                "APPLIANCE_HOME": str(worker_home),
                "APPLIANCE_JOIN_TOKEN": self.join_token,
                "APPLIANCE_ALLOW_PLAIN_HTTP": "true",
                **(extra_env or {}),
            },
        )
        worker = FleetWorker(name, region, port, url, advertised)
        self.workers[name] = worker
        return worker

    def wait_healthy(self, names: list[str] | None = None, timeout_s: float = 180.0) -> list[dict[str, Any]]:
        """Wait until the router lists the named workers (default: all) as healthy; returns the worker rows."""
        wanted = {self.workers[n].advertised for n in (names or list(self.workers))}
        rows: list[dict[str, Any]] = []

        def ready() -> bool:
            nonlocal rows
            rows = self.admin("GET", "/admin/workers") or []
            return wanted <= {r["url"] for r in rows if r["healthy"]}

        self.wait(
            ready, timeout_s, f"workers {sorted(wanted)} to be healthy", *[f"join-{n}" for n in names or self.workers]
        )
        return rows

    def row(self, name: str) -> dict[str, Any] | None:
        """The router's row for worker `name`, or None if it does not list it."""
        url = self.workers[name].advertised
        return next((r for r in self.admin("GET", "/admin/workers") or [] if r["url"] == url), None)

    def admin(self, method: str, path: str, body: Any = None) -> Any:
        """An admin call made from inside the router's region; None if the router does not answer."""
        url = f"http://{self.bed.address(self.router_region)}:{self.router_port}{path}"
        return self.bed.call(self.router_region, lambda: _json_call(method, url, self.admin_token, body))

    def wait(self, ready, timeout_s: float, what: str, *logs: str) -> None:
        """Poll `ready()` until true; on timeout raise with the tails of the named processes' logs."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if ready():
                return
            time.sleep(0.2)
        tails = "\n".join(f"--- {n}.log\n{self.bed.log(n)[-2000:]}" for n in logs)
        raise TimeoutError(f"timed out after {timeout_s:.0f} s waiting for {what}\n{tails}")


def _env(extra: dict[str, str]) -> dict[str, str]:
    import os

    return {**os.environ, **extra}


def _http_status(url: str) -> int | None:
    try:
        with urllib.request.urlopen(url, timeout=2) as resp:
            return resp.status
    except urllib.error.HTTPError as exc:
        return exc.code
    except (urllib.error.URLError, OSError):
        return None


def _json_call(method: str, url: str, token: str, body: Any = None) -> Any:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(
        url, data=data, method=method, headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            raw = resp.read()
    except (urllib.error.URLError, OSError):
        return None
    return json.loads(raw) if raw.strip() else {}
