"""Worker URLs as the router accepts them: `scheme://host:port` only, and one normal spelling of each address.

Pure functions (standard library only): `parse_worker_url` checks and normalises a URL, `normalised_address` is the
key under which the router remembers a worker's address (quarantine, duplicates), whatever spelling it joined with,
and `is_own_address` tells whether an address is the router's own bind.
"""

from __future__ import annotations

import ipaddress
import re
import socket
from dataclasses import dataclass
from urllib.parse import urlsplit

from fedllm.core.net import stays_on_this_machine

DEFAULT_PORTS = {"http": 80, "https": 443}
LOOPBACK_NAMES = frozenset({"localhost", "localhost.localdomain", "ip6-localhost", "ip6-loopback"})
_LEGACY_IPV4 = re.compile(r"^(0x[0-9a-f]+|[0-9]+)(\.(0x[0-9a-f]+|[0-9]+)){0,3}$")  # 127.1, 0x7f.0.0.1, 2130706433
_HOSTNAME = re.compile(r"^[a-z0-9_]([a-z0-9_-]{0,62})(\.[a-z0-9_]([a-z0-9_-]{0,62}))*$")


@dataclass(frozen=True)
class WorkerAddress:
    """A worker's address in its normal form: lower-case host (an IP address written one way), explicit port."""

    scheme: str
    host: str  # an IPv6 address without brackets
    port: int

    @property
    def key(self) -> str:
        """`host:port` (IPv6 in brackets): the same for every spelling of the address, whatever the scheme."""
        return f"{_bracketed(self.host)}:{self.port}"

    @property
    def url(self) -> str:
        """`scheme://host:port`, the URL the router calls."""
        return f"{self.scheme}://{self.key}"

    @property
    def loopback(self) -> bool:
        """Whether the host is this machine's loopback (127.0.0.0/8, ::1, localhost)."""
        return is_loopback_host(self.host)


def parse_worker_url(url: str) -> WorkerAddress:
    """Check that `url` is `http(s)://host[:port]` (an optional trailing `/`) and return its normal form.

    Raises:
        ValueError: another scheme, user info, a path, a query, a fragment, no host, or a bad port; the message
            names what is wrong.
    """
    if not isinstance(url, str) or not url.strip():
        raise ValueError("the worker url is empty; give scheme://host:port, e.g. https://10.0.0.5:8100")
    if any(c.isspace() or ord(c) < 0x20 for c in url):
        raise ValueError("the worker url contains whitespace or control characters")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise ValueError(f"the worker url is malformed ({exc}); give scheme://host:port") from None
    scheme = parts.scheme.lower()
    if scheme not in DEFAULT_PORTS:
        raise ValueError("the worker url must start with http:// or https://")
    if "@" in parts.netloc:
        raise ValueError(
            "the worker url must not carry user info (user:password@); the router sends the worker's API key itself"
        )
    if parts.path not in ("", "/"):
        raise ValueError("the worker url must be scheme://host:port without a path (the router adds /v1/... itself)")
    if parts.query or "?" in url:
        raise ValueError("the worker url must not carry a query string")
    if parts.fragment or "#" in url:
        raise ValueError("the worker url must not carry a fragment")
    host = normal_host(parts.hostname or "")
    if not host:
        raise ValueError("the worker url has no host")
    if port == 0:
        raise ValueError("the worker url's port must be between 1 and 65535")
    return WorkerAddress(scheme, host, port if port is not None else DEFAULT_PORTS[scheme])


def normalised_address(url: str) -> str:
    """The `host:port` key of a worker URL (see `WorkerAddress.key`); a bare `host:port` (an operator naming an address
    to clear) is read as `http://host:port`.

    Raises:
        ValueError: `url` is not `scheme://host:port` (see `parse_worker_url`).
    """
    if isinstance(url, str) and "://" not in url:
        url = "http://" + url.strip()
    return parse_worker_url(url).key


def normal_host(host: str) -> str:
    """`host` lower-cased, without a trailing dot; an IP address in its one canonical form (IPv4-mapped IPv6 and
    the legacy IPv4 spellings inet_aton accepts, like `127.1`, become dotted quads). Invalid names give ValueError."""
    host = host.strip().lower().rstrip(".")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not host:
        return ""
    try:
        ip = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        ip = None
    if ip is None and _LEGACY_IPV4.match(host):
        try:
            ip = ipaddress.IPv4Address(socket.inet_aton(host))
        except OSError:
            raise ValueError(f"the worker url's host {host!r} is not a valid IPv4 address") from None
    if ip is not None:
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        return str(ip)
    if not _HOSTNAME.match(host):
        raise ValueError(f"the worker url's host {host!r} is not a valid host name")
    return host


def is_loopback_host(host: str) -> bool:
    """Whether `host` (normal form or not) names this machine's loopback interface."""
    try:
        host = normal_host(host)
    except ValueError:
        return False
    return host in LOOPBACK_NAMES or host.endswith(".localhost") or stays_on_this_machine(host)


def is_wildcard_host(host: str) -> bool:
    """Whether a bind to `host` listens on every interface (`0.0.0.0`, `::`, empty)."""
    try:
        return host.strip() in ("", "*") or ipaddress.ip_address(host.strip().strip("[]")).is_unspecified
    except ValueError:
        return False


def is_own_address(
    address: WorkerAddress, bind_host: str, bind_port: int, local_hosts: frozenset[str] = frozenset()
) -> bool:
    """Whether `address` reaches a router bound to `bind_host:bind_port`: the same port, and the bind host itself,
    a loopback alias of a loopback bind, or (for a wildcard bind) loopback or any of `local_hosts` (this machine's
    addresses and names, normal form)."""
    if address.port != bind_port:
        return False
    if is_wildcard_host(bind_host):
        return address.loopback or address.host in local_hosts or address.host in _unspecified()
    try:
        bound = normal_host(bind_host)
    except ValueError:
        return False
    return address.host == bound or (address.loopback and is_loopback_host(bound))


def local_hosts() -> frozenset[str]:
    """This machine's host names and the addresses they resolve to (normal form), for `is_own_address`."""
    names = {socket.gethostname(), socket.getfqdn()}
    found: set[str] = set()
    for name in names:
        try:
            found.add(normal_host(name))
        except ValueError:
            pass  # a host name that is no valid URL host cannot be joined under, so it need not be matched
        try:
            for info in socket.getaddrinfo(name, None):
                found.add(normal_host(str(info[4][0])))
        except (OSError, ValueError):
            pass  # unresolvable here: the interfaces' own addresses below still count
    found |= _interface_addresses()
    return frozenset(found)


def _interface_addresses() -> set[str]:
    """Addresses of this machine's interfaces (Linux: /proc/net; elsewhere empty)."""
    found: set[str] = set()
    try:
        with open("/proc/net/fib_trie", encoding="ascii") as f:
            lines = f.read().splitlines()
        for i, line in enumerate(lines):
            if "/32 host LOCAL" in line and i > 0:
                found.add(lines[i - 1].split()[-1])
    except OSError:
        pass  # no /proc (not Linux): only the names above
    try:
        with open("/proc/net/if_inet6", encoding="ascii") as f:
            for line in f:
                raw = line.split()[0]
                found.add(str(ipaddress.IPv6Address(int(raw, 16))))
    except (OSError, ValueError, IndexError):
        pass  # no IPv6 on this machine
    return found


def _unspecified() -> frozenset[str]:
    return frozenset({"0.0.0.0", "::"})


def _bracketed(host: str) -> str:
    return f"[{host}]" if ":" in host else host
