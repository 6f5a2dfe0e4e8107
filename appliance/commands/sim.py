"""`appliance sim geo`: a demo fleet and federation across emulated regions (network namespaces, or loopback links);
`appliance sim silos N`: N simulated silos against the real coordinator (`fedllm.federation.demo.simulate`)."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any, Optional

import typer

from fedllm.appliance.commands.common import cli_errors, console, err_console, needs, settings_from
from fedllm.core.errors import ConfigError, ModelNotFound

sim_app = typer.Typer(help="Simulations for demos.", no_args_is_help=True)


@sim_app.command("geo")
@needs("worker", "engine", "router", for_what="`appliance sim geo`")
def geo(
    ctx: typer.Context,
    regions: str = typer.Option(
        "eu:5ms,us:40ms,ap:120ms",
        "--regions",
        help=(
            "NAME:DELAYms,... (optionally +JITTERms and /BWmbit after the delay), one way from the router and "
            "coordinator (in hq)."
        ),
    ),
    duration_s: float = typer.Option(20.0, "--duration-s", help="Seconds of client load per region."),
    concurrency: int = typer.Option(2, "--concurrency", help="Concurrent streams per client region."),
    cut: Optional[str] = typer.Option(
        None, "--cut", help="Cut this region off halfway through the load, then restore it."
    ),
    rounds: int = typer.Option(2, "--rounds", help="Federation rounds (0: serving only). Needs a prepared model."),
    out: Optional[Path] = typer.Option(
        None, "--out", help="Folder for homes and logs (default: a temp folder, removed)."
    ),
) -> None:
    """Bring up a router with a fake worker per region and a federation with a silo per region, all joined with
    the README's commands across emulated WAN links; print what clients and rounds saw. Root makes real network
    namespaces; otherwise the links run on loopback."""
    from fedllm.core.model_store import resolve_model
    from fedllm.federation.demo import data as demo_data
    from fedllm.testbed.sim import parse_regions, run_geo

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
                err_console.print(
                    f"no prepared model {settings.model!r}: serving only (run `appliance model prepare` for the "
                    "federation)"
                )
        with tempfile.TemporaryDirectory(prefix="appliance-sim-geo-") as tmp:
            workdir = out or Path(tmp)
            silo_data = None
            if (
                model_dir is not None and rounds > 0
            ):  # the demo's organisations; the test bed imports no product package
                silo_data = {org: paths["train"] for org, paths in demo_data.write(workdir / "data").items()}
            report = run_geo(
                links,
                workdir,
                model_dir=model_dir,
                duration_s=duration_s,
                concurrency=concurrency,
                cut=cut,
                rounds=rounds,
                echo=lambda line: console.print(line, highlight=False),
                silo_data=silo_data,
            )
        typer.echo(report.fleet_table())
        if report.rounds:
            typer.echo(report.federation_table())


@sim_app.command("silos")
@needs("coordinator", for_what="`appliance sim silos`")
def silos(
    ctx: typer.Context,
    count: int = typer.Argument(..., min=1, help="Number of simulated silos."),
    rounds: int = typer.Option(3, "--rounds", min=1, help="Rounds to run."),
    adapter: str = typer.Option(
        "embedded",
        "--adapter",
        help=(
            "Adapter size: embedded (the embedded model at train.lora_r) or 7b (Llama-2-7B r=16, all linear, ~40M "
            "parameters)."
        ),
    ),
    fit_s: float = typer.Option(
        0.0, "--fit-s", min=0.0, help="Seconds each simulated silo spends 'training' per round."
    ),
    part: str = typer.Option(
        "all",
        "--part",
        help=(
            "all: coordinator and silos in this process; coordinator or silos: one part (run the other with the "
            "same --sim-dir)."
        ),
    ),
    home: Optional[Path] = typer.Option(
        None,
        "--sim-dir",
        help="Folder for the simulation's homes and keys (default: a temp folder, removed); needed with --part.",
    ),
    report: Optional[Path] = typer.Option(
        None, "--report", help="Write the report (rounds, peak memory) as JSON here."
    ),
) -> None:
    """Run COUNT simulated silos (real silo agents over CURVE with a model-free trainer) against the real
    coordinator, and print each round's participants, time outside training and bytes. With --part the coordinator
    and the silos run in separate processes (the coordinator part reports its own peak memory)."""
    import asyncio
    import json

    from fedllm.federation.demo import simulate as sim

    with cli_errors():
        if adapter not in sim.PRESETS:
            raise ConfigError(f"--adapter must be one of {', '.join(sim.PRESETS)}, got {adapter!r}")
        if part not in ("all", "coordinator", "silos"):
            raise ConfigError(f"--part must be all, coordinator or silos, got {part!r}")
        if part != "all" and home is None:
            raise ConfigError("--part coordinator/silos needs --sim-dir (the same folder for both parts)")
        user = settings_from(ctx)  # its model store and train.lora_r size the embedded adapter
        import logging

        # a line per silo per round: too many to read
        for name in (
            "fedllm.federation.runtime.silo",
            "fedllm.federation.runtime.sessions",
            "fedllm.federation.runtime.round_runner",
            "fedllm.federation.runtime.recorder",
        ):
            logging.getLogger(name).setLevel(logging.WARNING)
        with tempfile.TemporaryDirectory(prefix="appliance-sim-silos-") as tmp:
            root = home or Path(tmp)
            root.mkdir(parents=True, exist_ok=True)
            result: dict[str, Any]
            if part == "silos":
                trained = asyncio.run(sim.silos_part(root, count, fit_s=fit_s))
                result = {"silos": count, "rounds_trained": trained}
            elif part == "coordinator":
                result = asyncio.run(sim.coordinator_part(root, count, rounds, preset=adapter, model_settings=user))
            else:
                result = asyncio.run(
                    sim.simulate(root, count, rounds, preset=adapter, fit_s=fit_s, model_settings=user)
                )
                result.pop("history")
                result["peak_rss_bytes"] = sim.peak_rss_bytes()
        if report is not None:
            report.write_text(json.dumps(result, indent=1))
        if "rounds" in result:
            typer.echo(f"{count} silos, {result['adapter']} ({result['parameters']:,} parameters)")
            typer.echo(f"{'round':>5} {'silos':>6} {'overhead_s':>10} {'MB':>10}")
            for row in result["rounds"]:
                if "failed" in row:
                    typer.echo(f"{row['round']:>5} failed: {row['failed']}")
                else:
                    typer.echo(
                        f"{row['round']:>5} {row['participants']:>6} {row['overhead_s']:>10.2f} "
                        f"{row['bytes'] / 1e6:>10.1f}"
                    )
            typer.echo(f"peak resident memory of this process: {result['peak_rss_bytes'] / 2**20:.0f} MiB")
        else:
            typer.echo(f"{count} simulated silos trained {result['rounds_trained']} silo-rounds")


def register(app: typer.Typer) -> None:
    """Add this module's commands to the `appliance` CLI."""
    app.add_typer(sim_app, name="sim")
