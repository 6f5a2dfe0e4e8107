"""What every command shares: loading settings from the root options, and turning errors into exit codes."""

from __future__ import annotations

import contextlib
import functools
import logging
from pathlib import Path
from typing import Any, Callable, Iterator, TypeVar

import typer
from rich.console import Console
from rich.markup import escape

from fedllm.appliance.extras import MissingExtra, require
from fedllm.core.errors import ApplianceError, ConfigError, DataError, ModelNotFound
from fedllm.core.settings import ApplianceSettings, load_settings

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


F = TypeVar("F", bound=Callable[..., Any])


def needs(*extras: str, for_what: str) -> Callable[[F], F]:
    """Decorate a command that needs optional parts: before it runs (and imports them), a missing extra is reported
    with the pip command that installs it, and the command exits 1."""

    def wrap(command: F) -> F:
        @functools.wraps(command)
        def checked(*args: Any, **kwargs: Any) -> Any:
            try:
                require(*extras, for_what=for_what)
            except MissingExtra as exc:
                err_console.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False)
                raise typer.Exit(code=1) from exc
            return command(*args, **kwargs)

        return checked  # type: ignore[return-value]

    return wrap
