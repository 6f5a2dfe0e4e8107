"""`appliance doctor`: checks of this machine's install and configuration, one line each with the fix.

A check gives a `Check` with a status: `ok`, `warn` (worth knowing, does not fail), `fail` (this machine cannot do its
role as configured) or `skip` (nothing to check, with the reason). The checks themselves live in `doctor_local`
(install, devices, ports, disk, memory, key files) and `doctor_remote` (the router and coordinator it is configured
for, and the clock against the coordinator's).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Literal

Status = Literal["ok", "warn", "fail", "skip"]
ROLES = ("silo", "coordinator", "worker", "router", "console", "cluster", "all")


@dataclass(frozen=True)
class Check:
    """One line of the report: what was checked, what was found, and what to do about it (empty when nothing)."""

    name: str
    status: Status
    detail: str
    fix: str = ""

    def line(self) -> str:
        tail = f" -> fix: {self.fix}" if self.fix and self.status in ("fail", "warn") else ""
        return f"[{self.status.upper():4}] {self.name}: {self.detail}{tail}"


def failed(checks: list[Check]) -> bool:
    """Whether any check failed (the command then exits 1)."""
    return any(c.status == "fail" for c in checks)


def as_json(checks: list[Check]) -> dict:
    """The report as a JSON-ready dict: `ok` (no failure) and the checks in order."""
    return {"ok": not failed(checks), "checks": [asdict(c) for c in checks]}


def run_checks(
    settings,
    *,
    role: str | None = None,
    router: str | None = None,
    coordinator: str | None = None,
    timeout_s: float = 3.0,
) -> list[Check]:
    """Every check, in report order, for this machine as `settings` configure it.

    `role` makes the extras that role needs a failure when missing (else a warning); `router` and `coordinator`
    (base URLs) add to or replace those from the settings.
    """
    from fedllm.appliance import doctor_local, doctor_remote

    checks = [doctor_local.python_version()]
    checks += doctor_local.extras(role)
    checks.append(doctor_local.torch_devices(settings.worker.device))
    checks.append(doctor_local.vllm_engine(settings.worker.device, required=role in ("worker", "all")))
    checks += doctor_local.ports(settings)
    checks += doctor_local.model_resources(settings)
    checks.append(doctor_local.key_modes(settings.keys_dir))
    checks += doctor_remote.remote_checks(settings, router=router, coordinator=coordinator, timeout_s=timeout_s)
    return checks
