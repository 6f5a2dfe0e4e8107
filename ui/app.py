"""The console: one Gradio app with the Chat, Train, Federation, Fleet and Adapters tabs.

`build_console(settings)` returns the `gr.Blocks`; `launch_console(settings)` serves it, with a login in front
when it listens beyond the loopback interface (user `admin` with the console password, `ui.admin_password` or
`keys/console_password`, never the router's admin token; or `ui.users`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from appliance.core.errors import ConfigError
from appliance.core.net import is_loopback
from appliance.core.secrets import same_secret
from appliance.core.settings import ApplianceSettings
from appliance.core.tls import check_public_bind, check_server_files
from ui.context import ConsoleContext

logger = logging.getLogger(__name__)

TITLE = "FedLLM Appliance"


def build_console(settings: ApplianceSettings, ctx: ConsoleContext | None = None):
    """The console as a `gr.Blocks` (not launched)."""
    import gradio as gr

    from ui.tabs import adapters, chat, federation, fleet, train

    ctx = ctx or ConsoleContext.from_settings(settings)
    with gr.Blocks(title=TITLE) as demo:
        gr.Markdown(f"## {TITLE}  \nRouter `{ctx.router.base_url}` · coordinator `{ctx.coordinator.base_url}` · "
                    f"home `{settings.home}`", elem_id="console-header")
        with gr.Tabs():
            for label, module in (("Chat", chat), ("Train", train), ("Federation", federation), ("Fleet", fleet),
                                  ("Adapters", adapters)):
                with gr.Tab(label, id=label.lower(), elem_id=f"tab-{label.lower()}"):
                    module.build(ctx)
        for fn, inputs, outputs in ctx.on_load:
            demo.load(fn, inputs, outputs, show_progress="hidden")
    return demo


def needs_login(host: str) -> bool:
    """Whether the console must ask for a login: any bind address other than loopback."""
    return not is_loopback(host)


def make_auth(admin_password: str, users: dict[str, str]) -> Callable[[str, str], bool]:
    """A Gradio auth function: `admin` + the console password, or a configured user and password (constant-time)."""

    def check(username: str, password: str) -> bool:
        if username == "admin" and same_secret(password, admin_password):
            return True
        expected = users.get(username)
        return expected is not None and same_secret(password, expected)

    return check


def launch_console(settings: ApplianceSettings, *, host: str | None = None, port: int | None = None) -> None:
    """Serve the console until interrupted.

    Raises:
        ConfigError: the port is taken, or the certificate or key (ui.tls_cert, ui.tls_key) cannot be used.
    """
    import gradio as gr

    host = host or settings.ui.host
    port = settings.ui.port if port is None else port
    check_public_bind("console", host, settings.ui.tls_cert is not None, settings.env, "ui")
    ctx = ConsoleContext.from_settings(settings)
    demo = build_console(settings, ctx)
    kwargs: dict[str, Any] = {}
    if needs_login(host):
        users = {u: p.get_secret_value() for u, p in settings.ui.users.items()}
        kwargs["auth"] = make_auth(ctx.login_password, users)
        kwargs["auth_message"] = "Log in as admin with the console password (keys/console_password, shown by `appliance up`), or a configured user."
    if settings.ui.tls_cert is not None:
        check_server_files(settings.ui.tls_cert, settings.ui.tls_key)
        # ssl_verify only concerns Gradio's start-up probe of its own loopback URL, which a certificate made for the
        # console's public name would not match; every peer the console calls is still verified (ConsoleContext).
        kwargs.update(ssl_certfile=str(settings.ui.tls_cert), ssl_keyfile=str(settings.ui.tls_key), ssl_verify=False)
    demo.queue(default_concurrency_limit=16)
    logger.info("console on %s://%s:%d (login %s)", settings.ui.scheme, host, port, "required" if "auth" in kwargs else "not required on loopback")
    try:
        demo.launch(server_name=host, server_port=port, show_error=True, quiet=True, theme=gr.themes.Soft(),
                    footer_links=[], ssr_mode=False, max_file_size=int(settings.ui.max_upload_mb * 2**20), **kwargs)
    except OSError as exc:
        raise ConfigError(f"cannot serve the console on {host}:{port}: {exc}; pick another with --port") from exc
