"""`appliance worker start|join`: one local vLLM worker in the foreground, optionally joined to a remote router.

Secrets never travel on the command line: the worker's API key comes from `--api-key-file` or `VLLM_API_KEY`, the
router's join token from `--token-file` or `APPLIANCE_JOIN_TOKEN`. `worker join` makes a fresh API key for the worker
it starts and hands it to the router over the join call.
"""

from __future__ import annotations

import secrets
from pathlib import Path
from typing import Optional

import typer

from fedllm.appliance.commands.common import cli_errors, console, err_console, needs, settings_from
from fedllm.appliance.extras import require
from fedllm.core.errors import ConfigError
from fedllm.core.model_store import resolve_model
from fedllm.core.net import is_loopback
from fedllm.core.processes import stop_on_signals, wait_for_signal
from fedllm.core.secrets import read_secret
from fedllm.core.settings import ApplianceSettings

worker_app = typer.Typer(help="Run a vLLM worker (LoRA enabled) on this machine.", no_args_is_help=True)

_MODEL = typer.Option(None, "--model", "-m", help="Prepared model name or HF model folder (default: settings.model).")
_PORT = typer.Option(None, "--port", "-p", help="Port (default: worker.base_port).")
_DEVICE = typer.Option(None, "--device", help="cpu | cuda (default: worker.device).")
_HOST = typer.Option("127.0.0.1", "--host", help="Bind address of the worker.")
_KEY_FILE = typer.Option(None, "--api-key-file", help="File holding the worker's API key (else $VLLM_API_KEY).")


def _worker(settings: ApplianceSettings, model: str | None, port: int | None, host: str, api_key: str | None):
    """A not-yet-started VLLMWorker for `model` (a store name or a folder) with the settings' worker section.

    Raises:
        ConfigError: the worker would listen beyond loopback without an API key.
    """
    from fedllm.serve.worker_launcher import VLLMWorker

    if not api_key and not is_loopback(host):
        raise ConfigError(
            f"refusing to start a worker on {host} without an API key: anyone reaching it could use and "
            "reconfigure it; pass --api-key-file or set VLLM_API_KEY"
        )
    model_dir = resolve_model(settings.models_dir, model or settings.model)
    # The served name is the store name (or the folder's name for a path), as `appliance up` announces it.
    # vLLM stays in this command's process group: whoever stops the group (Ctrl-C, `appliance up`) stops vLLM too.
    return VLLMWorker(
        settings.worker,
        model_dir,
        model_dir.name,
        port or settings.worker.base_port,
        settings.logs_dir,
        host=host,
        own_process_group=False,
        api_key=api_key,
    )


@worker_app.command("start")
@needs("worker", "engine", for_what="`appliance worker start`")
def start(
    ctx: typer.Context,
    model: Optional[str] = _MODEL,
    port: Optional[int] = _PORT,
    device: Optional[str] = _DEVICE,
    host: str = _HOST,
    api_key_file: Optional[Path] = _KEY_FILE,
) -> None:
    """Start vLLM's OpenAI server on one model and keep it running until Ctrl-C."""
    from fedllm.serve.worker_launcher import run_until_signal

    with cli_errors():
        settings = settings_from(ctx, {"worker": {"device": device}})
        worker = _worker(
            settings, model, port, host, read_secret(api_key_file, "VLLM_API_KEY", "worker API key", required=False)
        )
        stop = stop_on_signals()  # before the child starts: a SIGTERM while vLLM loads must still stop it
        worker.start()
        console.print(
            f"starting vLLM worker for [bold]{worker.model}[/] on {worker.url} (log {worker.log_path})", highlight=False
        )
        worker.wait_ready(stop=stop)
        if not stop.is_set():
            console.print(f"worker ready: {worker.url}/v1 serves {worker.model}; Ctrl-C stops it", highlight=False)
        code = run_until_signal(worker, stop)
    raise typer.Exit(code=code)


@worker_app.command("join")
def join(
    ctx: typer.Context,
    router: str = typer.Option(..., "--router", help="Router base URL, e.g. http://router-host:8000."),
    token_file: Optional[Path] = typer.Option(
        None, "--token-file", help="File holding the router's join token (else $APPLIANCE_JOIN_TOKEN)."
    ),
    region: str = typer.Option("local", "--region", help="Region label for region-aware routing."),
    url: Optional[str] = typer.Option(
        None, "--url", help="Join an already running worker at this URL instead of starting one."
    ),
    advertise: Optional[str] = typer.Option(
        None,
        "--advertise",
        help="URL the router should use to reach the worker (behind NAT, a proxy or a tunnel); default its own URL.",
    ),
    heartbeat_s: float = typer.Option(10.0, "--heartbeat-s", help="Seconds between heartbeats."),
    capacity: int = typer.Option(
        1, "--capacity", min=1, help="Concurrent requests the worker takes before the router prefers others."
    ),
    model: Optional[str] = _MODEL,
    port: Optional[int] = _PORT,
    device: Optional[str] = _DEVICE,
    host: str = _HOST,
    api_key_file: Optional[Path] = typer.Option(
        None, "--api-key-file", help="With --url: the running worker's API key file (else $VLLM_API_KEY)."
    ),
    drain_s: float = typer.Option(
        30.0,
        "--drain-s",
        min=0,
        help=(
            "On exit, seconds to wait for the requests in flight on this worker to finish after the router stops "
            "sending new ones (0: leave at once)."
        ),
    ),
) -> None:
    """Register a worker with a router, heartbeat, and on exit (Ctrl-C, SIGTERM, `appliance job stop`) drain, then
    leave.

    A worker started here gets a fresh API key, which the router receives over the join call.
    """
    from fedllm.core.contracts.router_client import RouterClient
    from fedllm.core.tls import client_context
    from fedllm.serve.worker_launcher import RouterRegistration, run_until_signal, served_models

    with cli_errors():
        settings = settings_from(ctx, {"worker": {"device": device}})
        if not url:  # it starts a worker here; joining a running one (--url) needs only the base install
            require("worker", "engine", for_what="`appliance worker join` (without --url it starts a worker)")
        token = read_secret(token_file, "APPLIANCE_JOIN_TOKEN", "router's join token", required=True)
        # The router refuses a worker without a key (its gate would answer anyone): a running one must have one.
        api_key = (
            read_secret(api_key_file, "VLLM_API_KEY", "worker API key", required=True)
            if url
            else secrets.token_urlsafe(32)
        )
        stop = stop_on_signals()
        worker = None if url else _worker(settings, model, port, host, api_key).start()
        if worker is not None:
            worker.wait_ready(stop=stop)
            if stop.is_set():
                raise typer.Exit(code=0)
        verify = client_context(settings.tls_ca_file)  # an https router's or worker's certificate is verified
        if worker is None:
            assert url  # no worker was started here only because --url names a running one
            worker_url, models = advertise or url, served_models(url, api_key, verify=verify)
        else:
            worker_url, models = advertise or worker.url, [worker.model]
        if not models:
            err_console.print(f"[bold red]error:[/] {worker_url}/v1/models lists no model; is a worker running there?")
            raise typer.Exit(code=1)
        membership = RouterRegistration(
            RouterClient(router, verify=verify, allow_plain_http=settings.allow_plain_http),
            token,
            worker_url,
            region,
            models,
            capacity=capacity,
            api_key=api_key,
            max_loras=None if url else settings.worker.max_loras,
        )
        try:
            worker_id = membership.register()
            console.print(
                f"joined {router} as worker {worker_id} ({worker_url}, region {region}, models {', '.join(models)})",
                highlight=False,
            )
            membership.start_heartbeats(heartbeat_s)
            code = run_until_signal(worker, stop) if worker else int(not wait_for_signal(stop))
        finally:
            membership.drain(drain_s)
            membership.deregister()
            if worker is not None:
                worker.stop()
    raise typer.Exit(code=code)


def register(app: typer.Typer) -> None:
    """Add this module's commands to the `appliance` CLI."""
    app.add_typer(worker_app, name="worker")
