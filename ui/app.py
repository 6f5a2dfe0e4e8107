"""The console: one Gradio app with the Chat, Train, Federation, Fleet, Adapters and Jobs tabs.

`build_console(settings)` returns the `gr.Blocks`; `launch_console(settings)` serves it, with a login in front
(`ui/login.py`: user `admin` with the console password, `ui.admin_password` or `keys/console_password`, never the
router's admin token; `ui.users`; or once, the login link `appliance up` prints) unless `ui.require_login` is off on a
loopback bind. Uploads and exports go to a private temporary folder (0700, under the appliance home) removed at exit.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fedllm.core.errors import ConfigError
from fedllm.core.net import is_loopback
from fedllm.core.settings import ApplianceSettings
from fedllm.core.tls import check_public_bind, check_server_files
from fedllm.core.tokens import take_login_link
from fedllm.ui.context import ConsoleContext
from fedllm.ui.login import LoginGate, LoginLinkPage

logger = logging.getLogger(__name__)

TITLE = "FedLLM Appliance"


def build_console(settings: ApplianceSettings, ctx: ConsoleContext | None = None):
    """The console as a `gr.Blocks` (not launched)."""
    import gradio as gr

    from fedllm.ui.tabs import adapters, chat, federation, fleet, jobs, train

    ctx = ctx or ConsoleContext.from_settings(settings)
    with gr.Blocks(title=TITLE) as demo:
        gr.Markdown(
            f"## {TITLE}  \nRouter `{ctx.router.base_url}` · coordinator `{ctx.coordinator.base_url}` · "
            f"home `{settings.home}`",
            elem_id="console-header",
        )
        with gr.Tabs():
            for label, module in (
                ("Chat", chat),
                ("Train", train),
                ("Federation", federation),
                ("Fleet", fleet),
                ("Adapters", adapters),
                ("Jobs", jobs),
            ):
                with gr.Tab(label, id=label.lower(), elem_id=f"tab-{label.lower()}"):
                    module.build(ctx)
        for fn, inputs, outputs in ctx.on_load:
            demo.load(fn, inputs, outputs, show_progress="hidden")
    return demo


def needs_login(host: str, require_login: bool = False) -> bool:
    """Whether the console must ask for a login: any bind address other than loopback, or `ui.require_login`."""
    return require_login or not is_loopback(host)


def make_auth(admin_password: str, users: dict[str, str], once: str | None = None) -> Callable[[str, str], bool]:
    """A Gradio auth function: `admin` + the console password, a configured user and password, or once `once`
    (constant-time, rate-limited: `fedllm.ui.login.LoginGate`)."""
    return LoginGate(admin_password, users, once=once)


def private_temp_dir(settings: ApplianceSettings) -> Path:
    """A new folder for this console's uploads and exports (mode 0700, under `home/tmp`), instead of the shared
    `/tmp/gradio`; Gradio is pointed at it through `GRADIO_TEMP_DIR`."""
    root = settings.home / "tmp"
    root.mkdir(parents=True, exist_ok=True)
    path = Path(tempfile.mkdtemp(prefix="console-", dir=root))  # mode 0700
    os.environ["GRADIO_TEMP_DIR"] = str(path)
    return path


def launch_console(settings: ApplianceSettings, *, host: str | None = None, port: int | None = None) -> None:
    """Serve the console until interrupted.

    Raises:
        ConfigError: the port is taken, or the certificate or key (ui.tls_cert, ui.tls_key) cannot be used.
    """
    host = host or settings.ui.host
    port = settings.ui.port if port is None else port
    check_public_bind("console", host, settings.ui.tls_cert is not None, settings.env, "ui")
    temp_dir = private_temp_dir(settings)  # before Gradio is imported: some of its modules read it at import
    try:
        _serve(settings, host, port)
    finally:
        shutil.rmtree(temp_dir, ignore_errors=True)


def _serve(settings: ApplianceSettings, host: str, port: int) -> None:
    import gradio as gr

    # SIGTERM (the supervisor's stop) unwinds like Ctrl-C, so the private folder is removed.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    ctx = ConsoleContext.from_settings(settings)
    demo = build_console(settings, ctx)
    kwargs: dict[str, Any] = {}
    if needs_login(host, settings.ui.require_login):
        from starlette.middleware import Middleware

        users = {u: p.get_secret_value() for u, p in settings.ui.users.items()}
        kwargs["auth"] = make_auth(ctx.login_password, users, once=take_login_link(settings))
        kwargs["app_kwargs"] = {"middleware": [Middleware(LoginLinkPage)]}
        kwargs["auth_message"] = (
            "Log in as admin with the console password (keys/console_password, shown by `appliance up`), or a "
            "configured user."
        )
    if settings.ui.tls_cert is not None:
        check_server_files(settings.ui.tls_cert, settings.ui.tls_key)
        # ssl_verify only concerns Gradio's start-up probe of its own loopback URL, which a certificate made for the
        # console's public name would not match; every peer the console calls is still verified (ConsoleContext).
        kwargs.update(ssl_certfile=str(settings.ui.tls_cert), ssl_keyfile=str(settings.ui.tls_key), ssl_verify=False)
    demo.queue(default_concurrency_limit=16)
    logger.info(
        "console on %s://%s:%d (login %s)",
        settings.ui.scheme,
        host,
        port,
        "required" if "auth" in kwargs else "not required on loopback",
    )
    try:
        demo.launch(
            server_name=host,
            server_port=port,
            show_error=True,
            quiet=True,
            theme=gr.themes.Soft(),
            footer_links=[],
            ssr_mode=False,
            max_file_size=int(settings.ui.max_upload_mb * 2**20),
            **kwargs,
        )
    except OSError as exc:
        raise ConfigError(f"cannot serve the console on {host}:{port}: {exc}; pick another with --port") from exc
