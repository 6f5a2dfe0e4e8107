"""Runs after runs in headless Chromium: the Federation tab shows a real coordinator (`coordinator start --stay`, as
`appliance up` runs it) whose run has ended as finished, and its "Start next run" starts the next run there."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import threading
import time

import httpx
import pytest
import yaml
from playwright.sync_api import expect

from tests.ui.conftest import screenshot

pytestmark = [pytest.mark.browser, pytest.mark.slow]


def test_the_console_starts_the_next_run_of_a_finished_coordinator(page, tmp_path, tiny_model_dir):
    from fedllm.federation.runtime.silo import EngineTrainer, SiloClient
    from fedllm.testing.factories import REPO, free_port, make_settings
    from tests.ui.conftest import start_console, stop_process
    from tests.ui.fakes import FakeRouter

    home = tmp_path / "coord"
    settings = make_settings(home)
    settings.models_dir.mkdir(parents=True, exist_ok=True)
    (settings.models_dir / settings.model).symlink_to(tiny_model_dir, target_is_directory=True)
    status_port, port = free_port(), free_port()
    train = {"max_seq_len": 64, "batch_size": 2, "warmup_steps": 0, "zero_stage": 0}
    config = home / "config.yaml"
    config.write_text(yaml.safe_dump({"federation": {"status_port": status_port, "auto_publish": False,
                                                     "heartbeat_interval_s": 0.5}, "train": train}))
    proc = subprocess.Popen([sys.executable, "-m", "fedllm.appliance", "--home", str(home), "--config", str(config), "coordinator",
                             "start", "--stay", "--plaintext", "--port", str(port), "--rounds", "1", "--min-silos", "1",
                             "--local-steps", "1", "--run", "nextrun"], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    router = FakeRouter().start()
    console = None
    try:
        silo_settings = make_settings(tmp_path / "silo", train=train, federation={
            "coordinator": f"tcp://127.0.0.1:{port}", "plaintext": True, "silo_id": "clinic", "heartbeat_interval_s": 0.5})

        async def one_run() -> None:
            silo = SiloClient(silo_settings, EngineTrainer(silo_settings.train, tiny_model_dir,
                                                           [{"text": f"ticket {i} goes to billing"} for i in range(4)]))
            await silo.start()
            try:
                await asyncio.wait_for(silo.finished.wait(), 300)
            finally:
                await silo.stop()

        runner = threading.Thread(target=asyncio.run, args=(one_run(),))  # its own loop, off the browser's thread
        runner.start()
        runner.join(300)
        deadline = time.monotonic() + 60
        while httpx.get(f"http://127.0.0.1:{status_port}/status", timeout=5).json().get("phase") != "finished":
            assert time.monotonic() < deadline, "the coordinator did not finish its run"
            time.sleep(0.3)
        console = start_console(home, router.url, f"http://127.0.0.1:{status_port}")

        page.goto(console.url)
        page.get_by_role("tab", name="Federation").click()
        expect(page.locator("#fed-summary")).to_contain_text("finished (done)")
        page.locator("#fed-next-run").click()
        # the tab's Rounds field (federation.rounds, 10) more rounds of the same run, after its 1
        expect(page.locator("#fed-action")).to_contain_text("Started run nextrun (up to round 11)")
        deadline = time.monotonic() + 60
        while True:  # the next run's coordinator takes the status port over
            try:
                status = httpx.get(f"http://127.0.0.1:{status_port}/status", timeout=5).json()
                if status.get("phase") != "finished":
                    break
            except (httpx.HTTPError, ValueError):
                pass  # the port is between the old coordinator and the new one: poll again
            assert time.monotonic() < deadline, "the next run did not start"
            time.sleep(0.3)
        assert status["run"] == "nextrun" and status["rounds_total"] == 11 and status["completed_rounds"] == 1, status
        expect(page.locator("#fed-summary")).not_to_contain_text("finished")
        screenshot(page, "federation-next-run")
    finally:
        if console is not None:
            stop_process(console.process)
        router.stop()
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=60)
