"""`appliance federation init|enroll|remove|status`, `appliance coordinator start`, `appliance silo keygen|join`,
`appliance demo federation`."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from fedllm.appliance.commands.common import cli_errors, console, needs, settings_from

federation_app = typer.Typer(help="Federation admin: coordinator keys, silo enrolment, status.", no_args_is_help=True)
coordinator_app = typer.Typer(help="Run the federation coordinator.", no_args_is_help=True)
silo_app = typer.Typer(help="Join a federation as a data silo (outbound connections only).", no_args_is_help=True)
demo_app = typer.Typer(help="Self-contained demos on the embedded model.", no_args_is_help=True)


def _print_keypair(ctx: typer.Context, role: str) -> None:
    """Create (once) the CURVE key pair of `role` under keys/ and print its public key."""
    from fedllm.federation.wire.keys import ensure_keypair

    with cli_errors():
        kp = ensure_keypair(settings_from(ctx).keys_dir, role)
        console.print(f"{role} public key: {kp.public}", highlight=False, markup=False)


@federation_app.command("init")
def init(ctx: typer.Context) -> None:
    """Create (once) the coordinator's CURVE key pair and print its public key for the silos."""
    _print_keypair(ctx, "coordinator")


@federation_app.command("enroll")
def enroll(
    ctx: typer.Context,
    name: str = typer.Argument(..., help="Silo name."),
    public_key: str = typer.Argument(..., help="The silo's public key from `appliance silo keygen`."),
    examples: Optional[int] = typer.Option(
        None, "--examples", min=1, help="The silo's declared example count: its updates never weigh more."
    ),
) -> None:
    """Admit a silo's public key (takes effect at the silo's next connection, no restart needed).

    Put `--` before NAME: a key may start with "-" (`appliance federation enroll -- NAME KEY`).
    """
    from fedllm.federation.wire.keys import enroll_silo

    with cli_errors():
        silos = enroll_silo(settings_from(ctx).keys_dir, name, public_key, num_examples=examples)
        console.print(f"enrolled silo {name} ({len(silos)} enrolled)", highlight=False)
        if examples is None:
            console.print(
                f"note: no --examples declared: silo {name}'s weight in a round is bounded only by "
                f"federation.max_silo_share; enrol it again with --examples N to bound it by its data",
                highlight=False,
                markup=False,
            )


@federation_app.command("remove")
def remove(ctx: typer.Context, name: str = typer.Argument(..., help="Silo name.")) -> None:
    """Withdraw a silo: a running coordinator drops its session within a second and ignores its messages."""
    from fedllm.federation.wire.keys import remove_silo

    with cli_errors():
        if not remove_silo(settings_from(ctx).keys_dir, name):
            console.print(f"silo {name} is not enrolled", highlight=False)
            raise typer.Exit(code=2)
        console.print(f"removed silo {name}", highlight=False)


@federation_app.command("status")
def status(
    ctx: typer.Context,
    url: Optional[str] = typer.Option(None, "--url", help="Status URL (default: local coordinator)."),
) -> None:
    """Show silos (online, last seen, rounds) and rounds (participants, metrics, bytes, duration)."""
    from fedllm.core.net import connectable_host
    from fedllm.core.tokens import coordinator_status_token
    from fedllm.federation.runtime.report import fetch_status, format_status

    with cli_errors():
        settings = settings_from(ctx)
        token = coordinator_status_token(settings)
        f = settings.federation
        default = f"{f.scheme}://{connectable_host(f.bind_host)}:{f.status_port}/status"
        typer.echo(
            format_status(
                fetch_status(
                    url or default,
                    token=token,
                    ca_file=settings.tls_ca_file,
                    allow_plain_http=settings.allow_plain_http,
                )
            )
        )


@coordinator_app.command("start")
@needs("coordinator", for_what="`appliance coordinator start`")
def start(
    ctx: typer.Context,
    rounds: Optional[int] = typer.Option(None, "--rounds"),
    strategy: Optional[str] = typer.Option(
        None, "--strategy", help="Aggregation strategy (default fedavg; an unknown name lists the others)."
    ),
    min_silos: Optional[int] = typer.Option(None, "--min-silos"),
    round_deadline: Optional[float] = typer.Option(
        None,
        "--round-deadline",
        help="Seconds a round gives silos to train; each silo's deadline adds its transfer allowance.",
    ),
    local_steps: Optional[int] = typer.Option(None, "--local-steps"),
    port: Optional[int] = typer.Option(None, "--port"),
    host: Optional[str] = typer.Option(None, "--host", help="Interface to bind (0.0.0.0 for remote silos)."),
    run_name: Optional[str] = typer.Option(None, "--run", help="Run name (adapter name in the registry)."),
    compression: Optional[str] = typer.Option(None, "--compression", help="fp32 | bf16 | int8 | topk"),
    local_optimizer: Optional[str] = typer.Option(
        None,
        "--local-optimizer",
        help="keep (default): each silo carries its own AdamW moments from round to round; "
        "fresh: a new optimizer every round.",
    ),
    dp: Optional[str] = typer.Option(None, "--dp", help="off | central | silo"),
    plaintext: bool = typer.Option(False, "--plaintext", help="No encryption/authentication (tests only)."),
    stay: bool = typer.Option(
        False,
        "--stay",
        help="After the run ends keep serving its status (phase finished) and "
        "start the next run on POST /runs/next (what `appliance up` runs).",
    ),
    secure_aggregation: bool = typer.Option(
        False,
        "--secure-aggregation",
        help="Pairwise-masked secure aggregation: the coordinator learns only the sum "
        "(fedavg fedprox fedavgm fedadam fedyogi only).",
    ),
) -> None:
    """Run the federation until its last round (Ctrl-C stops it; a restart resumes from the last checkpoint).

    Exits 1 when the run fails (too many failed rounds in a row), so `appliance up` restarts it."""
    from fedllm.federation.runtime.service import run_coordinator

    with cli_errors():
        settings = settings_from(
            ctx,
            {
                "federation": {
                    "rounds": rounds,
                    "strategy": strategy,
                    "min_silos": min_silos,
                    "round_deadline_s": round_deadline,
                    "local_steps": local_steps,
                    "port": port,
                    "bind_host": host,
                    "run_name": run_name,
                    "compression": compression,
                    "local_optimizer": local_optimizer,
                    "dp_mode": dp,
                    "plaintext": plaintext or None,
                    "secure_aggregation": secure_aggregation or None,
                }
            },
        )
        final = run_coordinator(
            settings,
            stay=stay,
            on_ready=lambda c: console.print(f"coordinator at {c.address}, status at {c.status_url}", highlight=False),
        )
        console.print(
            f"run {final['run']}: {final['phase']} after {final['completed_rounds']} round(s)", highlight=False
        )


@silo_app.command("keygen")
def keygen(ctx: typer.Context) -> None:
    """Create (once) this silo's CURVE key pair and print the public key to give the coordinator's operator."""
    _print_keypair(ctx, "silo")


@silo_app.command("join")
@needs("silo", for_what="`appliance silo join`")
def join(
    ctx: typer.Context,
    coordinator: str = typer.Option(..., "--coordinator", help="tcp://HOST:PORT"),
    coordinator_key: Optional[str] = typer.Option(None, "--coordinator-key", help="The coordinator's public key."),
    data: Path = typer.Option(
        ...,
        "--data",
        exists=True,
        help="Private training data: JSONL, JSON, CSV, Parquet or a saved datasets folder (never leaves this machine).",
    ),
    eval_data: Optional[Path] = typer.Option(
        None, "--eval", exists=True, help="Held-out data (same formats as --data)."
    ),
    name: Optional[str] = typer.Option(None, "--name", help="Silo name (as enrolled)."),
    plaintext: bool = typer.Option(False, "--plaintext", help="No encryption/authentication (tests only)."),
    ranks: Optional[int] = typer.Option(
        None, "--ranks", help="Train on N ranks per node (GPUs or CPU processes), kept alive across rounds."
    ),
) -> None:
    """Train every round the coordinator sends, until the run ends (reconnects by itself)."""
    from fedllm.federation.runtime.service import run_silo

    with cli_errors():
        settings = settings_from(
            ctx,
            {
                "federation": {
                    "coordinator": coordinator,
                    "coordinator_key": coordinator_key,
                    "silo_id": name,
                    "plaintext": plaintext or None,
                    "silo_ranks": ranks,
                }
            },
        )
        rounds = run_silo(settings, data, eval_data)
        console.print(f"silo done: trained rounds {rounds}", highlight=False)


@demo_app.command("federation")
@needs("coordinator", for_what="`appliance demo federation`")
def demo_federation(
    ctx: typer.Context,
    rounds: int = typer.Option(3, "--rounds"),
    local_steps: int = typer.Option(4, "--local-steps"),
    out: Optional[Path] = typer.Option(None, "--out", help="Folder for the demo's home (default: a temp folder)."),
) -> None:
    """Coordinator + three hospital silos on the embedded model; prints held-out losses for base, local-only,
    federated and centralized adapters."""
    from fedllm.federation.demo.demo import run_demo

    with cli_errors():
        settings = settings_from(ctx)
        result = run_demo(settings, rounds=rounds, local_steps=local_steps, out_dir=out, echo=typer.echo)
        typer.echo(result.table())  # plain echo: the table must not be re-wrapped to the terminal width


def register(app: typer.Typer) -> None:
    """Add this module's commands to the `appliance` CLI."""
    app.add_typer(federation_app, name="federation")
    app.add_typer(coordinator_app, name="coordinator")
    app.add_typer(silo_app, name="silo")
    app.add_typer(demo_app, name="demo")
