"""What every command shares: loading settings from the root options, and turning errors into exit codes."""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Any, Iterator

import typer
from rich.console import Console
from rich.markup import escape

from appliance.core.errors import ApplianceError, ConfigError, DataError, ModelNotFound
from appliance.core.settings import ApplianceSettings, load_settings

console = Console()
err_console = Console(stderr=True)


def settings_from(ctx: typer.Context, overrides: dict[str, Any] | None = None) -> ApplianceSettings:
    """The effective settings: YAML (`--config`), env, then `--home` and the command's own flags."""
    root = ctx.find_root().obj or {}
    merged: dict[str, Any] = {}
    if root.get("home"):
        merged["home"] = Path(root["home"])
    for key, value in (overrides or {}).items():
        if isinstance(value, dict):
            merged[key] = {k: v for k, v in value.items() if v is not None}
        elif value is not None:
            merged[key] = value
    settings = load_settings(root.get("config"), merged)
    logging.basicConfig(level=settings.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return settings


@contextlib.contextmanager
def cli_errors() -> Iterator[None]:
    """Map the appliance's errors to a one-line message and exit code 2 (bad input) or 1 (failure)."""
    try:
        yield
    except (ConfigError, DataError, ModelNotFound) as exc:
        err_console.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False)
        raise typer.Exit(code=2) from exc
    except ApplianceError as exc:
        err_console.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False)
        raise typer.Exit(code=1) from exc
