"""`appliance serve`, `appliance keys`, `appliance fleet`, `appliance adapters`: the router and its fleet."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Optional

import typer

from fedllm.appliance.commands.common import cli_errors, console, needs, settings_from
from fedllm.core.tokens import router_admin_token

keys_app = typer.Typer(
    help="API keys for the router's /v1 routes (stored hashed in keys/api_keys.json).", no_args_is_help=True
)
adapters_app = typer.Typer(help="Publish registry adapters on the router's workers.", no_args_is_help=True)


def _admin(ctx: typer.Context, router: Optional[str]):
    from fedllm.core.contracts.router_client import RouterClient, router_url
    from fedllm.core.tls import client_context

    settings = settings_from(ctx)
    token = router_admin_token(settings)
    url = router or router_url(settings.serve.host, settings.serve.port, settings.serve.scheme)
    return settings, RouterClient(
        url, token, verify=client_context(settings.tls_ca_file), allow_plain_http=settings.allow_plain_http
    )


_ROUTER = typer.Option(None, "--router", help="Router URL (default: from settings, http://127.0.0.1:8000).")


def serve(
    ctx: typer.Context,
    host: Optional[str] = typer.Option(None, "--host", help="Bind address; beyond 127.0.0.1 API keys are required."),
    port: Optional[int] = typer.Option(None, "--port", help="Port (default 8000)."),
    policy: Optional[str] = typer.Option(None, "--policy", help="round_robin | least_outstanding | score."),
) -> None:
    """Run the OpenAI-compatible router in the foreground (workers from settings or `POST /admin/workers`)."""
    from fedllm.serve import run_router
    from fedllm.serve.app import check_exposure

    with cli_errors():
        settings = settings_from(ctx, {"serve": {"host": host, "port": port, "policy": policy}})
        check_exposure(settings)
        console.print(
            f"router on {settings.serve.scheme}://{settings.serve.host}:{settings.serve.port} (Ctrl-C stops it)",
            highlight=False,
        )
        run_router(settings)


@keys_app.command("create")
def keys_create(
    ctx: typer.Context,
    name: str = typer.Option(..., "--name", help="A name for the key (who uses it)."),
    rpm: Optional[int] = typer.Option(None, "--rpm", help="Requests per minute (default: unlimited)."),
    tpm: Optional[int] = typer.Option(None, "--tpm", help="Tokens per minute (default: unlimited)."),
) -> None:
    """Create an API key; it is printed once and stored only as a hash."""
    from fedllm.serve.keys import create_key

    with cli_errors():
        settings = settings_from(ctx)
        key = create_key(settings.keys_dir, name, rpm=rpm, tpm=tpm)
        console.print(key, highlight=False, markup=False, soft_wrap=True)
        typer.echo(
            f"key {name!r} created (rpm={rpm or 'unlimited'}, tpm={tpm or 'unlimited'}); it is shown only now", err=True
        )


@keys_app.command("list")
def keys_list(ctx: typer.Context) -> None:
    """List keys: name, id, limits and creation date (never the keys themselves)."""
    from rich.table import Table

    from fedllm.serve.keys import load_keys

    with cli_errors():
        settings = settings_from(ctx)
        table = Table("name", "id", "rpm", "tpm", "created")
        for k in load_keys(settings.keys_dir):
            created = time.strftime("%Y-%m-%d %H:%M", time.gmtime(k.created)) + " UTC" if k.created else "-"
            table.add_row(k.name, k.id, str(k.rpm or "-"), str(k.tpm or "-"), created)
        console.print(table)
        if settings.serve.api_keys:
            typer.echo(f"plus {len(settings.serve.api_keys)} key(s) from settings (serve.api_keys)", err=True)


@keys_app.command("revoke")
def keys_revoke(
    ctx: typer.Context, key: str = typer.Argument(..., help="The key's name or id (see `appliance keys list`).")
) -> None:
    """Revoke a key; a running router refuses it within about a second (no restart)."""
    from fedllm.serve.keys import revoke_key

    with cli_errors():
        gone = revoke_key(settings_from(ctx).keys_dir, key)
        console.print(f"revoked key {gone.name!r} ({gone.id})", highlight=False)


fleet_app = typer.Typer(help="The router's workers: list them (default), clear a quarantined one or address.")


@fleet_app.callback(invoke_without_command=True)
def fleet(ctx: typer.Context, router: Optional[str] = _ROUTER) -> None:
    """List the router's workers: region, health, load, latency, canary verdict, models and adapters."""
    from rich.table import Column, Table

    if ctx.invoked_subcommand is not None:
        return
    from fedllm.core.contracts.router_client import canary_label

    with cli_errors():
        _, client = _admin(ctx, router)
        # The id (what `fleet clear` takes) and the canary verdict are never cut, however narrow the terminal.
        table = Table(
            Column("id", no_wrap=True),
            "url",
            "region",
            "healthy",
            "draining",
            Column("canary", no_wrap=True),
            "outstanding",
            "latency ms",
            "models",
            "adapters",
        )
        for w in client.workers():
            canary = canary_label(w)
            region = w["region"] if w.get("region_assigned", True) else f"{w['region']} (claimed)"
            table.add_row(
                w["id"],
                w["url"],
                region,
                "yes" if w["healthy"] else "NO",
                "yes" if w["draining"] else "",
                canary,
                str(w["outstanding"]),
                f"{w['latency_ms']:.1f}",
                ", ".join(w["models"]),
                ", ".join(w["adapters"]),
            )
        console.print(table)


@fleet_app.command("clear")
def fleet_clear(
    ctx: typer.Context,
    worker_id: str = typer.Argument(..., help="The quarantined worker's id."),
    router: Optional[str] = _ROUTER,
) -> None:
    """Lift a worker's quarantine (after checking why its canary answers differed); it is checked again later."""
    with cli_errors():
        _, client = _admin(ctx, router)
        out = client.clear(worker_id)
        console.print(f"worker {out['id']} cleared (canary {out['canary']})", highlight=False)


@fleet_app.command("region")
def fleet_region(
    ctx: typer.Context,
    worker_id: str = typer.Argument(..., help="The joined worker's id (`appliance fleet`)."),
    region: str = typer.Argument(..., help="The region you put it in, e.g. eu-west."),
    router: Optional[str] = _ROUTER,
) -> None:
    """Assign a joined worker's region. Data residency trusts only regions the operator assigned (static workers'
    settings, or this): a joined worker's own claim is shown as "(claimed)" and never used for residency."""
    with cli_errors():
        _, client = _admin(ctx, router)
        out = client.assign_region(worker_id, region)
        console.print(f"worker {out['id']} is in region {out['region']} (assigned by the operator)", highlight=False)


@fleet_app.command("quarantine")
def fleet_quarantine(ctx: typer.Context, router: Optional[str] = _ROUTER) -> None:
    """List the sticky quarantine: workers refused (by address or API key) until you clear them."""
    with cli_errors():
        _, client = _admin(ctx, router)
        rows = client.quarantine()
        for r in rows:
            stamp = r.get("since")
            since = (
                time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(stamp)) if isinstance(stamp, (int, float)) else stamp
            )
            console.print(f"{r['address']}  worker {r['worker_id']}  since {since}  {r['reason']}", highlight=False)
        if not rows:
            console.print("no worker is quarantined")


@fleet_app.command("unquarantine")
def fleet_unquarantine(
    ctx: typer.Context,
    address: str = typer.Argument(..., help="The worker's host:port or URL."),
    router: Optional[str] = _ROUTER,
) -> None:
    """Clear the quarantine of the worker at ADDRESS, also after it is gone; it may join again."""
    with cli_errors():
        _, client = _admin(ctx, router)
        out = client.unquarantine(address)
        console.print(f"cleared {', '.join(out['cleared'])}", highlight=False)


@adapters_app.command("list")
def adapters_list(ctx: typer.Context, router: Optional[str] = _ROUTER) -> None:
    """Registry versions, and which are published on the router (if it is running)."""
    from fedllm.core.adapter_registry import AdapterRegistry
    from fedllm.core.contracts.router_client import ServiceUnavailable

    with cli_errors():
        settings, client = _admin(ctx, router)
        try:
            published = {a["name"]: a for a in client.adapters()}
        except ServiceUnavailable:
            published = {}
        for v in AdapterRegistry(settings.adapters_dir).list():
            row = published.get(v.served_name)
            state = f"published on {', '.join(row['workers']) or 'no worker yet'}" if row else "-"
            if row and row.get("regions"):
                state += f" (regions {', '.join(row['regions'])} only)"
            console.print(f"{v.ref}\t{v.served_name}\t{state}", highlight=False)


@adapters_app.command("publish")
def adapters_publish(
    ctx: typer.Context,
    ref: str = typer.Argument(..., help="NAME[:VERSION] (default: latest)."),
    router: Optional[str] = _ROUTER,
    gate: Optional[Path] = typer.Option(
        None,
        "--gate",
        help=(
            "Gate data set (JSONL): NAME-latest moves only if the version's loss on it is not worse than the "
            "current one's (default: federation.gate_data)."
        ),
    ),
    no_gate: bool = typer.Option(False, "--no-gate", help="Move NAME-latest at once, without the promotion gate."),
    regions: Optional[str] = typer.Option(
        None,
        "--regions",
        help="Comma-separated regions it may be served in (default: federation.serve_regions; none: anywhere).",
    ),
) -> None:
    """Load a registry adapter on the router's workers; it answers as NAME-vVERSION, and NAME-latest moves to it
    (through the promotion gate when a gate data set is given or configured: else it stays under its own name, held
    back)."""
    from fedllm.core.adapter_registry import AdapterRegistry

    with cli_errors():
        settings, client = _admin(ctx, router)
        if regions is not None:
            settings = settings.model_copy(
                update={
                    "federation": settings.federation.model_copy(
                        update={"serve_regions": [r.strip() for r in regions.split(",") if r.strip()]}
                    )
                }
            )
        registry = AdapterRegistry(settings.adapters_dir)
        version = registry.get(ref)
        data = None if no_gate or not settings.federation.gate else gate or settings.federation.gate_data
        if data is not None:
            from fedllm.federation.publishing.gate_publish import gated_publish

            out, decision = gated_publish(settings, client, registry, version, Path(data))
            loss, current = decision.get("loss"), decision.get("current_loss")
            figures = (
                f"loss {loss if loss is None else round(loss, 4)} vs "
                f"{current if current is None else round(current, 4)} of {decision.get('current') or 'none'}"
            )
            if decision["decision"] != "promoted":
                prompts = decision.get("prompts")
                console.print(
                    f"held back: {version.served_name} is served under its own name only ({figures}"
                    f"{'; ' + prompts if prompts and prompts != 'ok' else ''})",
                    highlight=False,
                )
                return
            console.print(f"gate passed ({figures})", highlight=False)
        else:
            out = client.publish_version(version, regions=settings.federation.serve_regions or None)
        aliases = ", ".join(out["aliases"]) or "none moved: it names a newer version"
        where = f", regions {', '.join(out['regions'])}" if out.get("regions") else ""
        console.print(
            f"published {version.served_name} (alias {aliases}{where}) on "
            f"{', '.join(out['workers']) or 'no worker yet'}",
            highlight=False,
        )


@adapters_app.command("show")
def adapters_show(
    ctx: typer.Context,
    ref: str = typer.Argument(..., help="NAME[:VERSION] of a registered adapter (default: latest)."),
    as_json: bool = typer.Option(False, "--json", help="Print the lineage as JSON."),
    router: Optional[str] = _ROUTER,
) -> None:
    """Where a registered adapter version came from: base model and hash, training or federation run and round, silos
    and their weights, strategy, DP and secure aggregation, local steps and rate, metrics; and, when the router
    answers, how it is served (aliases, regions, workers)."""
    import json

    from fedllm.core.adapter_registry import AdapterRegistry
    from fedllm.core.contracts.lineage import format_lineage, lineage
    from fedllm.core.contracts.router_client import ServiceUnavailable

    with cli_errors():
        settings, client = _admin(ctx, router)
        client.timeout_s = 5.0  # how it is served is a bonus: a router that does not answer soon is skipped
        version = AdapterRegistry(settings.adapters_dir).get(ref)
        info = lineage(version.meta)
        try:
            row = next((a for a in client.adapters() if a["name"] == version.served_name), None)
        except ServiceUnavailable:
            row = None
        if as_json:
            if row is not None:
                info["served"] = {k: row.get(k) for k in ("name", "aliases", "regions", "workers")}
            console.print_json(json.dumps(info, default=str))
            return
        for line in format_lineage(info):
            console.print(line, highlight=False)
        if row is not None:
            regions = ", ".join(row.get("regions") or []) or "any"
            console.print(
                f"served as {row['name']} (aliases {', '.join(row['aliases']) or 'none'}), regions {regions}, "
                f"on {', '.join(row['workers']) or 'no worker yet'}",
                highlight=False,
            )


@adapters_app.command("export")
def adapters_export(
    ctx: typer.Context,
    ref: str = typer.Argument(..., help="NAME[:VERSION] of a registered adapter (default: latest)."),
    out: Optional[Path] = typer.Option(None, "--out", help="Output folder (default: ./NAME-vVERSION)."),
) -> None:
    """Write the PEFT folder with its model card (README.md, the YAML header peft and the Hub read, and the lineage)."""
    from fedllm.core.adapter_registry import AdapterRegistry
    from fedllm.train.export import export_adapter

    with cli_errors():
        settings = settings_from(ctx)
        version = AdapterRegistry(settings.adapters_dir).get(ref)
        target = out or Path(version.served_name)
        export_adapter(version.path, target)
        console.print(f"exported {version.ref} to {target} (with README.md model card)", highlight=False)


@adapters_app.command("history")
def adapters_history(
    ctx: typer.Context,
    name: str = typer.Argument(..., help="The alias (NAME-latest) or adapter name NAME."),
    as_json: bool = typer.Option(False, "--json", help="Print the router's answer as JSON."),
    router: Optional[str] = _ROUTER,
) -> None:
    """Each move of an alias: the version it named, when, by whom (admin or a federation round), why."""
    import json

    from fedllm.core.contracts.router_client import latest_alias

    with cli_errors():
        _, client = _admin(ctx, router)
        out = client.history(_alias(name, latest_alias))
        if as_json:
            console.print_json(json.dumps(out))
            return
        console.print(f"{out['alias']} -> {out['current'] or '(none)'}", highlight=False)
        for row in out["history"]:
            console.print(
                f"{row['at']}	{row['name']}	v{row['version']}	{row['by']}	{row['reason']}", highlight=False
            )


@adapters_app.command("rollback")
def adapters_rollback(
    ctx: typer.Context,
    name: str = typer.Argument(..., help="The alias (NAME-latest) or adapter name NAME."),
    to: Optional[str] = typer.Option(
        None, "--to", help="The version (number or NAME-vN) to go back to; default the one before."
    ),
    router: Optional[str] = _ROUTER,
) -> None:
    """Move the alias back at once; requests in flight finish on the version they started on."""
    from fedllm.core.contracts.router_client import latest_alias

    with cli_errors():
        _, client = _admin(ctx, router)
        out = client.rollback(_alias(name, latest_alias), to)
        console.print(f"{out['alias']} now names {out['name']} (was {out['from']})", highlight=False)


def _alias(name: str, latest_alias) -> str:
    """An adapter name NAME means its alias NAME-latest; an alias is taken as given."""
    return name if name.endswith("-latest") else latest_alias(name)


@adapters_app.command("unpublish")
def adapters_unpublish(
    ctx: typer.Context,
    name: str = typer.Argument(..., help="Served name (NAME-vVERSION)."),
    router: Optional[str] = _ROUTER,
) -> None:
    """Unload an adapter from every worker."""
    with cli_errors():
        _, client = _admin(ctx, router)
        client.unpublish(name)
        console.print(f"unpublished {name}", highlight=False)


def register(app: typer.Typer) -> None:
    """Add this module's commands to the `appliance` CLI."""
    app.command("serve")(needs("router", for_what="`appliance serve` (the router)")(serve))
    app.add_typer(fleet_app, name="fleet")
    app.add_typer(keys_app, name="keys")
    app.add_typer(adapters_app, name="adapters")
