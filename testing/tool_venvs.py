"""Virtualenvs of outside tools that the tests and benches drive as their users would (MLflow, lm-evaluation-harness,
Flower).

Each lives in `.cache/venvs/NAME` (gitignored), created once with pip from the package registry and reused; none is
a dependency of the appliance. `tool_venv` fails the test, naming the log, if pip cannot install the tool;
`build_tool_venv` (for benches) raises `RuntimeError` instead.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from fedllm.testing.factories import TEST_CACHE


def build_tool_venv(name: str, *requirements: str, timeout_s: float = 1800) -> Path:
    """The folder of virtualenv `name` with `requirements` installed (created on first use; an existing one whose
    marker lists other requirements gets them installed on top).

    Raises:
        RuntimeError: the venv could not be made or pip could not install `requirements` (names the install log).
    """
    venv = TEST_CACHE / "venvs" / name
    marker = venv / ".installed"
    wanted = " ".join(requirements) + "\n"
    if marker.exists() and marker.read_text() == wanted:
        return venv
    venv.parent.mkdir(parents=True, exist_ok=True)
    log = venv.parent / f"{name}.install.log"
    with open(log, "w") as out:
        try:
            if not (venv / "bin" / "pip").exists():
                subprocess.run(
                    [sys.executable, "-m", "venv", "--clear", str(venv)],
                    check=True,
                    stdout=out,
                    stderr=out,
                    timeout=120,
                )
            subprocess.run(
                [str(venv / "bin" / "pip"), "install", "-q", *requirements],
                check=True,
                stdout=out,
                stderr=out,
                timeout=timeout_s,
            )
        except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as exc:
            raise RuntimeError(f"could not install {' '.join(requirements)} into {venv} ({exc}); see {log}") from exc
    marker.write_text(wanted)
    return venv


def tool_venv(name: str, *requirements: str, timeout_s: float = 1800) -> Path:
    """`build_tool_venv` for a test: a failed install fails the test with the error."""
    import pytest

    try:
        return build_tool_venv(name, *requirements, timeout_s=timeout_s)
    except RuntimeError as exc:
        pytest.fail(str(exc))
