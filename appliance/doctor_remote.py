"""The doctor's checks of the services this machine is configured to use: the router and the coordinator answer, and
this machine's clock agrees with the coordinator's (read from its HTTP `Date` header, one-second resolution)."""

from __future__ import annotations

import socket
import time
from email.utils import parsedate_to_datetime
from urllib.parse import urlparse

import httpx

from fedllm.appliance.doctor import Check
from fedllm.core.tls import client_context

MAX_SKEW_S = 5.0


def _get_health(url: str, verify, timeout_s: float) -> tuple[httpx.Response | None, float, str]:
    """GET url/health: (the response or None, this machine's clock at its midpoint, the error if none came)."""
    start = time.time()
    try:
        response = httpx.get(url.rstrip("/") + "/health", verify=verify, timeout=timeout_s)
    except httpx.HTTPError as exc:
        return None, start, f"{type(exc).__name__}: {exc}"
    return response, (start + time.time()) / 2, ""


def reach(
    name: str, url: str, verify, timeout_s: float, *, required: bool
) -> tuple[Check, httpx.Response | None, float]:
    """Whether `url`'s /health answers; a failure when not and `required`, else a warning."""
    response, local, error = _get_health(url, verify, timeout_s)
    if response is None:
        return (
            Check(
                name,
                "fail" if required else "warn",
                f"{url} does not answer ({error})",
                f"start it, or check the URL, firewall and TLS settings (tls_ca_file) for {url}",
            ),
            None,
            local,
        )
    if response.status_code >= 400:
        return (
            Check(name, "warn", f"{url}/health answered HTTP {response.status_code}", "look at that service's log"),
            response,
            local,
        )
    return Check(name, "ok", f"{url} answers"), response, local


def clock_skew(response: httpx.Response | None, local: float, url: str) -> Check:
    """This machine's clock against the server's Date header; a failure beyond MAX_SKEW_S."""
    if response is None or "date" not in response.headers:
        return Check("clock", "skip", f"no Date from the coordinator at {url} (unreachable or no header)")
    try:
        remote = parsedate_to_datetime(response.headers["date"]).timestamp()
    except (TypeError, ValueError):
        return Check("clock", "skip", f"unreadable Date header from {url}: {response.headers['date']!r}")
    skew = local - remote
    detail = f"{skew:+.1f} s against the coordinator at {url} (Date header, 1 s resolution)"
    if abs(skew) > MAX_SKEW_S:
        return Check(
            "clock",
            "fail",
            detail + f", more than {MAX_SKEW_S:.0f} s",
            "synchronise both clocks with NTP (timedatectl set-ntp true)",
        )
    return Check("clock", "ok", detail)


def tcp_reachable(endpoint: str, timeout_s: float) -> Check:
    """Whether the coordinator's ZeroMQ endpoint (tcp://HOST:PORT) accepts a TCP connection."""
    parsed = urlparse(endpoint)
    if parsed.scheme != "tcp" or not parsed.hostname or not parsed.port:
        return Check("coordinator endpoint", "skip", f"{endpoint} is not tcp://HOST:PORT")
    try:
        with socket.create_connection((parsed.hostname, parsed.port), timeout=timeout_s):
            pass
    except OSError as exc:
        return Check(
            "coordinator endpoint",
            "fail",
            f"{endpoint} refuses a connection ({exc.strerror or exc})",
            "start the coordinator, or check federation.coordinator and the firewall",
        )
    return Check("coordinator endpoint", "ok", f"{endpoint} accepts connections")


def remote_checks(settings, *, router: str | None, coordinator: str | None, timeout_s: float) -> list[Check]:
    """Reachability of the router and coordinator this machine is configured for (flags first, then settings:
    ui.router_url, ui.coordinator_url, federation.coordinator), and the clock against the coordinator's."""
    verify = client_context(settings.tls_ca_file)
    checks = []
    router_url = router or settings.ui.router_url
    if router_url:
        checks.append(reach("router", router_url, verify, timeout_s, required=True)[0])
    else:
        checks.append(Check("router", "skip", "no router configured (--router or ui.router_url)"))
    endpoint = settings.federation.coordinator
    status_url, required = coordinator or settings.ui.coordinator_url, True
    if not status_url and endpoint:  # a silo: the coordinator's status server on the same host
        host = urlparse(endpoint).hostname
        status_url, required = f"{settings.federation.scheme}://{host}:{settings.federation.status_port}", False
    if endpoint:
        checks.append(tcp_reachable(endpoint, timeout_s))
    if status_url:
        check, response, local = reach("coordinator", status_url, verify, timeout_s, required=required)
        checks += [check, clock_skew(response, local, status_url)]
    else:
        checks.append(
            Check(
                "coordinator",
                "skip",
                "no coordinator configured (--coordinator, ui.coordinator_url or federation.coordinator)",
            )
        )
        checks.append(Check("clock", "skip", "no coordinator to compare the clock with"))
    return checks
