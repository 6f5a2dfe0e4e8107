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

from appliance.core.secrets import ensure_token

if TYPE_CHECKING:
    from appliance.core.settings import ApplianceSettings

ADMIN_TOKEN_FILE = "admin_token"
STATUS_TOKEN_FILE = "status_token"
CONSOLE_PASSWORD_FILE = "console_password"


def router_admin_token(settings: ApplianceSettings) -> str:
    """The router's admin token (`serve.admin_token`, else `keys/admin_token`)."""
    return ensure_token(settings.keys_dir, ADMIN_TOKEN_FILE, settings.serve.admin_token)


def coordinator_status_token(settings: ApplianceSettings) -> str:
    """The token the coordinator's `/status` asks for beyond loopback (`federation.status_token`, else `keys/status_token`)."""
    return ensure_token(settings.keys_dir, STATUS_TOKEN_FILE, settings.federation.status_token)


def console_password(settings: ApplianceSettings) -> str:
    """The console's password for user `admin` (`ui.admin_password`, else `keys/console_password`)."""
    return ensure_token(settings.keys_dir, CONSOLE_PASSWORD_FILE, settings.ui.admin_password)
