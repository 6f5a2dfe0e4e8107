"""The one client of the router's HTTP API (docs/CONTRACTS.md), and the one rule for publishing an adapter version.

Every user of the router's `/admin` API goes through `RouterClient`: the CLI (`appliance fleet`, `appliance
adapters`), `appliance worker join` (register with the join token, then heartbeat and leave with the worker's own
secret), the console and the federation's publisher. It is synchronous (httpx); the callers that need concurrency
call it from a thread.

`publish_version` is the only way an adapter version gets published: under its served name `NAME-vVERSION` with the
alias `NAME-latest` (`latest_alias`). The router moves an alias atomically to the newest version it is given.
"""

from __future__ import annotations

import json
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx

from fedllm.core.errors import ApplianceError
from fedllm.core.net import connectable_host
from fedllm.core.tls import refuse_plain_http_token

if TYPE_CHECKING:
    from fedllm.core.adapter_registry import AdapterVersion

ROUTER_HINT = "Start it with `appliance serve` or `appliance up`."


class ServiceUnavailable(ApplianceError):
    """A service could not be reached, refused the call, or answered something unexpected; the message says which.

    `status` is the HTTP status of a refusal (None when the service was not reached at all).
    """

    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        self.status = status


@dataclass
class ServiceClient:
    """A small synchronous JSON client for one service.

    Args:
        name: What the service is, for messages ("router", "federation coordinator").
        base_url: Its base URL.
        token: Bearer token sent with every call, or None.
        timeout_s: Timeout of one call.
        hint: What to run when it is down.
        verify: TLS verification of an https service: True (the system's trust store) or an `ssl.SSLContext`
            (`fedllm.core.tls.client_context(settings.tls_ca_file)` for a private CA).
        allow_plain_http: send tokens over plain http:// beyond loopback (settings' `allow_plain_http`; refused by
            default: `fedllm.core.tls.refuse_plain_http_token`).
    """

    name: str
    base_url: str
    token: str | None = None
    timeout_s: float = 10.0
    hint: str = ""
    verify: bool | ssl.SSLContext = True
    allow_plain_http: bool = False

    def headers(self, token: str | None = None) -> dict[str, str]:
        """The Authorization header for `token` (default: the client's own), or none."""
        token = token if token is not None else self.token
        return {"Authorization": f"Bearer {token}"} if token else {}

    def request(self, method: str, path: str, *, token: str | None = None, **kwargs: Any) -> Any:
        """Call `method path` and return the decoded JSON (or text for non-JSON answers).

        Args:
            token: a bearer token for this call instead of the client's own.
            kwargs: passed to `httpx.request` (`json=`, `timeout=`).

        Raises:
            ServiceUnavailable: connection failed, timed out, or the answer was an HTTP error (its `status` set).
            ConfigError: a token would go over plain HTTP beyond loopback.
        """
        url = f"{self.base_url.rstrip('/')}{path}"
        kwargs.setdefault("timeout", self.timeout_s)
        headers = self.headers(token)
        if headers:
            refuse_plain_http_token(url, self.allow_plain_http)
        try:
            resp = httpx.request(method, url, headers=headers, verify=self.verify, **kwargs)
        except httpx.HTTPError as exc:
            raise ServiceUnavailable(
                (
                    f"The {self.name} at {self.base_url} is not reachable ({type(exc).__name__}: {exc}). {self.hint}"
                ).strip()
            ) from exc
        if resp.status_code >= 400:
            raise ServiceUnavailable(
                f"The {self.name} answered HTTP {resp.status_code} to {method} {path}: {error_text(resp)}",
                resp.status_code,
            )
        if "json" in resp.headers.get("content-type", ""):
            return resp.json()
        return resp.text


def error_text(resp: httpx.Response) -> str:
    """The message of an OpenAI-style or FastAPI error body, else the start of the body."""
    try:
        body = resp.json()
    except ValueError:
        return resp.text[:300]
    if isinstance(body, dict):
        err = body.get("error")
        if isinstance(err, dict) and err.get("message"):
            return str(err["message"])
        if isinstance(err, str):
            return err
        if body.get("detail"):
            return str(body["detail"])
    return json.dumps(body)[:300]


def latest_alias(name: str) -> str:
    """The stable alias of adapter `name` (a training run's or a federation's): `<name>-latest`."""
    return f"{name}-latest"


class RouterClient(ServiceClient):
    """The router's admin API (`/admin/*`, admin token by default; the join and worker calls pass their own)."""

    def __init__(
        self,
        base_url: str,
        token: str | None = None,
        *,
        timeout_s: float = 30.0,
        verify: bool | ssl.SSLContext = True,
        allow_plain_http: bool = False,
    ):
        super().__init__("router", base_url.rstrip("/"), token, timeout_s, ROUTER_HINT, verify, allow_plain_http)

    # -- workers --
    def workers(self) -> list[dict[str, Any]]:
        """`GET /admin/workers`."""
        return self.request("GET", "/admin/workers")

    def register_worker(
        self,
        url: str,
        *,
        region: str = "local",
        models: list[str] | None = None,
        capacity: int | None = None,
        api_key: str | None = None,
        token: str | None = None,
        max_loras: int | None = None,
    ) -> dict[str, Any]:
        """`POST /admin/workers` (join token or admin token); returns `{"id", "secret", "healthy", ...}`.

        `api_key` is the worker's own API key, which the router then sends on every call to it; `max_loras` the
        adapters it can hold at once.
        """
        body: dict[str, Any] = {"url": url, "region": region, "models": list(models or [])}
        if capacity is not None:
            body["capacity"] = capacity
        if max_loras is not None:
            body["max_loras"] = max_loras
        if api_key:
            body["api_key"] = api_key
        return self.request("POST", "/admin/workers", json=body, token=token)

    def heartbeat(self, worker_id: str, *, token: str | None = None) -> dict[str, Any]:
        """`POST /admin/workers/{id}/heartbeat` (the worker's secret or the admin token)."""
        return self.request("POST", f"/admin/workers/{worker_id}/heartbeat", token=token)

    def drain(self, worker_id: str, *, token: str | None = None) -> dict[str, Any]:
        """`POST /admin/workers/{id}/drain` (the worker's secret or the admin token)."""
        return self.request("POST", f"/admin/workers/{worker_id}/drain", token=token)

    def clear(self, worker_id: str) -> dict[str, Any]:
        """`POST /admin/workers/{id}/clear` (admin): lift a worker's quarantine."""
        return self.request("POST", f"/admin/workers/{worker_id}/clear")

    def assign_region(self, worker_id: str, region: str) -> dict[str, Any]:
        """`POST /admin/workers/{id}/region` (admin): the operator puts a joined worker in `region` (data residency)."""
        return self.request("POST", f"/admin/workers/{worker_id}/region", json={"region": region})

    def quarantine(self) -> list[dict[str, Any]]:
        """`GET /admin/quarantine` (admin): the sticky quarantine records."""
        return self.request("GET", "/admin/quarantine")

    def unquarantine(self, address: str) -> dict[str, Any]:
        """`DELETE /admin/quarantine/{address}` (admin): clear the quarantine of the worker at host:port (or URL)."""
        from urllib.parse import quote

        return self.request("DELETE", f"/admin/quarantine/{quote(address, safe='')}")

    def remove_worker(self, worker_id: str, *, token: str | None = None) -> dict[str, Any]:
        """`DELETE /admin/workers/{id}` (the worker's secret or the admin token)."""
        return self.request("DELETE", f"/admin/workers/{worker_id}", token=token)

    # -- adapters --
    def adapters(self) -> list[dict[str, Any]]:
        """`GET /admin/adapters`."""
        return self.request("GET", "/admin/adapters")

    def publish(
        self,
        name: str,
        path: str,
        aliases: list[str],
        *,
        base_model: str | None = None,
        version: int | None = None,
        by: str | None = None,
        held_back: dict[str, Any] | None = None,
        timeout_s: float | None = None,
        regions: list[str] | None = None,
    ) -> dict[str, Any]:
        """`POST /admin/adapters`: load the PEFT folder `path` as `name`; each alias moves to it (unless it names a
        newer `version` already)."""
        body: dict[str, Any] = {"name": name, "path": path, "aliases": list(aliases)}
        if base_model:
            body["base_model"] = base_model
        if version is not None:
            body["version"] = version
        if by:
            body["by"] = by
        if held_back:
            body["held_back"] = held_back
        if regions:
            body["regions"] = list(regions)
        return self.request("POST", "/admin/adapters", json=body, timeout=timeout_s or max(self.timeout_s, 180.0))

    def history(self, alias: str) -> dict[str, Any]:
        """`GET /admin/adapters/{alias}/history`: each move of the alias."""
        return self.request("GET", f"/admin/adapters/{alias}/history")

    def rollback(self, alias: str, to: str | None = None) -> dict[str, Any]:
        """`POST /admin/adapters/{alias}/rollback`: move the alias back (to `to`, else the version before)."""
        return self.request("POST", f"/admin/adapters/{alias}/rollback", json={"to": to} if to else {})

    def unpublish(self, name: str) -> dict[str, Any]:
        """`DELETE /admin/adapters/{name}`."""
        return self.request("DELETE", f"/admin/adapters/{name}")

    def publish_version(
        self,
        version: AdapterVersion,
        *,
        path: str | Path | None = None,
        timeout_s: float | None = None,
        by: str | None = None,
        promote: bool = True,
        gate: dict[str, Any] | None = None,
        regions: list[str] | None = None,
    ) -> dict[str, Any]:
        """Publish a registry version: served as `NAME-vVERSION`, and `NAME-latest` moves to it.

        Args:
            version: the registered version.
            path: where the workers read its folder, if not `version.path` (remote workers).
            timeout_s: timeout of the call (loading on a worker can take a while).
            promote: move `NAME-latest` to it (False: its own name only).
            gate: the promotion gate's decision; with `promote=False` the alias history records it as held back.
            regions: the regions it may be served in (`federation.serve_regions`; None: anywhere).

        Returns:
            The router's answer (`{"name", "aliases", "workers"}`). The version's base model goes along, so the
            router loads it only on workers of that model.
        """
        aliases = [latest_alias(version.name)] if promote else []  # held back by the gate: its own name only
        held_back = (
            None
            if promote or gate is None
            else {
                "alias": latest_alias(version.name),
                **{k: gate.get(k) for k in ("loss", "current_loss", "prompts", "error")},
            }
        )
        return self.publish(
            version.served_name,
            str(path or version.path),
            aliases,
            base_model=served_base_model(version),
            version=version.version,
            by=by or published_by(version),
            held_back=held_back,
            timeout_s=timeout_s,
            regions=regions,
        )


def published_by(version: AdapterVersion) -> str:
    """Who a version's publish is recorded as in the alias history: its federation round, else the admin."""
    if version.meta.get("kind") == "federated" and version.meta.get("round") is not None:
        return f"federation {version.meta.get('run', version.name)} round {version.meta['round']}"
    return "admin"


def served_base_model(version: AdapterVersion) -> str | None:
    """The name workers serve a version's base model under (its folder's or store name's last part, as `appliance
    worker` names it), from the version's `base_model` meta; None when the version does not say."""
    base = version.meta.get("base_model")
    return Path(str(base)).name or None if base else None


def router_url(host: str, port: int, scheme: str = "http") -> str:
    """The URL a local client uses for a router bound to `host:port` (a wildcard bind is reached on loopback)."""
    return f"{scheme}://{connectable_host(host)}:{port}"


def canary_label(worker: dict[str, Any]) -> str:
    """The canary column of a `GET /admin/workers` row (CLI and console): QUARANTINED, NO TRAFFIC with its reason, the
    verdict with the models it gets no traffic for, or the verdict alone."""
    if worker.get("quarantined"):
        return "QUARANTINED"
    verdict = str(worker.get("canary") or "")
    unverified = ", ".join(worker.get("unverified") or [])
    if worker.get("no_traffic"):
        return f"NO TRAFFIC: {worker['no_traffic']}"
    return f"{verdict} (no traffic for unverified {unverified})" if unverified else verdict
