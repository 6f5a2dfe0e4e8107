"""Real services for end-to-end console and closed-loop tests: the router as an `appliance serve` process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

from fedllm.testing.factories import REPO, free_port
from tests.ui.conftest import stop_process


@dataclass
class RouterProcess:
    url: str
    process: subprocess.Popen
    log: Path

    def stop(self) -> None:
        stop_process(self.process)


def start_router(home: Path, workers: list[dict], admin_token: str, timeout_s: float = 120.0) -> RouterProcess:
    """`appliance serve` on 127.0.0.1:<free port> in front of `workers` (`serve.workers` entries: url, api_key);
    waits for /health and a model."""
    home.mkdir(parents=True, exist_ok=True)
    port = free_port()
    log = home / "router.log"
    env = {**os.environ, "APPLIANCE_HOME": str(home), "APPLIANCE_SERVE__ADMIN_TOKEN": admin_token,
           "APPLIANCE_SERVE__WORKERS": json.dumps(workers),
           "APPLIANCE_SERVE__HEALTH_INTERVAL_S": "1.0"}
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "fedllm.appliance", "serve", "--host", "127.0.0.1", "--port", str(port)],
                                cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"router exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            if httpx.get(f"{url}/v1/models", timeout=2).json().get("data"):
                return RouterProcess(url, proc, log)
        except (httpx.HTTPError, ValueError):
            pass
        time.sleep(0.3)
    stop_process(proc)
    raise RuntimeError(f"router did not serve a model within {timeout_s} s:\n{log.read_text()[-3000:]}")
