"""The console's HTTP clients for the router (OpenAI + admin API) and the federation coordinator's status.

Every failure to reach a service becomes `ServiceUnavailable` with a message that names the service, its URL and
what to start, so a tab can show it instead of crashing. Nothing here imports `serve/` or `federation/`.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx

from appliance.core.errors import ApplianceError

logger = logging.getLogger(__name__)


class ServiceUnavailable(ApplianceError):
    """A service the console talks to is down, refused the call, or answered something unexpected."""


@dataclass(frozen=True)
class ServiceClient:
    """A small synchronous JSON client for one service.

    Args:
        name: What the service is, for messages ("router", "federation coordinator").
        base_url: Its base URL.
        token: Bearer token sent with every call, or None.
        timeout_s: Timeout of one call.
        hint: What to run when it is down.
    """

    name: str
    base_url: str
    token: str | None = None
    timeout_s: float = 10.0
    hint: str = ""

    def _headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"} if self.token else {}

    def request(self, method: str, path: str, **kwargs: Any) -> Any:
        """Call `method path` and return the decoded JSON (or text for non-JSON answers).

        Raises:
            ServiceUnavailable: connection failed, timed out, or the answer was an HTTP error.
        """
        url = f"{self.base_url.rstrip('/')}{path}"
        kwargs.setdefault("timeout", self.timeout_s)
        try:
            resp = httpx.request(method, url, headers=self._headers(), **kwargs)
        except httpx.HTTPError as exc:
            raise ServiceUnavailable(
                f"The {self.name} at {self.base_url} is not reachable ({type(exc).__name__}). {self.hint}".strip()
            ) from exc
        if resp.status_code >= 400:
            raise ServiceUnavailable(f"The {self.name} answered HTTP {resp.status_code} to {method} {path}: {_error_text(resp)}")
        if "json" in resp.headers.get("content-type", ""):
            return resp.json()
        return resp.text


def _error_text(resp: httpx.Response) -> str:
    """The message of an OpenAI-style or FastAPI error body, else the start of the body."""
    try:
        body = resp.json()
    except ValueError:
        return resp.text[:300]
    if isinstance(body, dict):
        err = body.get("error")
        if isinstance(err, dict) and err.get("message"):
            return str(err["message"])
        if body.get("detail"):
            return str(body["detail"])
    return json.dumps(body)[:300]


class RouterClient:
    """The router: models and chat through `/v1/*` (API key), fleet and adapters through `/admin/*` (admin token)."""

    def __init__(self, base_url: str, admin_token: str | None, api_key: str | None = None, timeout_s: float = 10.0):
        hint = "Start it with `appliance serve` or `appliance up`."
        self.base_url = base_url.rstrip("/")
        self.api = ServiceClient("router", self.base_url, api_key, timeout_s, hint)
        self.admin = ServiceClient("router", self.base_url, admin_token, timeout_s, hint)

    def models(self) -> list[str]:
        """Model and adapter names the router answers to (`GET /v1/models`)."""
        data = self.api.request("GET", "/v1/models")
        return [m["id"] for m in data.get("data", [])] if isinstance(data, dict) else []

    def stream_chat(self, model: str, messages: list[dict[str, str]], temperature: float, max_tokens: int) -> Iterator[str]:
        """Yield the text pieces of a streamed chat completion through the router.

        Raises:
            ServiceUnavailable: the router is down or answered an error, or the stream ended with an error event.
        """
        body = {"model": model, "messages": messages, "temperature": temperature, "max_tokens": max_tokens, "stream": True}
        url = f"{self.base_url}/v1/chat/completions"
        try:
            with httpx.stream("POST", url, json=body, headers=self.api._headers(), timeout=httpx.Timeout(600.0, connect=5.0)) as resp:
                if resp.status_code >= 400:
                    resp.read()
                    raise ServiceUnavailable(f"The router answered HTTP {resp.status_code}: {_error_text(resp)}")
                for line in resp.iter_lines():
                    piece = parse_sse_line(line)
                    if piece is None:
                        continue
                    if piece is STREAM_DONE:
                        return
                    yield piece
        except httpx.HTTPError as exc:
            raise ServiceUnavailable(f"The router at {self.base_url} is not reachable ({type(exc).__name__}). {self.api.hint}") from exc

    def workers(self) -> list[dict[str, Any]]:
        """`GET /admin/workers`."""
        return self.admin.request("GET", "/admin/workers")

    def add_worker(self, url: str, region: str) -> str:
        """`POST /admin/workers`; returns the new worker's id."""
        return self.admin.request("POST", "/admin/workers", json={"url": url, "region": region, "models": [], "capacity": 1})["id"]

    def drain_worker(self, worker_id: str) -> None:
        """`POST /admin/workers/{id}/drain`."""
        self.admin.request("POST", f"/admin/workers/{worker_id}/drain")

    def adapters(self) -> list[dict[str, Any]]:
        """`GET /admin/adapters`: what the fleet serves."""
        data = self.admin.request("GET", "/admin/adapters")
        if isinstance(data, dict):  # tolerate {"data": [...]} or {"adapters": [...]}
            data = data.get("data", data.get("adapters", []))
        return list(data)

    def publish(self, name: str, path: str, aliases: list[str]) -> None:
        """`POST /admin/adapters`: load a PEFT folder on the fleet under `name` and `aliases`."""
        self.admin.request("POST", "/admin/adapters", json={"name": name, "path": path, "aliases": aliases}, timeout=120.0)

    def unpublish(self, name: str) -> None:
        """`DELETE /admin/adapters/{name}`."""
        self.admin.request("DELETE", f"/admin/adapters/{name}")

    def metrics_text(self) -> str:
        """`GET /metrics` (Prometheus text)."""
        return str(self.api.request("GET", "/metrics"))


STREAM_DONE: Any = object()


def parse_sse_line(line: str) -> Any:
    """The content of one SSE line of a chat stream: text, `STREAM_DONE`, or None for lines without content.

    Raises:
        ServiceUnavailable: the line is an error event (the router ends a broken stream with one).
    """
    if not line.startswith("data:"):
        return None
    data = line[5:].strip()
    if data == "[DONE]":
        return STREAM_DONE
    try:
        chunk = json.loads(data)
    except ValueError:
        return None
    if "error" in chunk:
        err = chunk["error"]
        raise ServiceUnavailable(f"the stream ended with an error: {err.get('message', err) if isinstance(err, dict) else err}")
    choices = chunk.get("choices") or []
    if not choices:
        return None
    return (choices[0].get("delta") or {}).get("content") or None


_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+([-+0-9.eEinfNa]+)")


def summarize_metrics(text: str) -> dict[str, float]:
    """Sum Prometheus samples by metric name (labels dropped): enough for "metrics at a glance"."""
    sums: dict[str, float] = {}
    for line in text.splitlines():
        m = _SAMPLE.match(line)
        if m:
            try:
                sums[m.group(1)] = sums.get(m.group(1), 0.0) + float(m.group(3))
            except ValueError:
                continue
    return sums


def coordinator_client(base_url: str, timeout_s: float = 10.0) -> ServiceClient:
    """A client for the coordinator's HTTP status (`GET /status`)."""
    return ServiceClient(
        "federation coordinator", base_url, None, timeout_s,
        "Start one with `appliance coordinator start` (or `appliance up`), or run the demo from this tab.",
    )
