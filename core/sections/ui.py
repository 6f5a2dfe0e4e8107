"""Settings of the Gradio console (`ui/`)."""

from __future__ import annotations

from pydantic import Field, SecretStr

from fedllm.core.sections.tls import ServesTLS


class UISettings(ServesTLS):
    """Where the console listens, how it logs people in, and where it finds the services it fronts."""

    host: str = Field("127.0.0.1", description="Console bind address; beyond 127.0.0.1 a login is required.")
    require_login: bool = Field(
        True,
        description=(
            "Ask for a login on loopback too (beyond loopback it is always asked); `appliance up` prints a "
            "one-time login link."
        ),
    )
    port: int = Field(7860, ge=0, le=65535, description="Console port.")
    router_url: str | None = Field(None, description="Router base URL; None = http://127.0.0.1:<serve.port>.")
    coordinator_url: str | None = Field(
        None, description="Federation coordinator status base URL; None = http://127.0.0.1:<federation.status_port>."
    )
    admin_password: SecretStr | None = Field(
        None,
        description=(
            "Password of the console's user 'admin'; generated under keys/console_password if unset (not the "
            "router's admin token)."
        ),
    )
    users: dict[str, SecretStr] = Field(
        default_factory=dict,
        description="Extra console logins (user -> password), besides user 'admin' (ui.admin_password).",
    )
    poll_interval_s: float = Field(
        2.0, gt=0, description="Seconds between refreshes of live views (training progress, federation)."
    )
    max_upload_mb: float = Field(
        100.0, gt=0, description="Largest training file the console accepts, in MB (1 MB = 2**20 bytes)."
    )
    request_timeout_s: float = Field(
        10.0, gt=0, description="Timeout of the console's calls to the router and coordinator (not chat streams)."
    )
