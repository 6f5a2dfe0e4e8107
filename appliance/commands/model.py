"""`appliance model prepare|list`: the base-model store."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from fedllm.appliance.commands.common import cli_errors, console, needs, settings_from
from fedllm.core.model_store import list_models, prepare_model

model_app = typer.Typer(
    help="Prepare and list base models (HF safetensors under APPLIANCE_HOME/models/).", no_args_is_help=True
)


@model_app.command("prepare")
@needs("silo", for_what="`appliance model prepare`")
def prepare(
    ctx: typer.Context,
    source: Optional[Path] = typer.Argument(
        None, help="A GGUF file or HF model folder; default: the embedded SmolLM2-135M-Instruct."
    ),
    name: Optional[str] = typer.Option(
        None, "--name", help="Store name; default: the embedded name or the source's name."
    ),
) -> None:
    """Convert a model once into the store (idempotent: a prepared model is reused)."""
    with cli_errors():
        settings = settings_from(ctx)
        m = prepare_model(settings.models_dir, source, name, cache_dir=settings.home / "cache")
        console.print(f"prepared [bold]{m.name}[/] at {m.path} ({(m.parameters or 0) / 1e6:.1f} M parameters)")


@model_app.command("list")
def list_(ctx: typer.Context) -> None:
    """List prepared models."""
    with cli_errors():
        settings = settings_from(ctx)
        models = list_models(settings.models_dir)
        if not models:
            console.print(f"no models prepared in {settings.models_dir}; run `appliance model prepare`")
        for m in models:
            console.print(f"{m.name}\t{(m.parameters or 0) / 1e6:.1f}M\t{m.path}\t{m.source}", highlight=False)


def register(app: typer.Typer) -> None:
    """Add this module's commands to the `appliance` CLI."""
    app.add_typer(model_app, name="model")
