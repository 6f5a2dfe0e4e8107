"""`appliance sim geo`: a demo fleet and federation across emulated regions (network namespaces, or loopback links)."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Optional

import typer

from appliance.commands.common import cli_errors, console, err_console, settings_from
from appliance.core.errors import ConfigError, ModelNotFound

sim_app = typer.Typer(help="Simulations for demos.", no_args_is_help=True)


@sim_app.command("geo")
def geo(
    ctx: typer.Context,
    regions: str = typer.Option("eu:5ms,us:40ms,ap:120ms", "--regions",
                                help="NAME:DELAYms,... (optionally +JITTERms and /BWmbit after the delay), one way from the router and coordinator (in hq)."),
    duration_s: float = typer.Option(20.0, "--duration-s", help="Seconds of client load per region."),
    concurrency: int = typer.Option(2, "--concurrency", help="Concurrent streams per client region."),
    cut: Optional[str] = typer.Option(None, "--cut", help="Cut this region off halfway through the load, then restore it."),
    rounds: int = typer.Option(2, "--rounds", help="Federation rounds (0: serving only). Needs a prepared model."),
    out: Optional[Path] = typer.Option(None, "--out", help="Folder for homes and logs (default: a temp folder, removed)."),
) -> None:
    """Bring up a router with a fake worker per region and a federation with a silo per region, all joined with
    the README's commands across emulated WAN links; print what clients and rounds saw. Root makes real network
    namespaces; otherwise the links run on loopback."""
    from appliance.core.model_store import resolve_model
    from testbed.sim import parse_regions, run_geo

    with cli_errors():
        settings = settings_from(ctx)
        try:
            links = parse_regions(regions)
        except ValueError as exc:
            raise ConfigError(str(exc)) from exc
        model_dir = None
        if rounds > 0:
            try:
                model_dir = resolve_model(settings.models_dir, settings.model)
            except ModelNotFound:
                err_console.print(f"no prepared model {settings.model!r}: serving only (run `appliance model prepare` for the federation)")
        with tempfile.TemporaryDirectory(prefix="appliance-sim-geo-") as tmp:
            report = run_geo(links, out or Path(tmp), model_dir=model_dir, duration_s=duration_s, concurrency=concurrency,
                             cut=cut, rounds=rounds, echo=lambda line: console.print(line, highlight=False))
        typer.echo(report.fleet_table())
        if report.rounds:
            typer.echo(report.federation_table())


def register(app: typer.Typer) -> None:
    app.add_typer(sim_app, name="sim")
