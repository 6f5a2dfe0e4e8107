"""The `appliance` command: a thin Typer app composed from the command modules in `appliance/commands/`."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from fedllm.appliance.commands import cluster, config, doctor, federation, model, serve, sim, train, ui, up, worker

app = typer.Typer(
    help=(
        "FedLLM Appliance: fine-tune an open model on private data across silos (federated LoRA) and serve it "
        "through an OpenAI-compatible router. Start with `appliance up`."
    ),
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
)


@app.callback()
def main(
    ctx: typer.Context,
    config: Optional[Path] = typer.Option(
        None, "--config", "-c", help="YAML settings file (else $APPLIANCE_CONFIG or $APPLIANCE_HOME/config.yaml)."
    ),
    home: Optional[Path] = typer.Option(None, "--home", help="State folder (else $APPLIANCE_HOME or ~/.appliance)."),
) -> None:
    """The options every command shares (settings file, home, log level), before the command runs."""
    ctx.obj = {"config": config, "home": home}


# Each command module adds its commands (the order is the order of `appliance --help`).
for _module in (config, model, worker, serve, train, federation, ui, up, sim, cluster, doctor):
    _module.register(app)
