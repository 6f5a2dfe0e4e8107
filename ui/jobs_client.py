"""The console's view of the cluster: `appliance node|job` run as subprocesses (their `--json` output), so the
console needs neither Ray nor the appliance's top layer. Every failure becomes `ServiceUnavailable` naming the
command and its error line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from fedllm.core.contracts.router_client import ServiceUnavailable


class JobsClient:
    """Runs `python -m fedllm.appliance ...` against the appliance home `home`."""

    def __init__(self, home: Path, timeout_s: float = 60.0):
        self.home = Path(home)
        self.timeout_s = timeout_s

    def _run(self, *args: str) -> str:
        env = {**os.environ, "APPLIANCE_HOME": str(self.home)}
        try:
            done = subprocess.run(
                [sys.executable, "-m", "fedllm.appliance", *args],
                env=env,
                capture_output=True,
                text=True,
                timeout=self.timeout_s,
                cwd=str(Path(__file__).resolve().parents[1]),
            )
        except subprocess.TimeoutExpired as exc:
            raise ServiceUnavailable(
                f"`appliance {' '.join(args[:2])}` did not answer in {self.timeout_s:g} s"
            ) from exc
        if done.returncode != 0:
            lines = [ln.strip() for ln in (done.stderr or done.stdout).splitlines() if ln.strip()]
            message = " ".join(lines[-3:]).removeprefix("error: ") if lines else f"exit code {done.returncode}"
            raise ServiceUnavailable(f"`appliance {' '.join(args[:2])}`: {message}")
        return done.stdout

    def nodes(self) -> list[dict[str, Any]]:
        return json.loads(self._run("node", "ls", "--json"))

    def jobs(self) -> list[dict[str, Any]]:
        return json.loads(self._run("job", "ls", "--json"))

    def log_tail(self, job_id: str, lines: int = 40) -> str:
        return "\n".join(self._run("job", "logs", job_id).splitlines()[-lines:])

    def stop(self, job_id: str) -> str:
        return self._run("job", "stop", job_id).strip()

    def submit_training(
        self, group: str, data: str, max_steps: int, cpus: float, slots: float, output: str = ""
    ) -> str:
        """Queue `appliance train --data DATA --max-steps N [--output NAME]` on `group`; the CLI's one-line answer."""
        train = ["train", "--data", data, "--max-steps", str(int(max_steps))] + (["--output", output] if output else [])
        return self._run(
            "job", "submit", "--group", group, "--cpus", f"{cpus:g}", "--slots", f"{slots:g}", "--", *train
        ).strip()
