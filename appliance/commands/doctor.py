"""`appliance doctor`: check this machine's install and configuration, one line each with the fix."""

from __future__ import annotations

import json
from typing import Optional

import typer

from fedllm.appliance.commands.common import cli_errors, console, settings_from
from fedllm.appliance.doctor import ROLES, as_json, failed, run_checks

STYLE = {"ok": "green", "warn": "yellow", "fail": "bold red", "skip": "dim"}


def doctor(
    ctx: typer.Context,
    role: Optional[str] = typer.Option(
        None,
        "--role",
        help=(
            f"This machine's role ({' | '.join(ROLES)}): the extras it needs fail the check when missing (else "
            "they warn)."
        ),
    ),
    router: Optional[str] = typer.Option(None, "--router", help="Router base URL to check (default ui.router_url)."),
    coordinator: Optional[str] = typer.Option(
        None,
        "--coordinator",
        help=(
            "Coordinator status base URL to check, e.g. http://host:5556 (default ui.coordinator_url, else from "
            "federation.coordinator)."
        ),
    ),
    timeout_s: float = typer.Option(3.0, "--timeout-s", min=0.1, help="Seconds to wait for each remote service."),
    as_json_: bool = typer.Option(False, "--json", help="Print the report as JSON."),
) -> None:
    """Check Python and package versions, torch and GPUs, the vLLM build, free ports, disk and memory for the model,
    keys/ file modes, the router and coordinator it is configured for, and the clock against the coordinator.

    Exits 1 when a check fails (warnings do not fail)."""
    with cli_errors():
        if role is not None and role not in ROLES:
            raise typer.BadParameter(f"unknown role {role!r}; one of {', '.join(ROLES)}", param_hint="--role")
        settings = settings_from(ctx)
        checks = run_checks(settings, role=role, router=router, coordinator=coordinator, timeout_s=timeout_s)
    if as_json_:
        typer.echo(json.dumps(as_json(checks), indent=2))
    else:
        for check in checks:
            console.print(check.line(), style=STYLE[check.status], highlight=False, markup=False, soft_wrap=True)
    raise typer.Exit(code=1 if failed(checks) else 0)


def register(app: typer.Typer) -> None:
    """Add this module's commands to the `appliance` CLI."""
    app.command("doctor")(doctor)
