"""TLS for the appliance's HTTP services and their clients.

Servers (router, console, coordinator status) serve HTTPS when their section has `tls_cert` and `tls_key`
(`fedllm.core.sections.tls.ServesTLS`). Clients (the router calling workers, `appliance worker join`, the CLI, the
console and the federation's publisher calling the router) always verify certificates: against the system's trust
store, or against `tls_ca_file` (settings, top level) for a private CA. Nothing here turns verification off.
"""

from __future__ import annotations

import logging
import ssl
from pathlib import Path
from urllib.parse import urlsplit

from fedllm.core.errors import ConfigError
from fedllm.core.net import is_loopback, stays_on_this_machine

logger = logging.getLogger(__name__)


def client_context(ca_file: Path | str | None = None) -> ssl.SSLContext:
    """A client context that verifies the peer's certificate and host name: against `ca_file` if given, else the
    system's trust store.

    Raises:
        ConfigError: `ca_file` does not exist or holds no usable certificate.
    """
    if ca_file is None:
        return ssl.create_default_context()
    path = Path(ca_file)
    if not path.is_file():
        raise ConfigError(
            f"tls_ca_file {path} does not exist; point it at the PEM file of the CA that signed the services' "
            "certificates"
        )
    try:
        return ssl.create_default_context(cafile=str(path))
    except ssl.SSLError as exc:
        raise ConfigError(f"tls_ca_file {path} holds no usable CA certificate ({exc})") from exc


def server_context(cert: Path | str, key: Path | str | None) -> ssl.SSLContext:
    """A server context for `cert` (PEM, with its chain) and its private `key`.

    Raises:
        ConfigError: the key is not set, a file is missing, or the key does not match the certificate.
    """
    check_server_files(cert, key)
    assert key is not None  # check_server_files refuses a missing key
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(str(cert), str(key))
    return context


def check_server_files(cert: Path | str, key: Path | str | None) -> None:
    """Refuse before starting when the certificate or key cannot be used.

    Raises:
        ConfigError: the key is not set, a file is missing or unreadable, or the key does not match the certificate.
    """
    if key is None:
        raise ConfigError(f"tls_cert {cert} is set but tls_key is not; set both")
    for label, path in (("tls_cert", cert), ("tls_key", key)):
        if not Path(path).is_file():
            raise ConfigError(f"{label} {path} does not exist")
    try:
        ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(str(cert), str(key))
    except (ssl.SSLError, OSError) as exc:
        raise ConfigError(f"cannot serve HTTPS with tls_cert {cert} and tls_key {key}: {exc}") from exc


def check_public_bind(service: str, host: str, serves_tls: bool, env: str, setting: str) -> None:
    """Say so when a service listens beyond loopback over plain HTTP: a warning in `env: dev`, a refusal in `env: prod`.

    Args:
        service: what listens ("router", "console", "coordinator status").
        host: its bind address.
        serves_tls: whether it serves HTTPS.
        env: the settings' `env` (dev | prod).
        setting: the section whose `tls_cert`/`tls_key` turn HTTPS on ("serve", "ui", "federation").

    Raises:
        ConfigError: plain HTTP beyond loopback in `env: prod`.
    """
    if serves_tls or is_loopback(host):
        return
    message = (
        f"the {service} listens on {host} over plain HTTP: its tokens and traffic cross the network unencrypted; "
        f"set {setting}.tls_cert and {setting}.tls_key (or put it behind a TLS proxy on 127.0.0.1)"
    )
    if env == "prod":
        raise ConfigError(f"refusing to start: {message}")
    logger.warning("%s", message)


def refuse_plain_http_token(url: str, allow_plain_http: bool = False) -> None:
    """Refuse to send a bearer token to `url` over plain HTTP unless its host is this machine.

    Args:
        url: where the token would go.
        allow_plain_http: the operator's explicit opt-out (`allow_plain_http`: private test networks only).

    Raises:
        ConfigError: `url` is `http://` to a host beyond loopback.
    """
    parts = urlsplit(url)
    if parts.scheme != "http" or allow_plain_http or stays_on_this_machine(parts.hostname or ""):
        return
    raise ConfigError(
        f"refusing to send a token over plain HTTP to {parts.hostname}: use https:// (the service's tls_cert and "
        "tls_key), or set allow_plain_http: true for a private test network"
    )
