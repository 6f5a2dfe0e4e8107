"""Fixtures of the console tests: the console as a real process on loopback, and headless Chromium."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from fedllm.testing.factories import REPO, free_port
from tests.ui.fakes import FakeRouter

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-quic", "--no-first-run", "--disable-sync"]
ARTIFACTS = REPO / "artifacts" / "ui"
ADMIN_TOKEN = "ui-test-admin-token-0123456789"


def _patient_expect() -> None:
    """Assertions wait up to 30 s (not 5): the machine is shared, and a page's first load can be slow under load."""
    from playwright.sync_api import expect

    expect.set_options(timeout=30_000)


_patient_expect()


@dataclass
class Console:
    url: str
    home: Path
    process: subprocess.Popen
    log: Path


def start_console(home: Path, router_url: str, coordinator_url: str, extra_env: dict[str, str] | None = None,
                  host: str = "127.0.0.1", scheme: str = "http", verify: Any = True) -> Console:
    """`appliance ui` as a real process on HOST:<free port>; waits until it answers (over `scheme`, checking its
    certificate with `verify`). The tabs' tests turn the loopback login off (`ui.require_login`); tests/ui/test_login.py
    tests it on."""
    home.mkdir(parents=True, exist_ok=True)
    port = free_port()
    log = home / "console.log"
    env = {**os.environ, "APPLIANCE_HOME": str(home), "APPLIANCE_SERVE__ADMIN_TOKEN": ADMIN_TOKEN,
           "APPLIANCE_UI__POLL_INTERVAL_S": "1.0", "GRADIO_ANALYTICS_ENABLED": "False", "APPLIANCE_UI__REQUIRE_LOGIN": "false",
           **(extra_env or {})}
    cmd = [sys.executable, "-m", "fedllm.appliance", "--home", str(home), "ui", "--host", host, "--port", str(port),
           "--router-url", router_url, "--coordinator-url", coordinator_url]
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"{scheme}://{host}:{port}"
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"console exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            if httpx.get(url, timeout=2, verify=verify).status_code == 200:
                return Console(url, home, proc, log)
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    stop_process(proc)
    raise RuntimeError(f"console did not answer within 90 s:\n{log.read_text()[-3000:]}")


def stop_process(proc: subprocess.Popen) -> None:
    """SIGTERM the process group, SIGKILL after 10 s."""
    if proc.poll() is not None:
        return
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)


@pytest.fixture(scope="session")
def fake_router() -> Iterator[FakeRouter]:
    router = FakeRouter(admin_token=ADMIN_TOKEN).start()
    yield router
    router.stop()


@pytest.fixture(scope="session")
def console(fake_router: FakeRouter, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Console]:
    """A console in front of the fake router; the coordinator URL points at a closed port (service down)."""
    home = tmp_path_factory.mktemp("console-home")
    c = start_console(home, fake_router.url, f"http://127.0.0.1:{free_port()}")
    yield c
    stop_process(c.process)


@pytest.fixture(scope="session")
def browser():
    if not CHROMIUM.exists():
        pytest.skip("Chromium is not installed: `apt-get install -y chromium` (the Makefile's `browser` target)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True)
        yield b
        b.close()


@pytest.fixture
def page(browser):
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    pg = context.new_page()
    pg.set_default_timeout(30_000)
    yield pg
    context.close()


def screenshot(page, name: str) -> Path:
    """Save a full-page PNG under artifacts/ui/ (git-ignored) and return its path."""
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    return path
