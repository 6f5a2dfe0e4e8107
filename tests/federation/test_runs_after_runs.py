"""Runs after runs (federation/runtime/runs.py): `appliance coordinator start --stay` (what `appliance up` runs) keeps serving
an ended run's status (phase finished) and the console's "Start next run" starts the next one in the same process."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import time

import httpx
import pytest
import yaml

from fedllm.federation.runtime.silo import EngineTrainer, SiloClient
from fedllm.testing.factories import REPO, free_port, make_settings

pytestmark = pytest.mark.slow  # the CLI coordinator and a silo training the tiny model, twice

TRAIN = {"max_seq_len": 64, "batch_size": 2, "warmup_steps": 0, "zero_stage": 0}
ROWS = [{"text": f"ticket {i} goes to the billing queue"} for i in range(4)]


def _status(url: str) -> dict:
    try:
        return httpx.get(url, timeout=5).json()
    except (httpx.HTTPError, ValueError):
        return {}


async def _until(check, timeout_s: float = 120.0):
    deadline = time.monotonic() + timeout_s
    while not (value := await asyncio.to_thread(check)):
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.3)
    return value


async def _one_silo_run(port: int, tmp_path, tiny_model_dir, name: str) -> None:
    settings = make_settings(tmp_path / name, train=TRAIN, federation={
        "coordinator": f"tcp://127.0.0.1:{port}", "plaintext": True, "silo_id": "clinic", "heartbeat_interval_s": 0.5})
    silo = SiloClient(settings, EngineTrainer(settings.train, tiny_model_dir, ROWS))
    await silo.start()
    try:
        await asyncio.wait_for(silo.finished.wait(), 300)
    finally:
        await silo.stop()


async def test_an_ended_run_keeps_its_status_and_the_console_starts_the_next(tmp_path, tiny_model_dir):
    from fedllm.ui.context import ConsoleContext
    from fedllm.ui.tabs import federation as tab

    home = tmp_path / "coord"
    settings = make_settings(home)
    settings.models_dir.mkdir(parents=True, exist_ok=True)
    (settings.models_dir / settings.model).symlink_to(tiny_model_dir, target_is_directory=True)
    status_port, port = free_port(), free_port()
    config = home / "config.yaml"
    config.write_text(yaml.safe_dump({"federation": {"status_port": status_port, "auto_publish": False,
                                                     "heartbeat_interval_s": 0.5}, "train": TRAIN}))
    status_url = f"http://127.0.0.1:{status_port}/status"
    proc = subprocess.Popen([sys.executable, "-m", "fedllm.appliance", "--home", str(home), "--config", str(config), "coordinator",
                             "start", "--stay", "--plaintext", "--port", str(port), "--rounds", "1", "--min-silos", "1",
                             "--local-steps", "1", "--run", "after"], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        await _one_silo_run(port, tmp_path, tiny_model_dir, "silo1")
        first = await _until(lambda: (s := _status(status_url)).get("phase") == "finished" and s)
        assert proc.poll() is None, "the coordinator must not exit after its last round"
        assert first["ended"] == "done" and first["completed_rounds"] == 1 and first["run"] == "after"

        refused = httpx.post(f"http://127.0.0.1:{status_port}/runs/next", json={}, timeout=5)
        assert refused.status_code == 401  # starting work needs the status token
        bad = httpx.post(f"http://127.0.0.1:{status_port}/runs/next", json={"rounds": "two"}, timeout=5,
                         headers={"Authorization": f"Bearer {(home / 'keys' / 'status_token').read_text().strip()}"})
        assert bad.status_code == 400 and "rounds must be a whole number" in bad.json()["error"]

        ctx = ConsoleContext.from_settings(make_settings(home, ui={"coordinator_url": f"http://127.0.0.1:{status_port}"}))
        assert "finished (done)" in tab.refresh(ctx)[1]
        message = await asyncio.to_thread(tab.on_next_run, ctx, "", 1, "fedavg", 1, 1)
        assert message == "Started run `after` (up to round 2).", message

        await _one_silo_run(port, tmp_path, tiny_model_dir, "silo2")
        second = await _until(lambda: (s := _status(status_url)).get("phase") == "finished" and s.get("completed_rounds") == 2 and s)
        assert [r["round"] for r in second["rounds"]] == [1, 2] and second["ended"] == "done"
        busy = await asyncio.to_thread(tab.on_next_run, ctx, "other", 1, "nope", 1, 1)
        assert busy.startswith("⚠️") and "strategy" in busy  # a bad strategy is named, nothing starts
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        out, _ = await asyncio.to_thread(proc.communicate, timeout=60)
    assert proc.returncode == 0, out
