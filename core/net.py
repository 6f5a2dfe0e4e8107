"""Bind addresses: which are loopback, and where a local client reaches a service bound to a wildcard."""

from __future__ import annotations

import ipaddress

LOOPBACK_HOSTS = frozenset({"127.0.0.1", "localhost", "::1"})
WILDCARD_HOSTS = frozenset({"0.0.0.0", "::", ""})


def is_loopback(host: str) -> bool:
    """Whether a service bound to `host` is reachable only from this machine."""
    return host in LOOPBACK_HOSTS


def stays_on_this_machine(host: str) -> bool:
    """Whether traffic to `host` (a URL's host name) never leaves this machine: localhost, 127.0.0.0/8, ::1."""
    if host in LOOPBACK_HOSTS:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def connectable_host(host: str) -> str:
    """The host a local client dials for a service bound to `host`: a wildcard bind is reached on 127.0.0.1."""
    return "127.0.0.1" if host in WILDCARD_HOSTS else host
