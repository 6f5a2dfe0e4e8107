"""Fixtures for the router tests: fake OpenAI backends as real processes on loopback, and the router itself."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Iterator

import httpx
import pytest

from fedllm.testing.factories import REPO, free_port


@dataclass
class FakeProcess:
    """A fake backend running as its own process."""

    url: str
    model: str
    proc: subprocess.Popen

    def control(self, **changes) -> dict:
        """Change its failure injection at run time."""
        return httpx.post(f"{self.url}/fake/control", json=changes, timeout=5).json()

    def received(self) -> list[dict]:
        """The requests it received so far."""
        return httpx.get(f"{self.url}/fake/requests", timeout=5).json()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=10)


def wait_http(url: str, timeout_s: float = 20.0, proc: subprocess.Popen | None = None) -> None:
    """Wait until `url` answers any HTTP status, or fail (quoting the exit code of `proc` if it died)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process for {url} exited with {proc.returncode}")
        try:
            httpx.get(url, timeout=1)
            return
        except httpx.HTTPError:
            time.sleep(0.05)
    raise TimeoutError(f"{url} did not answer within {timeout_s} s")


def start_fake(model: str = "fake", *args: str, api_key: str | None = None) -> FakeProcess:
    """Start `python -m fedllm.testing.fake_vllm` on a free port and wait until it answers (with `api_key` as vLLM's
    VLLM_API_KEY: every /v1 call then needs it)."""
    port = free_port()
    env = {**os.environ, "VLLM_API_KEY": api_key or ""}
    proc = subprocess.Popen(
        [sys.executable, "-m", "fedllm.testing.fake_vllm", "--port", str(port), "--model", model, "--name", f"fake-{port}", *args],
        cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_http(f"{url}/health", proc=proc)
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    return FakeProcess(url, model, proc)


@pytest.fixture
def fake_factory() -> Iterator:
    """A function that starts fake backends; all are stopped at the end of the test."""
    started: list[FakeProcess] = []

    def make(model: str = "fake", *args: str, api_key: str | None = None) -> FakeProcess:
        fake = start_fake(model, *args, api_key=api_key)
        started.append(fake)
        return fake

    yield make
    for fake in started:
        fake.stop()


@dataclass
class RunningRouter:
    """The router served by uvicorn inside the test's event loop, on a free loopback port."""

    url: str
    app: object
    admin_token: str
    join_token: str

    def admin_headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.admin_token}"}


@pytest.fixture
async def router_factory(tmp_path):
    """An async function `(workers=[FakeProcess|url...], *, home, tls_ca_file, **serve_overrides) -> RunningRouter`;
    all are stopped after."""
    import asyncio

    import uvicorn

    from fedllm.serve import create_app
    from fedllm.testing.factories import make_settings

    servers: list[tuple[uvicorn.Server, asyncio.Task]] = []

    async def make(workers=(), *, home=None, tls_ca_file=None, **serve_overrides) -> RunningRouter:
        specs = [{"url": w if isinstance(w, str) else w.url, "region": "local"} if not isinstance(w, dict) else w for w in workers]
        port = free_port()
        overrides = {"workers": specs, "health_interval_s": 0.5, "retry_backoff_s": 0.01, "port": port, **serve_overrides}
        top = {"tls_ca_file": str(tls_ca_file)} if tls_ca_file else {}
        settings = make_settings(home or tmp_path / f"home{len(servers)}", serve=overrides, **top)
        app = create_app(settings)
        server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on"))
        task = asyncio.create_task(server.serve())
        servers.append((server, task))
        for _ in range(400):
            if server.started:
                break
            if task.done():
                task.result()
            await asyncio.sleep(0.01)
        else:
            raise TimeoutError("router did not start")
        return RunningRouter(f"http://127.0.0.1:{port}", app, app.state.admin_token, app.state.join_token)

    yield make
    for server, task in servers:
        server.should_exit = True
    for server, task in servers:
        await asyncio.wait_for(task, 15)
