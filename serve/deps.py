"""Request dependencies of the admin routes: bearer-token checks against the admin and join tokens."""

from __future__ import annotations

from fastapi import Request

from appliance.core.secrets import same_secret
from serve.errors import RouterError


def _bearer(request: Request) -> str:
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    return token.strip() if scheme.lower() == "bearer" else ""


def require_admin(request: Request) -> None:
    """Allow only the admin token.

    Raises:
        RouterError: 401 without a valid admin token.
    """
    if not same_secret(_bearer(request), request.app.state.admin_token):
        raise RouterError(401, "this admin route needs `Authorization: Bearer <admin token>` (printed by `appliance up`, stored in keys/admin_token)")


def require_admin_or_join(request: Request) -> None:
    """Allow the admin token or the join token (worker registration, heartbeat, deregistration).

    Raises:
        RouterError: 401 without a valid admin or join token.
    """
    token = _bearer(request)
    state = request.app.state
    if not (same_secret(token, state.admin_token) or same_secret(token, state.join_token)):
        raise RouterError(401, "worker registration needs `Authorization: Bearer <join token>` (keys/join_token on the router)")
