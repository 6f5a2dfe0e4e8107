"""A small synchronous client of the router's admin API, for the CLI (`appliance fleet`, `appliance adapters`)."""

from __future__ import annotations

from typing import Any

import httpx

from appliance.core.errors import ApplianceError
from appliance.core.net import connectable_host


class RouterUnavailable(ApplianceError):
    """The router could not be reached or refused an admin call; the message says which and why."""


class AdminClient:
    """Calls `/admin/*` on the router at `url` with the admin token."""

    def __init__(self, url: str, token: str, *, timeout_s: float = 180.0):
        self.url = url.rstrip("/")
        self._headers = {"Authorization": f"Bearer {token}"}
        self.timeout_s = timeout_s

    def _call(self, method: str, path: str, payload: dict[str, Any] | None = None) -> Any:
        try:
            r = httpx.request(method, self.url + path, json=payload, headers=self._headers, timeout=self.timeout_s)
        except httpx.HTTPError as exc:
            raise RouterUnavailable(f"cannot reach the router at {self.url} ({exc}); is `appliance serve` or `appliance up` running?") from exc
        if r.status_code >= 400:
            try:
                message = r.json()["error"]["message"]
            except (ValueError, KeyError, TypeError):
                message = r.text[:300]
            raise RouterUnavailable(f"router answered {r.status_code} to {method} {path}: {message}")
        return r.json()

    def workers(self) -> list[dict[str, Any]]:
        """`GET /admin/workers`."""
        return self._call("GET", "/admin/workers")

    def adapters(self) -> list[dict[str, Any]]:
        """`GET /admin/adapters`."""
        return self._call("GET", "/admin/adapters")

    def publish(self, name: str, path: str, aliases: list[str]) -> dict[str, Any]:
        """`POST /admin/adapters`: load `path` as `name` (answering also to `aliases`)."""
        return self._call("POST", "/admin/adapters", {"name": name, "path": path, "aliases": aliases})

    def unpublish(self, name: str) -> dict[str, Any]:
        """`DELETE /admin/adapters/{name}`."""
        return self._call("DELETE", f"/admin/adapters/{name}")


def router_url(host: str, port: int) -> str:
    """The URL a local client uses for a router bound to `host:port` (a wildcard bind is reached on loopback)."""
    return f"http://{connectable_host(host)}:{port}"
