"""A worker's address in one spelling, so that `http://LOCALHOST:8101/` and `http://localhost:8101` are one worker."""

from __future__ import annotations

from urllib.parse import urlsplit

DEFAULT_PORTS = {"http": 80, "https": 443}


def normalised_address(url: str) -> str:
    """`host:port` of `url`: the host lowercased (IPv6 in brackets), the scheme's default port filled in.

    `localhost` is not resolved (it is spelled as given, lowercased); a loopback worker joining once as `localhost`
    and once as `127.0.0.1` is matched by the quarantine through its API key instead (serve/quarantine.py).

    Raises:
        ValueError: `url` is not scheme://host[:port] with a known scheme and a valid port.
    """
    text = url.strip()
    if "://" not in text:
        text = "http://" + text
    parts = urlsplit(text)
    scheme = parts.scheme.lower()
    if scheme not in DEFAULT_PORTS:
        raise ValueError(f"worker url {url!r} must start with http:// or https://")
    host = (parts.hostname or "").lower()
    if not host:
        raise ValueError(f"worker url {url!r} has no host")
    try:
        port = parts.port or DEFAULT_PORTS[scheme]
    except ValueError as exc:
        raise ValueError(f"worker url {url!r} has an invalid port") from exc
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
