"""`appliance up` / `appliance status` at the command line, without starting vLLM."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from fedllm.appliance.cli import app
from fedllm.core.errors import ConfigError
from fedllm.appliance.launcher import appliance_children
from fedllm.testing.factories import REPO, free_port, make_settings


def test_children_in_dependency_order_with_the_router_told_about_local_workers(tmp_path):
    settings = make_settings(tmp_path, serve={"port": 9100}, worker={"count": 2, "base_port": 9200})

    children = appliance_children(settings, "m", "/py")

    names = [c.name for c in children]
    assert names[:3] == ["worker-0", "worker-1", "router"]
    w1 = children[1]
    assert w1.argv[:4] == ["/py", "-m", "fedllm.appliance", "worker"] and w1.argv[w1.argv.index("--port") + 1] == "9201"
    assert w1.health_url == "http://127.0.0.1:9201/health" and w1.ports == (9201,)
    router = children[2]
    assert router.depends_on == ("worker-0", "worker-1") and router.ports == (9100,)
    assert [w["url"] for w in json.loads(router.env["APPLIANCE_SERVE__WORKERS"])] == ["http://127.0.0.1:9200", "http://127.0.0.1:9201"]
    # Each local worker has its own API key: in a 0600 file it reads, and in the router's environment; never on argv.
    keys = [w["api_key"] for w in json.loads(router.env["APPLIANCE_SERVE__WORKERS"])]
    key_files = [c.argv[c.argv.index("--api-key-file") + 1] for c in children[:2]]
    assert len(set(keys)) == 2 and [open(f).read().strip() for f in key_files] == keys
    assert all(oct(os.stat(f).st_mode & 0o777) == "0o600" for f in key_files)
    assert not any(k in arg for k in keys for c in children for arg in c.argv)
    assert all(c.env["APPLIANCE_HOME"] == str(tmp_path) for c in children)
    assert names[3:] == ["coordinator", "console"]
    assert children[3].argv[3:] == ["coordinator", "start", "--stay"]  # an ended run keeps serving its status
    console = children[4]
    assert console.argv[3] == "ui" and console.depends_on == ("router", "coordinator")
    assert console.argv[console.argv.index("--router-url") + 1] == "http://127.0.0.1:9100"
    assert "--coordinator-url" in console.argv


def test_a_console_without_coordinator_is_not_pointed_at_one(tmp_path):
    settings = make_settings(tmp_path)

    console = appliance_children(settings, "m", "/py", without=frozenset({"coordinator"}))[-1]

    assert console.name == "console" and "--coordinator-url" not in console.argv and console.depends_on == ("router",)


def test_optional_parts_can_be_left_out_but_not_workers(tmp_path):
    settings = make_settings(tmp_path)
    names = [c.name for c in appliance_children(settings, "m", "/py", without=frozenset({"router", "console", "coordinator"}))]
    assert names == ["worker-0"]
    with pytest.raises(ConfigError, match="worker"):
        appliance_children(settings, "m", "/py", without=frozenset({"worker"}))


def test_status_when_nothing_runs(tmp_path):
    result = CliRunner().invoke(app, ["--home", str(tmp_path), "status"])
    assert result.exit_code == 3 and "not running" in result.output


def test_up_refuses_a_taken_port_before_starting_anything(tmp_path, embedded_model_dir):
    home = tmp_path / "home"
    (home / "models").mkdir(parents=True)
    (home / "models" / embedded_model_dir.name).symlink_to(embedded_model_dir)
    with socket.socket() as blocker:
        blocker.bind(("127.0.0.1", 0))
        blocker.listen()
        taken = blocker.getsockname()[1]
        env = {**os.environ, "APPLIANCE_HOME": str(home), "APPLIANCE_SERVE__PORT": str(taken),
               "APPLIANCE_WORKER__BASE_PORT": str(free_port()), "APPLIANCE_UI__PORT": str(free_port()),
               "APPLIANCE_FEDERATION__PORT": str(free_port()), "APPLIANCE_FEDERATION__STATUS_PORT": str(free_port())}

        result = subprocess.run([sys.executable, "-m", "fedllm.appliance", "up"], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)

    assert result.returncode == 1, result.stdout + result.stderr
    assert f"router needs 127.0.0.1:{taken}" in " ".join(result.stderr.split())
    assert not (home / "run" / "up.json").exists()
    assert not (home / "logs" / "worker-0.log").exists()  # nothing was started
