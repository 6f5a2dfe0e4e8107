"""A command whose optional part (an extra) is not installed names the extra and the pip command, and exits 1; the
base commands run without any extra. A missing package is simulated in a fresh interpreter by `sys.modules[name] =
None`, which makes both `import name` and `importlib.util.find_spec(name)` see it as absent."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from fedllm.appliance.extras import EXTRA_MODULES, MissingExtra, missing_modules, require

ROOT = Path(__file__).resolve().parents[2]
HEAVY = ("torch", "transformers", "peft", "deepspeed", "vllm", "gradio", "matplotlib", "fastapi", "ray", "aiohttp",
         "datasets", "uvicorn", "httptools", "prometheus_client", "openai", "safetensors")

RUNNER = """
import sys
for name in sys.argv[1].split(","):
    if name:
        sys.modules[name] = None
from fedllm.appliance.cli import app
app(sys.argv[2:], prog_name="appliance")
"""


def run_cli(blocked: tuple[str, ...], *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "COLUMNS": "300"}
    return subprocess.run([sys.executable, "-c", RUNNER, ",".join(blocked), *args], capture_output=True, text=True,
                          timeout=120, env=env, cwd=ROOT)


def test_require_names_the_extra_and_the_modules(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "gradio", None)
    assert missing_modules("console") == ["gradio"]
    with pytest.raises(MissingExtra, match=r"`appliance ui` needs the `console` extra.*missing: gradio.*fedllm-appliance\[console\]"):
        require("console", for_what="`appliance ui`")


def test_require_passes_when_installed() -> None:
    require("router", "silo", for_what="this test")  # the test environment has `[all]`
    assert all(missing_modules(extra) == [] for extra in EXTRA_MODULES)


@pytest.mark.parametrize("blocked, args, expected", [
    (("vllm",), ["worker", "start"], r"fedllm-appliance[worker,cpu]"),
    (("fastapi",), ["serve"], r"fedllm-appliance[router]"),
    (("gradio",), ["ui"], r"fedllm-appliance[console]"),
    (("deepspeed",), ["train", "--data", "x.jsonl"], r"fedllm-appliance[silo]"),
    (("ray",), ["node", "ls"], r"fedllm-appliance[cluster]"),
    (("aiohttp",), ["coordinator", "start"], r"fedllm-appliance[coordinator]"),
    (("httptools",), ["worker", "join", "--router", "http://127.0.0.1:9"], r"fedllm-appliance[worker,cpu]"),
    (("gradio",), ["up"], r"fedllm-appliance[console]"),
])
def test_command_without_its_extra_names_it(blocked: tuple[str, ...], args: list[str], expected: str) -> None:
    done = run_cli(blocked, *args)
    assert done.returncode == 1, done.stdout + done.stderr
    message = " ".join(done.stderr.split())
    assert expected in message and "missing: " + blocked[0] in message, message
    assert "Traceback" not in done.stderr


def test_silo_join_without_training_engine(tmp_path: Path) -> None:
    data = tmp_path / "d.jsonl"
    data.write_text('{"text": "x"}\n')
    done = run_cli(("torch", "deepspeed"), "silo", "join", "--coordinator", "tcp://127.0.0.1:9", "--data", str(data))
    assert done.returncode == 1
    message = " ".join(done.stderr.split())
    assert "`appliance silo join` needs the `silo` extra" in message and "missing: torch, deepspeed" in message


def test_base_commands_run_without_any_extra(tmp_path: Path) -> None:
    """The base install: help, settings, federation keys and the router's API keys, with every heavy package absent."""
    assert run_cli(HEAVY, "--help").returncode == 0
    shown = run_cli(HEAVY, "config", "show")
    assert shown.returncode == 0 and "home:" in shown.stdout, shown.stderr
    keys = run_cli(HEAVY, "federation", "init")
    assert keys.returncode == 0, keys.stderr
    created = run_cli(HEAVY, "keys", "create", "--name", "alice")
    assert created.returncode == 0, created.stderr
    silo_key = run_cli(HEAVY, "silo", "keygen")
    assert silo_key.returncode == 0, silo_key.stderr
