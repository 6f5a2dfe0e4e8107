"""`appliance up` (the whole appliance on this machine, supervised) and `appliance status` (what runs, and is it
healthy)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Optional

import typer

from fedllm.appliance.commands.common import cli_errors, console, err_console, needs, settings_from
from fedllm.core.model_store import EMBEDDED_NAME, prepare_model, resolve_model
from fedllm.core.processes import stop_on_signals
from fedllm.core.secrets import ensure_token, masked
from fedllm.core.settings import ApplianceSettings
from fedllm.core.tokens import console_password, issue_login_link, router_admin_token


def state_path(settings: ApplianceSettings) -> Path:
    """Where a running `appliance up` keeps its state (pids, URLs)."""
    return settings.home / "run" / "up.json"


def _prepared_model(settings: ApplianceSettings) -> str:
    """The store name of the base model, preparing the embedded one on first use."""
    if settings.model == EMBEDDED_NAME and not (settings.models_dir / EMBEDDED_NAME / "store.json").exists():
        console.print("preparing the embedded model (once)...")
        prepare_model(settings.models_dir, cache_dir=settings.home / "cache")
    return resolve_model(settings.models_dir, settings.model).name


def _coordinator_key(settings: ApplianceSettings) -> str | None:
    """Create (once) the coordinator's CURVE key pair, as `appliance federation init` does; its public key."""
    if settings.federation.plaintext:
        return None
    from fedllm.federation.wire.keys import ensure_keypair

    return ensure_keypair(settings.keys_dir, "coordinator").public


def _banner(
    settings: ApplianceSettings,
    children: list[Any],
    model: str,
    admin_token: str,
    coordinator_key: str | None,
    login_link: str | None = None,
) -> str:
    lines = ["", "FedLLM Appliance is up. Ctrl-C stops everything.", ""]
    lines += [f"  {c.name:<12} {c.url}" for c in children if c.url]
    where = "serve.admin_token" if settings.serve.admin_token else f"cat {settings.keys_dir / 'admin_token'}"
    lines += ["", f"  admin token  {masked(admin_token)}   (the whole token: {where})"]
    if any(c.name == "console" for c in children):
        password = console_password(settings)
        shown = "ui.admin_password" if settings.ui.admin_password else f"cat {settings.keys_dir / 'console_password'}"
        lines += [f"  console      user admin, password {masked(password)}   (the whole password: {shown})"]
        if login_link:
            lines += [f"  log in once  {login_link}   (one click logs you in; the link works once)"]
    lines += [f"  logs         {settings.logs_dir}", ""]
    if coordinator_key:
        lines += [f"  coordinator public key (for silos)  {coordinator_key}", ""]
    chat = next((c.url for c in children if c.name == "router"), None) or next((c.url for c in children if c.url), None)
    if any(c.name == "router" for c in children):
        lines += [
            "Another machine's GPU worker joins with:",
            f"  appliance worker join --router {settings.serve.scheme}://<this-host>:{settings.serve.port} "
            "--token-file join_token --region REGION",
            f"  (join_token: a copy of {settings.keys_dir / 'join_token'}, mode 0600; or set APPLIANCE_JOIN_TOKEN)",
            "",
        ]
    if chat:
        auth = " -H 'Authorization: Bearer YOUR_API_KEY'" if settings.serve.api_keys else ""
        body = json.dumps({"model": model, "messages": [{"role": "user", "content": "Hello! Who are you?"}]})
        lines += [
            "Chat:",
            f"  curl {chat}/chat/completions -H 'Content-Type: application/json'{auth} -d '{body}'",
            f'  python: OpenAI(base_url="{chat}", api_key="...").chat.completions.create('
            f'model="{model}", messages=[...])',
            "",
        ]
    return "\n".join(lines)


def _login_link(settings: ApplianceSettings, children: list[Any]) -> str | None:
    """A one-time login link for the console `up` starts (None without a console, or without a login to ask)."""
    from fedllm.ui.app import needs_login
    from fedllm.ui.login import LINK_PATH

    console_child = next((c for c in children if c.name == "console"), None)
    if console_child is None or not needs_login(settings.ui.host, settings.ui.require_login):
        return None
    return f"{console_child.url}{LINK_PATH}#{issue_login_link(settings)}"


def up(
    ctx: typer.Context,
    port: Optional[int] = typer.Option(None, "--port", help="Router port (default: serve.port)."),
    workers: Optional[int] = typer.Option(None, "--workers", help="Local vLLM workers (default: worker.count)."),
    device: Optional[str] = typer.Option(None, "--device", help="cpu | cuda (default: worker.device)."),
    backoff_s: float = typer.Option(
        1.0, "--backoff-s", help="First restart delay of a crashed child; doubles up to 30 s."
    ),
    without: list[str] = typer.Option(
        [],
        "--without",
        help=(
            "Leave out an optional part: router, coordinator, console or cluster (the Ray head for `appliance "
            "job`) (repeatable)."
        ),
    ),
) -> None:
    """Start the appliance (workers, router, and coordinator and console where installed) until Ctrl-C."""
    from fedllm.appliance.launcher import Supervisor, appliance_children, cluster_children, read_state

    with cli_errors():
        settings = settings_from(ctx, {"serve": {"port": port}, "worker": {"count": workers, "device": device}})
        path = state_path(settings)
        running = read_state(path)
        if running is not None:
            err_console.print(
                f"[bold red]error:[/] `appliance up` already runs here (pid {running['pid']}); see `appliance status`"
            )
            raise typer.Exit(code=1)
        model = _prepared_model(settings)
        admin_token = router_admin_token(settings)
        ensure_token(settings.keys_dir, "join_token", settings.serve.join_token)
        config_file = (ctx.find_root().obj or {}).get("config")
        children = appliance_children(
            settings, model, sys.executable, config_file=config_file, without=frozenset(without)
        )
        children += cluster_children(settings, sys.executable, config_file=config_file, without=frozenset(without))
        coordinator_key = _coordinator_key(settings) if any(c.name == "coordinator" for c in children) else None
        login_link = _login_link(settings, children)
        urls = {c.name: c.url for c in children}
        sup = Supervisor(
            children,
            settings.logs_dir,
            path,
            backoff_initial_s=backoff_s,
            info={"home": str(settings.home), "urls": urls},
        )
        stop = stop_on_signals()
        sup.check_ports()
        console.print(f"starting {', '.join(c.name for c in children)} (logs in {settings.logs_dir})", highlight=False)
        sup.start(stop)
        if not stop.is_set():
            console.print(
                _banner(settings, children, model, admin_token, coordinator_key, login_link),
                highlight=False,
                markup=False,
                soft_wrap=True,
            )
        try:
            sup.supervise(stop)
        finally:
            console.print("stopping...")
            sup.stop()
        console.print("stopped")


def status(ctx: typer.Context) -> None:
    """Report what `appliance up` runs here and whether each part answers its health check (exit 1 if not all do)."""
    from fedllm.appliance.launcher import child_health, read_state

    with cli_errors():
        settings = settings_from(ctx)
        state = read_state(state_path(settings))
        if state is None:
            console.print(f"`appliance up` is not running (home {settings.home})")
            raise typer.Exit(code=3)
        children = child_health(state)
        console.print(f"appliance up: pid {state['pid']}, home {state.get('home')}", highlight=False, soft_wrap=True)
        for c in children:
            health = "healthy" if c["healthy"] else ("unhealthy" if c["alive"] else "not running")
            console.print(
                f"  {c['name']:<12} {health:<11} pid {c['pid']}  {c['state']:<8} restarts {c['restarts']}  "
                f"{c.get('url') or ''}",
                highlight=False,
                soft_wrap=True,
            )
        if not all(c["healthy"] for c in children):
            raise typer.Exit(code=1)


def register(app: typer.Typer) -> None:
    """Add this module's commands to the `appliance` CLI."""
    app.command("up")(
        needs(
            "silo",
            "coordinator",
            "worker",
            "engine",
            "router",
            "console",
            for_what="`appliance up` (the all-in-one operator install, `[all,cpu]`)",
        )(up)
    )
    app.command("status")(status)
