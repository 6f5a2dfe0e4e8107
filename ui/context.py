"""What every tab needs: the settings, the service clients, the state folder, and a guard for event handlers."""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from fedllm.core.adapter_registry import AdapterRegistry
from fedllm.core.errors import ApplianceError
from fedllm.core.settings import ApplianceSettings
from fedllm.core.tls import client_context
from fedllm.core.tokens import console_password, coordinator_status_token, router_admin_token
from fedllm.ui.services import RouterClient, ServiceClient, coordinator_client

logger = logging.getLogger(__name__)


@dataclass
class ConsoleContext:
    """Shared by the tabs. Built once per console process from the settings."""

    settings: ApplianceSettings
    router: RouterClient
    coordinator: ServiceClient
    registry: AdapterRegistry
    admin_token: str  # the router's (held here, never shown)
    login_password: str  # the console's own password for user admin (ui.admin_password / keys/console_password)
    # (fn, inputs, outputs) the tabs want run when a page opens; the app wires them to `Blocks.load`.
    on_load: list[tuple[Callable[..., Any], list[Any], list[Any]]] = field(default_factory=list)

    @classmethod
    def from_settings(cls, settings: ApplianceSettings) -> "ConsoleContext":
        """Resolve service URLs and tokens (each from its setting or its file under `keys/`: fedllm.core.tokens)."""
        ui = settings.ui
        router_url = ui.router_url or f"{settings.serve.scheme}://127.0.0.1:{settings.serve.port}"
        coordinator_url = (
            ui.coordinator_url or f"{settings.federation.scheme}://127.0.0.1:{settings.federation.status_port}"
        )
        verify = client_context(settings.tls_ca_file)
        admin_token = router_admin_token(settings)
        api_key = settings.serve.api_keys[0].get_secret_value() if settings.serve.api_keys else None
        return cls(
            settings=settings,
            router=RouterClient(
                router_url, admin_token, api_key, ui.request_timeout_s, verify, settings.allow_plain_http
            ),
            coordinator=coordinator_client(
                coordinator_url,
                ui.request_timeout_s,
                coordinator_status_token(settings),
                verify,
                settings.allow_plain_http,
            ),
            registry=AdapterRegistry(settings.adapters_dir),
            admin_token=admin_token,
            login_password=console_password(settings),
        )


def bind(fn: Callable[..., Any], ctx: ConsoleContext) -> Callable[..., Any]:
    """`fn(ctx, *inputs)` as a Gradio event handler of the inputs alone (the tabs' handlers live at module level)."""
    handler = functools.partial(fn, ctx)
    handler.__name__ = fn.__name__  # type: ignore[attr-defined]  # Gradio names the event's API after it
    return handler


def problem(exc: BaseException | str) -> str:
    """A one-paragraph Markdown message for a failure shown in a tab."""
    return f"⚠️ {exc}"


def guarded(fallback: Callable[[str], Any]) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Wrap a Gradio event handler so any failure becomes `fallback(message)` in the tab, never a crash.

    The console is a service boundary: unexpected errors are logged with their traceback, expected ones
    (a service down, bad input) only shown.
    """

    def wrap(fn: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(fn)
        def inner(*args: Any, **kwargs: Any) -> Any:
            try:
                return fn(*args, **kwargs)
            except ApplianceError as exc:
                return fallback(problem(exc))
            except Exception as exc:  # noqa: BLE001 - service boundary: report in the tab, log the traceback
                logger.exception("console handler %s failed", fn.__name__)
                return fallback(problem(f"{type(exc).__name__}: {exc}"))

        return inner

    return wrap
