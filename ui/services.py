"""The console's HTTP clients for the router (OpenAI + admin API) and the federation coordinator's status.

Every failure to reach a service becomes `ServiceUnavailable` with a message that names the service, its URL and
what to start, so a tab can show it instead of crashing. Nothing here imports `serve/` or `federation/`.
"""

from __future__ import annotations

import json
import logging
import ssl
from collections.abc import Iterator
from typing import Any

import httpx

from fedllm.core.contracts.router_client import RouterClient as AdminRouterClient
from fedllm.core.contracts.router_client import ServiceClient, ServiceUnavailable, error_text
from fedllm.core.tls import refuse_plain_http_token

logger = logging.getLogger(__name__)


class RouterClient(AdminRouterClient):
    """The router: fleet and adapters through `/admin/*` (admin token, `fedllm.core.contracts.router_client`), models
    and chat through `/v1/*` (API key)."""

    def __init__(
        self,
        base_url: str,
        admin_token: str | None,
        api_key: str | None = None,
        timeout_s: float = 10.0,
        verify: bool | ssl.SSLContext = True,
        allow_plain_http: bool = False,
    ):
        super().__init__(base_url, admin_token, timeout_s=timeout_s, verify=verify, allow_plain_http=allow_plain_http)
        self.api = ServiceClient("router", self.base_url, api_key, timeout_s, self.hint, verify, allow_plain_http)

    def models(self) -> list[str]:
        """Model and adapter names the router answers to (`GET /v1/models`)."""
        data = self.api.request("GET", "/v1/models")
        return [m["id"] for m in data.get("data", [])] if isinstance(data, dict) else []

    def stream_chat(
        self, model: str, messages: list[dict[str, str]], temperature: float, max_tokens: int
    ) -> Iterator[str]:
        """Yield the text pieces of a streamed chat completion through the router.

        Raises:
            ServiceUnavailable: the router is down or answered an error, or the stream ended with an error event.
        """
        body = {
            "model": model,
            "messages": messages,
            "temperature": temperature,
            "max_tokens": max_tokens,
            "stream": True,
        }
        url = f"{self.base_url}/v1/chat/completions"
        if self.api.token:
            refuse_plain_http_token(url, self.allow_plain_http)
        try:
            with httpx.stream(
                "POST",
                url,
                json=body,
                headers=self.api.headers(),
                timeout=httpx.Timeout(600.0, connect=5.0),
                verify=self.verify,
            ) as resp:
                if resp.status_code >= 400:
                    resp.read()
                    raise ServiceUnavailable(
                        f"The router answered HTTP {resp.status_code}: {error_text(resp)}", resp.status_code
                    )
                for line in resp.iter_lines():
                    piece = parse_sse_line(line)
                    if piece is None:
                        continue
                    if piece is STREAM_DONE:
                        return
                    yield piece
        except httpx.HTTPError as exc:
            raise ServiceUnavailable(
                f"The router at {self.base_url} is not reachable ({type(exc).__name__}). {self.hint}"
            ) from exc

    def metrics_text(self) -> str:
        """`GET /metrics` (Prometheus text; with the admin token, which a router beyond loopback asks for)."""
        return str(self.request("GET", "/metrics"))


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
        raise ServiceUnavailable(
            f"the stream ended with an error: {err.get('message', err) if isinstance(err, dict) else err}"
        )
    choices = chunk.get("choices") or []
    if not choices:
        return None
    return (choices[0].get("delta") or {}).get("content") or None


def coordinator_client(
    base_url: str,
    timeout_s: float = 10.0,
    status_token: str | None = None,
    verify: bool | ssl.SSLContext = True,
    allow_plain_http: bool = False,
) -> ServiceClient:
    """A client for the coordinator's HTTP status (`GET /status`; its status token is needed beyond loopback)."""
    return ServiceClient(
        "federation coordinator",
        base_url,
        status_token,
        timeout_s,
        "Start one with `appliance coordinator start` (or `appliance up`), or run the demo from this tab.",
        verify,
        allow_plain_http,
    )
