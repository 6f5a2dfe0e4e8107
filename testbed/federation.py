"""A federation across the bed's regions, brought up with the product's own commands (as the README says).

The coordinator's operator runs `appliance federation init` and `appliance coordinator start --host ADDR` in the
coordinator's region (CURVE on); each silo's operator runs `appliance silo keygen`, has the key enrolled
(`appliance federation enroll NAME KEY`) and runs `appliance silo join --coordinator tcp://...` in its own region,
outbound only, through the bed's link.
"""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from fedllm.core.cores import divide_cores
from fedllm.core.secrets import ensure_token
from fedllm.core.tokens import STATUS_TOKEN_FILE
from fedllm.testbed.bed import Bed
from fedllm.testbed.fleet import appliance_argv

logger = logging.getLogger(__name__)

MODEL_NAME = "geo-model"
_KEY = re.compile(r"public key: (\S{40})")


def _public_key(output: str) -> str:
    """The Z85 public key a `federation init` or `silo keygen` printed."""
    found = _KEY.search(output)
    if found is None:
        raise RuntimeError(f"no 'public key: ...' line in the command's output: {output[-2000:]}")
    return found[1]


@dataclass
class GeoFederation:
    """Coordinator + silos on a `Bed`.

    Args:
        bed: the test bed (started).
        region: the coordinator's region.
        workdir: homes of the coordinator (`coordinator/`) and the silos (`silo-NAME/`).
        model_dir: a model folder (the tiny Llama in tests) linked into every home as `geo-model`.
        env: extra environment for every process, e.g. {"APPLIANCE_TRAIN__MAX_SEQ_LEN": "64"}.
    """

    bed: Bed
    region: str
    workdir: Path
    model_dir: Path
    env: dict[str, str] = field(default_factory=dict)
    silos: dict[str, str] = field(default_factory=dict)  # name -> region
    coordinator_key: str = ""
    port: int = 0
    status_port: int = 0
    run_name: str = "federation"

    def home(self, name: str) -> Path:
        home = self.workdir / name
        (home / "models").mkdir(parents=True, exist_ok=True)
        link = home / "models" / MODEL_NAME
        if not link.exists():
            link.symlink_to(Path(self.model_dir).resolve(), target_is_directory=True)
        return home

    def _env(self, home: Path) -> dict[str, str]:
        return {"APPLIANCE_HOME": str(home), "APPLIANCE_MODEL": MODEL_NAME, **self.env}

    def _cli(self, home: Path, *args: str) -> str:
        out = subprocess.run(
            appliance_argv(*args), env={**os.environ, **self._env(home)}, capture_output=True, text=True
        )
        if out.returncode != 0:
            raise RuntimeError(f"`appliance {' '.join(args)}` failed ({out.returncode}): {out.stderr[-2000:]}")
        return out.stdout

    def init(self) -> str:
        """`appliance federation init` in the coordinator's home; returns its public key."""
        self.coordinator_key = _public_key(self._cli(self.home("coordinator"), "federation", "init"))
        return self.coordinator_key

    def enroll(self, name: str, region: str) -> None:
        """`appliance silo keygen` in the silo's home, then `appliance federation enroll NAME KEY` at the
        coordinator."""
        key = _public_key(self._cli(self.home(f"silo-{name}"), "silo", "keygen"))
        self._cli(self.home("coordinator"), "federation", "enroll", "--", name, key)  # a Z85 key may start with "-"
        self.silos[name] = region

    @property
    def status_token(self) -> str:
        """The coordinator's status token (its /status needs it beyond loopback), made before the coordinator reads
        it."""
        return ensure_token(self.home("coordinator") / "keys", STATUS_TOKEN_FILE)

    def start_coordinator(self, *args: str, timeout_s: float = 600.0) -> None:
        """`appliance coordinator start --host ADDR --port P ARGS` in the coordinator's region; waits for /status."""
        self.port, self.status_port = self.bed.free_port(self.region), self.bed.free_port(self.region)
        home = self.home("coordinator")
        self.status_token  # noqa: B018 - made before the coordinator reads it
        env = {
            **self._env(home),
            "APPLIANCE_FEDERATION__STATUS_PORT": str(self.status_port),
            "APPLIANCE_FEDERATION__AUTO_PUBLISH": "false",
        }
        self.bed.spawn(
            self.region,
            "coordinator",
            appliance_argv(
                "coordinator", "start", "--host", self.bed.address(self.region), "--port", str(self.port), *args
            ),
            env=env,
        )
        self.wait(lambda: self.status() is not None, timeout_s, "the coordinator's /status")

    def start_silo(self, name: str, data: Path, eval_data: Path | None = None) -> None:
        """`appliance silo join --coordinator tcp://LINK --coordinator-key KEY --data FILE --name NAME` in its region,
        pinned to its share of this machine's cores (`divide_cores` over the enrolled silos)."""
        region = self.silos[name]
        host, port = self.bed.link(region, self.region, self.port)
        args = [
            "silo",
            "join",
            "--coordinator",
            f"tcp://{host}:{port}",
            "--coordinator-key",
            self.coordinator_key,
            "--data",
            str(data),
            "--name",
            name,
            *(["--eval", str(eval_data)] if eval_data else []),
        ]
        # The enrolled silos train at once on this one machine: each gets its own share of the cores.
        share = divide_cores(len(self.silos))[list(self.silos).index(name)]
        self.bed.spawn(
            region,
            f"silo-{name}",
            share.argv(appliance_argv(*args)),
            env={**self._env(self.home(f"silo-{name}")), **share.env()},
        )

    def status(self) -> dict[str, Any] | None:
        """The coordinator's status document (read inside its region), or None if it does not answer."""
        url = f"http://{self.bed.address(self.region)}:{self.status_port}/status"
        # beyond loopback /status needs the status token of the coordinator's home
        req = urllib.request.Request(url, headers={"Authorization": f"Bearer {self.status_token}"})

        def get() -> dict[str, Any] | None:
            try:
                with urllib.request.urlopen(req, timeout=5) as resp:
                    return json.load(resp)
            except (urllib.error.URLError, OSError, ValueError):
                return None

        return self.bed.call(self.region, get)

    def rounds(self) -> list[dict[str, Any]]:
        """Completed (and failed) round records so far, from the coordinator's round log (it outlives the process)."""
        path = self.workdir / "coordinator" / "federation" / self.run_name / "rounds.jsonl"
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]

    def wait(self, ready: Callable[[], bool], timeout_s: float, what: str) -> None:
        """Poll `ready()`; on timeout raise with the tails of the coordinator's and silos' logs."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if ready():
                return
            time.sleep(0.2)
        names = ["coordinator", *(f"silo-{n}" for n in self.silos)]
        tails = "\n".join(f"--- {n}.log\n{self.bed.log(n)[-2500:]}" for n in names)
        raise TimeoutError(f"timed out after {timeout_s:.0f} s waiting for {what}\n{tails}")

    def wait_round(self, n: int, timeout_s: float = 600.0) -> dict[str, Any]:
        """Wait until round `n` has a record (completed or failed); returns it."""
        found: dict[str, Any] = {}

        def done() -> bool:
            rec = next((r for r in self.rounds() if r.get("round") == n and "participants" in r), None)
            if rec is not None:
                found.update(rec)
            return rec is not None

        self.wait(done, timeout_s, f"round {n} to complete")
        return found
