"""`appliance config show`: the effective settings, secrets masked."""

from __future__ import annotations

import typer
import yaml

from fedllm.appliance.commands.common import cli_errors, console, settings_from
from fedllm.core.settings import redacted_dump

config_app = typer.Typer(
    help="Inspect the effective settings (YAML file < APPLIANCE_* env < flags).", no_args_is_help=True
)


@config_app.command("show")
def show(ctx: typer.Context) -> None:
    """Print the effective settings as YAML, with every secret masked."""
    with cli_errors():
        settings = settings_from(ctx)
        console.print(yaml.safe_dump(redacted_dump(settings), sort_keys=False), highlight=False, markup=False, end="")


def register(app: typer.Typer) -> None:
    """Add this module's commands to the `appliance` CLI."""
    app.add_typer(config_app, name="config")
