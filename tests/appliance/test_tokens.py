"""Separate secrets per service, never sent over plain HTTP beyond loopback, and plain-HTTP public binds called out.

Issue 19 ("separate secrets"): one admin token used to be the router's admin token, the console's password and the
coordinator's status token, and the console and `federation status --url` sent it over plain HTTP to any URL.
"""

from __future__ import annotations

import logging
import stat

import httpx
import pytest
from typer.testing import CliRunner

from fedllm.core.errors import ConfigError
from fedllm.core.contracts.router_client import RouterClient, ServiceClient
from fedllm.core.tls import check_public_bind, refuse_plain_http_token
from fedllm.core.tokens import console_password, coordinator_status_token, router_admin_token
from fedllm.testing.factories import make_settings


def test_each_service_has_its_own_secret_stored_0600(tmp_path):
    # Arrange
    settings = make_settings(tmp_path)
    # Act
    tokens = {router_admin_token(settings), coordinator_status_token(settings), console_password(settings)}
    # Assert: three different secrets, each in its own file, readable by the owner only; stable on a second read.
    assert len(tokens) == 3
    for name in ("admin_token", "status_token", "console_password"):
        assert stat.S_IMODE((settings.keys_dir / name).stat().st_mode) == 0o600
    assert router_admin_token(settings) in tokens and console_password(settings) in tokens
    configured = make_settings(tmp_path, ui={"admin_password": "pw-abcdefgh"}, federation={"status_token": "st-abcdefgh"})
    assert console_password(configured) == "pw-abcdefgh" and coordinator_status_token(configured) == "st-abcdefgh"


def test_placeholder_console_password_and_status_token_are_refused_in_prod(tmp_path):
    with pytest.raises(ConfigError, match="ui.admin_password.*federation.status_token|federation.status_token.*ui.admin_password"):
        make_settings(tmp_path, env="prod", ui={"admin_password": "changeme"}, federation={"status_token": "password"})


@pytest.mark.parametrize("url", ["http://10.1.2.3:8000", "http://router.example.org", "http://[2001:db8::1]:8000"])
def test_a_token_is_never_sent_over_plain_http_beyond_loopback(url):
    # Arrange: a client whose token would go to a remote plain-HTTP host (nothing listens there: nothing may be tried).
    client = RouterClient(url, "admin-token-0123456789", timeout_s=0.5)
    # Act / Assert: refused before any connection, naming the host and the fix.
    with pytest.raises(ConfigError, match="plain HTTP") as info:
        client.workers()
    assert "https" in str(info.value)
    # The operator's explicit opt-out (private test networks) lets it try (and fail to connect, which is a different error).
    from fedllm.core.contracts.router_client import ServiceUnavailable

    with pytest.raises(ServiceUnavailable):
        RouterClient(url, "admin-token-0123456789", timeout_s=0.2, allow_plain_http=True).workers()


def test_loopback_https_and_tokenless_calls_are_allowed():
    for url in ("http://127.0.0.1:1/x", "http://localhost:1/x", "http://127.0.0.2:1/x", "http://[::1]:1/x", "https://10.1.2.3/x"):
        refuse_plain_http_token(url)  # no error
    # No token: nothing secret to protect (an anonymous call to a remote plain-HTTP host is the caller's business).
    client = ServiceClient("router", "http://10.1.2.3:9", None, 0.2)
    with pytest.raises(Exception) as info:
        client.request("GET", "/health")
    assert not isinstance(info.value, ConfigError)


def test_federation_status_refuses_to_send_its_token_over_plain_http(tmp_path):
    from fedllm.appliance.cli import app

    result = CliRunner().invoke(app, ["--home", str(tmp_path), "federation", "status", "--url", "http://10.1.2.3:5556/status"])
    assert result.exit_code != 0 and "plain HTTP" in result.output


def test_a_public_plain_http_bind_warns_in_dev_and_is_refused_in_prod(caplog):
    with caplog.at_level(logging.WARNING, logger="fedllm.core.tls"):
        check_public_bind("router", "0.0.0.0", False, "dev", "serve")
    assert "plain HTTP" in caplog.text and "serve.tls_cert" in caplog.text
    with pytest.raises(ConfigError, match="refusing to start.*ui.tls_cert"):
        check_public_bind("console", "10.0.0.5", False, "prod", "ui")
    caplog.clear()
    check_public_bind("router", "127.0.0.1", False, "prod", "serve")  # loopback: fine
    check_public_bind("router", "0.0.0.0", True, "prod", "serve")  # TLS: fine
    assert not caplog.text


def test_serve_refuses_a_public_plain_http_bind_in_prod(tmp_path):
    from fedllm.appliance.cli import app

    keys = {"APPLIANCE_ENV": "prod", "APPLIANCE_SERVE__API_KEYS": '["a-real-client-key-0123456789"]'}
    result = CliRunner().invoke(app, ["--home", str(tmp_path), "serve", "--host", "0.0.0.0", "--port", "0"], env=keys)
    assert result.exit_code != 0 and "plain HTTP" in result.output, result.output


async def test_metrics_beyond_loopback_need_the_admin_token(tmp_path):
    from fedllm.serve import create_app

    for host, open_without_token in (("0.0.0.0", False), ("127.0.0.1", True)):
        settings = make_settings(tmp_path / host, serve={"host": host, "api_keys": ["client-key-0123456789"]})
        app = create_app(settings)
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://router") as c:
            anonymous = await c.get("/metrics")
            client_key = await c.get("/metrics", headers={"Authorization": "Bearer client-key-0123456789"})
            admin = await c.get("/metrics", headers={"Authorization": f"Bearer {router_admin_token(settings)}"})
        assert admin.status_code == 200 and "router_requests_total" in admin.text
        assert (anonymous.status_code == 200) is open_without_token
        assert (client_key.status_code == 200) is open_without_token
