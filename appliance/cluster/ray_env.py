"""What every Ray process and client of the appliance's cluster shares: the token file, the environment, the temp dir.

Ray reads its token from `RAY_AUTH_TOKEN_PATH` when `RAY_AUTH_MODE=token`; the token lives under `keys/ray_token`
(0600) and never appears on a command line or in a log.
"""

from __future__ import annotations

import os
from pathlib import Path

from fedllm.core.secrets import ensure_token, read_secret_file

TOKEN_NAME = "ray_token"


def token_path(keys_dir: Path) -> Path:
    """The cluster token's file under `keys_dir`, made once (mode 0600)."""
    ensure_token(keys_dir, TOKEN_NAME)
    return Path(keys_dir) / TOKEN_NAME


def read_token(path: Path) -> str:
    """The token held in `path` (first line).

    Raises:
        ConfigError: the file cannot be read or is empty.
    """
    return read_secret_file(path, "cluster token", f" (keys/{TOKEN_NAME} on the head)")


def ray_env(token_file: Path, base: dict[str, str] | None = None) -> dict[str, str]:
    """`base` (default: this process's environment) with token authentication on and usage stats off."""
    env = dict(os.environ if base is None else base)
    env.pop("RAY_AUTH_TOKEN", None)  # the file is the one source of the token
    env.update(
        {
            "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN_PATH": str(Path(token_file).resolve()),
            "RAY_USAGE_STATS_ENABLED": "0",
        }
    )
    return env


def ray_executable() -> str:
    """The `ray` command beside this interpreter (the venv's), else the one on PATH."""
    import shutil
    import sys

    beside = Path(sys.executable).with_name("ray")
    return str(beside) if beside.exists() else (shutil.which("ray") or "ray")


def spare_port(low: int = 20000, high: int = 32000) -> int:
    """A free TCP port between Ray's worker ports (10002-19999) and the kernel's ephemeral range (32768+), where
    Ray's own randomly bound ports do not land, so a port chosen now is still free when Ray binds it."""
    import random
    import socket

    for _ in range(200):
        port = random.randint(low, high)
        with socket.socket() as s:
            try:
                s.bind(("", port))
            except OSError:
                continue
            return port
    raise OSError(f"no free port between {low} and {high}")
