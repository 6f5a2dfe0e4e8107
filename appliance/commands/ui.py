"""`appliance ui`: the Gradio console."""

from __future__ import annotations

from typing import Optional

import typer

from fedllm.appliance.commands.common import cli_errors, console, needs, settings_from


def ui(
    ctx: typer.Context,
    host: Optional[str] = typer.Option(
        None, "--host", help="Bind address (default ui.host = 127.0.0.1; beyond it a login is required)."
    ),
    port: Optional[int] = typer.Option(None, "--port", help="Port (default ui.port = 7860)."),
    router_url: Optional[str] = typer.Option(
        None, "--router-url", help="Router base URL (default http://127.0.0.1:<serve.port>)."
    ),
    coordinator_url: Optional[str] = typer.Option(None, "--coordinator-url", help="Coordinator status URL."),
) -> None:
    """Serve the web console: Chat, Train, Federation, Fleet and Adapters."""
    with cli_errors():
        settings = settings_from(
            ctx, {"ui": {"host": host, "port": port, "router_url": router_url, "coordinator_url": coordinator_url}}
        )
        from fedllm.ui import launch_console

        console.print(f"console on {settings.ui.scheme}://{settings.ui.host}:{settings.ui.port}", highlight=False)
        launch_console(settings)


def register(app: typer.Typer) -> None:
    """Add this module's commands to the `appliance` CLI."""
    app.command("ui")(needs("console", for_what="`appliance ui` (the web console)")(ui))
