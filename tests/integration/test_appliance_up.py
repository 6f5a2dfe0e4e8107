"""`appliance up` as a real process: real vLLM behind the router, the official openai client, a crash and a restart,
and a clean stop. Plus `appliance worker join` against a real router with a fake backend (no vLLM)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import httpx
import pytest

from fedllm.appliance.cluster.ray_env import spare_port
from fedllm.appliance.launcher import pid_alive, read_state
from fedllm.testing.factories import REPO, free_port, wait_until
from tests.integration.conftest import pids_with

MODEL = "smollm2-135m-instruct"


def _home_with_model(home: Path, model_dir: Path) -> Path:
    """A fresh APPLIANCE_HOME whose model store reuses the prepared embedded model (symlink, no conversion)."""
    (home / "models").mkdir(parents=True)
    (home / "models" / MODEL).symlink_to(model_dir)
    return home


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.mark.vllm
def test_appliance_up_serves_openai_restarts_a_killed_worker_and_stops_cleanly(tmp_path, embedded_model_dir):
    from openai import OpenAI

    home = _home_with_model(tmp_path / "home", embedded_model_dir)
    router_port, worker_port = free_port(), free_port()
    ray_tmp = Path(tempfile.mkdtemp(prefix="ray-", dir="/tmp"))
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("APPLIANCE_")},
        "APPLIANCE_HOME": str(home),
        "APPLIANCE_SERVE__PORT": str(router_port),
        "APPLIANCE_WORKER__BASE_PORT": str(worker_port),
        "APPLIANCE_WORKER__KV_CACHE_GIB": "1",
        "APPLIANCE_WORKER__MAX_LORAS": "1",
        "APPLIANCE_SERVE__HEALTH_INTERVAL_S": "1",
        # The Ray head `up` starts for `appliance job`, on ports of its own.
        "APPLIANCE_CLUSTER__PORT": str(spare_port()), "APPLIANCE_CLUSTER__DASHBOARD_PORT": str(spare_port()),
        "APPLIANCE_CLUSTER__CLIENT_SERVER_PORT": str(spare_port()), "APPLIANCE_CLUSTER__AGENT_PORT": str(spare_port()),
        "APPLIANCE_CLUSTER__TEMP_DIR": str(ray_tmp), "APPLIANCE_CLUSTER__NUM_CPUS": "1",
    }
    # The console and coordinator have their own tests; here they would only add start-up time.
    up = subprocess.Popen([sys.executable, "-m", "fedllm.appliance", "up", "--without", "console", "--without", "coordinator"],
                          cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    state_file = home / "run" / "up.json"
    try:
        def all_ready():
            assert up.poll() is None, f"appliance up exited with {up.returncode}: {up.stdout.read()}"
            state = read_state(state_file)
            return state if state and all(c["state"] == "ready" for c in state["children"]) else None

        state = wait_until(all_ready, 600, what="appliance up to report every child ready")
        assert [c["name"] for c in state["children"]] == ["worker-0", "router", "cluster"]
        # With no further step, a job runs on the head `up` started (its group: cluster.group, "local").
        submitted = subprocess.run([sys.executable, "-m", "fedllm.appliance", "job", "submit", "--name", "hello", "--program", "--",
                                    "echo", "hello from a job"], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
        assert submitted.returncode == 0, submitted.stdout + submitted.stderr

        def job_done():
            shown = subprocess.run([sys.executable, "-m", "fedllm.appliance", "job", "show", "hello", "--json"], cwd=REPO, env=env,
                                   capture_output=True, text=True, timeout=60)
            return shown.returncode == 0 and json.loads(shown.stdout)["state"] in ("SUCCEEDED", "FAILED") and json.loads(shown.stdout)

        assert wait_until(job_done, 120, what="the job to end")["state"] == "SUCCEEDED"
        logs = subprocess.run([sys.executable, "-m", "fedllm.appliance", "job", "logs", "hello"], cwd=REPO, env=env, capture_output=True, text=True)
        assert "hello from a job" in logs.stdout and '"group": "local"' in logs.stdout
        status = subprocess.run([sys.executable, "-m", "fedllm.appliance", "status"], cwd=REPO, env=env, capture_output=True, text=True)
        assert status.returncode == 0 and "healthy" in status.stdout, status.stdout + status.stderr

        client = OpenAI(base_url=f"http://127.0.0.1:{router_port}/v1", api_key="unused", timeout=120, max_retries=0)
        assert MODEL in [m.id for m in client.models.list()]
        # The worker `up` started has its own API key, which the router sends: reached directly without it, 401.
        assert httpx.get(f"http://127.0.0.1:{worker_port}/v1/models", timeout=10).status_code == 401
        assert pids_with(f"--port {worker_port}") and not pids_with((home / "keys" / f"worker_{worker_port}_api_key").read_text().strip())
        answer = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Say hello."}], max_tokens=16)
        assert answer.choices[0].message.content.strip() and answer.model == MODEL
        stream = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Count to five."}],
                                                max_tokens=16, stream=True)
        pieces = [chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices]
        assert len(pieces) > 1 and "".join(pieces).strip()

        # A crash: kill the worker process (and so its vLLM) hard; the supervisor restarts it, and it answers again.
        worker = state["children"][0]
        os.kill(worker["pid"], signal.SIGKILL)

        def restarted():
            s = read_state(state_file)
            w = s["children"][0] if s else {}
            return w.get("restarts") == 1 and w.get("state") == "ready" and w["pid"] != worker["pid"]

        wait_until(restarted, 600, what="the killed worker to be restarted and ready")
        wait_until(lambda: MODEL in [m.id for m in client.models.list()], 60, what="the router to see the worker again")
        again = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Say hi."}], max_tokens=8)
        assert again.choices[0].message.content.strip()

        children = [c["pid"] for c in read_state(state_file)["children"]]
        vllm = pids_with(f"--port {worker_port}")
        assert vllm, "the vLLM server of the worker should be running"
    finally:
        _stop(up)
        ray_left = pids_with(str(ray_tmp))
        shutil.rmtree(ray_tmp, ignore_errors=True)
    output = up.stdout.read()
    assert up.returncode == 0, output
    assert "admin token" in output and f"curl http://127.0.0.1:{router_port}/v1/chat/completions" in output
    assert "worker-0 exited with code -9; restarting it in" in output
    assert not [p for p in children + vllm if pid_alive(p)]
    assert not pids_with(f"--port {worker_port}") and not state_file.exists()
    assert not ray_left, "every Ray process of the head `up` started should be gone"


@pytest.mark.slow
def test_worker_join_registers_with_the_router_and_leaves_on_exit(tmp_path):
    from fedllm.core.secrets import ensure_token

    home = tmp_path / "home"
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("APPLIANCE_")}, "APPLIANCE_HOME": str(home)}
    join_token = ensure_token(home / "keys", "join_token")
    admin = {"Authorization": f"Bearer {ensure_token(home / 'keys', 'admin_token')}"}
    router_port, backend_port = free_port(), free_port()
    router_url, backend_url = f"http://127.0.0.1:{router_port}", f"http://127.0.0.1:{backend_port}"
    worker_key = {"VLLM_API_KEY": "joined-worker-key-0123456789"}  # a running worker joins with its key (the router requires one)
    procs = [
        # The joiner is the only worker: nothing can check its model, so the router is told to allow that.
        subprocess.Popen([sys.executable, "-m", "fedllm.appliance", "serve", "--port", str(router_port)], cwd=REPO,
                         env={**env, "APPLIANCE_SERVE__ALLOW_UNVERIFIED": "true"}),
        subprocess.Popen([sys.executable, "-m", "fedllm.testing.fake_vllm", "--port", str(backend_port), "--model", "joined-model"], cwd=REPO,
                         env={**env, **worker_key}),
    ]
    env = {**env, **worker_key}
    try:
        for url in (f"{router_url}/health", f"{backend_url}/health"):
            wait_until(lambda: _get(url) is not None, 60, 0.1, what=url)
        wrong = tmp_path / "wrong-token"
        wrong.write_text("wrong\n")
        bad = subprocess.run([sys.executable, "-m", "fedllm.appliance", "worker", "join", "--router", router_url, "--token-file", str(wrong),
                              "--url", backend_url], cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
        assert bad.returncode == 1 and "401" in bad.stderr + bad.stdout

        # The token travels in the environment, never on the command line (`ps` shows command lines).
        join = subprocess.Popen([sys.executable, "-m", "fedllm.appliance", "worker", "join", "--router", router_url,
                                 "--region", "eu-west", "--url", backend_url, "--heartbeat-s", "1"],
                                cwd=REPO, env={**env, "APPLIANCE_JOIN_TOKEN": join_token}, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)
        procs.append(join)
        wait_until(lambda: "joined-model" in [m["id"] for m in (_get(f"{router_url}/v1/models") or {}).get("data", [])],
                   60, 0.2, what="the joined worker's model in the router's /v1/models")
        workers = httpx.get(f"{router_url}/admin/workers", headers=admin, timeout=5).json()
        assert [(w["url"], w["region"]) for w in workers] == [(backend_url, "eu-west")]

        join.send_signal(signal.SIGTERM)
        assert join.wait(timeout=30) == 0, join.stdout.read()
        assert httpx.get(f"{router_url}/admin/workers", headers=admin, timeout=5).json() == []
    finally:
        for p in procs:
            _stop(p)


def _get(url: str) -> dict | None:
    """The JSON of a 200 answer ({} if it is not JSON), or None (no answer or another status)."""
    try:
        r = httpx.get(url, timeout=2)
    except httpx.HTTPError:
        return None
    if r.status_code != 200:
        return None
    try:
        return r.json()
    except ValueError:
        return {}
