"""The systemd units in deploy/systemd/ are accepted by `systemd-analyze verify` (with the ExecStart pointed at this
environment's `appliance`), keep the home at a fixed path, run as the dedicated user, restart on failure, take
secrets from files, and start commands the CLI has."""

from __future__ import annotations

import configparser
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
UNITS = sorted((ROOT / "deploy" / "systemd").glob("fedllm-*.service"))
VENV_APPLIANCE = "/opt/fedllm/venv/bin/appliance"


def parse(path: Path) -> configparser.ConfigParser:
    parser = configparser.ConfigParser(strict=False, interpolation=None, delimiters=("=",))
    parser.optionxform = str  # keys are case-sensitive in systemd
    parser.read_string(path.read_text())
    return parser


def local_copy(unit: Path, tmp_path: Path) -> Path:
    """The unit with its ExecStart on this environment's `appliance` (verify checks that the binary exists)."""
    here = Path(sys.executable).parent / "appliance"
    if not here.exists():
        pytest.skip(f"no `appliance` script next to {sys.executable}")
    copy = tmp_path / unit.name
    copy.write_text(unit.read_text().replace(VENV_APPLIANCE, str(here)))
    return copy


def test_the_five_roles_have_units() -> None:
    assert [u.name for u in UNITS] == [f"fedllm-{r}.service" for r in ("console", "coordinator", "router", "silo", "worker")]


@pytest.mark.parametrize("unit", UNITS, ids=lambda u: u.stem)
def test_unit_is_accepted_by_systemd(unit: Path, tmp_path: Path) -> None:
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze is not installed")
    done = subprocess.run(["systemd-analyze", "verify", str(local_copy(unit, tmp_path))], capture_output=True, text=True)
    assert done.returncode == 0 and not done.stderr.strip(), done.stderr


def test_verify_rejects_a_broken_unit(tmp_path: Path) -> None:
    """The check above can fail: an unknown restart policy and a relative ExecStart are reported."""
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze is not installed")
    broken = local_copy(ROOT / "deploy" / "systemd" / "fedllm-router.service", tmp_path)
    broken.write_text(broken.read_text().replace("Restart=on-failure", "Restart=sometimes"))
    done = subprocess.run(["systemd-analyze", "verify", str(broken)], capture_output=True, text=True)
    assert "Failed to parse service restart specifier" in done.stderr


@pytest.mark.parametrize("unit", UNITS, ids=lambda u: u.stem)
def test_unit_settings(unit: Path) -> None:
    service = parse(unit)["Service"]
    assert service["User"] == "fedllm" and service["Restart"] == "on-failure"
    assert service["StateDirectory"] == "fedllm" and service["StateDirectoryMode"] == "0700"
    assert "APPLIANCE_HOME=/var/lib/fedllm" in unit.read_text() and service["UMask"] == "0077"
    for line in unit.read_text().splitlines():  # no secret value in a unit: tokens come from files
        if line.startswith("Environment="):
            assert not any(word in line.upper() for word in ("TOKEN", "PASSWORD", "SECRET", "API_KEY")), line
    argv = shlex.split(service["ExecStart"])
    assert argv[0] == VENV_APPLIANCE
    if "--token-file" in argv:
        assert argv[argv.index("--token-file") + 1].startswith("%d/") and "LoadCredential" in service


@pytest.mark.parametrize("unit", UNITS, ids=lambda u: u.stem)
def test_unit_starts_a_command_the_cli_has(unit: Path) -> None:
    """`appliance <subcommand> --help` answers for the unit's subcommand (its options are the ones the CLI has)."""
    argv = shlex.split(parse(unit)["Service"]["ExecStart"])[1:]
    words = [a for a in argv if not a.startswith("-") and not a.startswith("$") and not a.startswith("%")][:2]
    options = [a for a in argv if a.startswith("--")]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "COLUMNS": "300"}
    done = subprocess.run([sys.executable, "-m", "fedllm.appliance", *words, "--help"], capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr
    for option in options:
        assert option in done.stdout, f"{unit.name}: {option} is not an option of `appliance {' '.join(words)}`"
