"""The `appliance` command: a thin Typer app composed from the command modules in `appliance/commands/`."""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Optional

import typer

app = typer.Typer(
    help=(
        "FedLLM Appliance: fine-tune an open model on private data across silos (federated LoRA) and serve it "
        "through an OpenAI-compatible router. Start with `appliance up`."
    ),
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
)

# Each module adds its commands; a module that fails to import must not take the whole CLI down silently.
COMMAND_MODULES = ("config", "model", "worker", "serve", "train", "federation", "ui", "up")


@app.callback()
def main(
    ctx: typer.Context,
    config: Optional[Path] = typer.Option(None, "--config", "-c", help="YAML settings file (else $APPLIANCE_CONFIG or $APPLIANCE_HOME/config.yaml)."),
    home: Optional[Path] = typer.Option(None, "--home", help="State folder (else $APPLIANCE_HOME or ~/.appliance)."),
) -> None:
    ctx.obj = {"config": config, "home": home}


for _name in COMMAND_MODULES:
    try:
        _module = importlib.import_module(f"appliance.commands.{_name}")
    except ModuleNotFoundError as exc:
        if exc.name != f"appliance.commands.{_name}":
            raise
        continue
    _module.register(app)
