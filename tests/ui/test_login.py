"""Login: required as soon as the console listens beyond loopback; the console password (or a configured user) opens
it, never the router's admin token."""

from __future__ import annotations

import httpx
import pytest

from tests.factories import free_port
from tests.ui.conftest import ADMIN_TOKEN, start_console, stop_process
from ui.app import make_auth, needs_login

CONSOLE_PASSWORD = "console-password-0123456789"


def test_needs_login_only_beyond_loopback():
    assert not needs_login("127.0.0.1") and not needs_login("localhost")
    assert needs_login("0.0.0.0") and needs_login("10.1.2.3") and needs_login("127.0.0.2")


def test_auth_accepts_the_console_password_and_configured_users_only():
    check = make_auth("tok-123", {"alice": "pw-alice"})
    assert check("admin", "tok-123") and check("alice", "pw-alice")
    assert not check("admin", "tok-12") and not check("alice", "tok-123") and not check("bob", "pw-alice")


@pytest.fixture
def exposed_console(tmp_path):
    # 127.0.0.2 is still this machine (the whole 127/8 is loopback on Linux) but not "127.0.0.1": login is on.
    console = start_console(tmp_path, f"http://127.0.0.1:{free_port()}", f"http://127.0.0.1:{free_port()}",
                            host="127.0.0.2", extra_env={"APPLIANCE_UI__USERS": '{"alice": "alice-password-1"}',
                                                         "APPLIANCE_UI__ADMIN_PASSWORD": CONSOLE_PASSWORD})
    yield console
    stop_process(console.process)


@pytest.mark.slow
def test_console_beyond_loopback_requires_login(exposed_console):
    url = exposed_console.url
    assert httpx.get(f"{url}/config", timeout=10).status_code == 401
    with httpx.Client(timeout=10) as client:
        assert client.post(f"{url}/login", data={"username": "admin", "password": "wrong"}).status_code >= 400
        assert client.get(f"{url}/config").status_code == 401
        # The router's admin token is not the console's password (a console user must not learn it, nor it open the console).
        assert client.post(f"{url}/login", data={"username": "admin", "password": ADMIN_TOKEN}).status_code >= 400
        assert client.get(f"{url}/config").status_code == 401
        assert client.post(f"{url}/login", data={"username": "admin", "password": CONSOLE_PASSWORD}).status_code == 200
        assert client.get(f"{url}/config").status_code == 200
    with httpx.Client(timeout=10) as client:
        assert client.post(f"{url}/login", data={"username": "alice", "password": "alice-password-1"}).status_code == 200
        assert client.get(f"{url}/config").status_code == 200
