"""The appliance's three operator secrets, one per service, so that holding one opens only that service.

| secret | file under `keys/` | setting | opens |
|---|---|---|---|
| router admin token | `admin_token` | `serve.admin_token` | the router's `/admin/*` (workers, adapters, keys) |
| coordinator status token | `status_token` | `federation.status_token` | the coordinator's `/status` beyond loopback |
| console password | `console_password` | `ui.admin_password` | the console's login as `admin` |

Each is the configured value when set, else generated once under `keys/` (mode 0600) by `ensure_token`. The console
holds the first two on its server side to call the services; a person who logs into the console learns neither.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from fedllm.core.secrets import ensure_token

if TYPE_CHECKING:
    from fedllm.core.settings import ApplianceSettings

ADMIN_TOKEN_FILE = "admin_token"
STATUS_TOKEN_FILE = "status_token"
CONSOLE_PASSWORD_FILE = "console_password"


def router_admin_token(settings: ApplianceSettings) -> str:
    """The router's admin token (`serve.admin_token`, else `keys/admin_token`)."""
    return ensure_token(settings.keys_dir, ADMIN_TOKEN_FILE, settings.serve.admin_token)


def coordinator_status_token(settings: ApplianceSettings) -> str:
    """The token the coordinator's `/status` asks for beyond loopback (`federation.status_token`, else
    `keys/status_token`)."""
    return ensure_token(settings.keys_dir, STATUS_TOKEN_FILE, settings.federation.status_token)


def console_password(settings: ApplianceSettings) -> str:
    """The console's password for user `admin` (`ui.admin_password`, else `keys/console_password`)."""
    return ensure_token(settings.keys_dir, CONSOLE_PASSWORD_FILE, settings.ui.admin_password)


LOGIN_LINK_FILE = "console_login_link"


def issue_login_link(settings: ApplianceSettings) -> str:
    """A new one-time console login token (replacing any earlier one), stored 0600 for the console to take at start.

    `appliance up` prints it as a link (`/login-link#TOKEN`), so a newcomer logs in with one click; it opens the
    console once, as user admin, and is gone from disk as soon as the console has started.
    """
    path = settings.keys_dir / LOGIN_LINK_FILE
    path.unlink(missing_ok=True)
    return ensure_token(settings.keys_dir, LOGIN_LINK_FILE)


def take_login_link(settings: ApplianceSettings) -> str | None:
    """The one-time login token `appliance up` left for this console, removed from disk (None when there is none)."""
    path = settings.keys_dir / LOGIN_LINK_FILE
    try:
        token = path.read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        return None
    path.unlink(missing_ok=True)
    return token or None
