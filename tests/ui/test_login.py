"""Login: required as soon as the console listens beyond loopback; the console password (or a configured user) opens
it, never the router's admin token."""

from __future__ import annotations

import httpx
import pytest

from fedllm.testing.factories import free_port
from tests.ui.conftest import ADMIN_TOKEN, start_console, stop_process
from fedllm.ui.app import make_auth, needs_login
from fedllm.ui.login import LoginGate

CONSOLE_PASSWORD = "console-password-0123456789"


def test_needs_login_beyond_loopback_and_on_loopback_when_required():
    assert needs_login("127.0.0.1", require_login=True) and needs_login("0.0.0.0", require_login=False)
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


# ---------------------------------------------------------------- loopback login, the one-time link, the brake
def test_the_gate_locks_a_user_after_repeated_wrong_passwords_and_lets_the_link_in_once():
    # Arrange: a fake clock; five wrong passwords for admin within the minute.
    now = [0.0]
    gate = LoginGate("pw-admin", {"alice": "pw-alice"}, once="link-token", max_failures=5, max_failures_total=8,
                     window_s=60.0, clock=lambda: now[0])
    assert gate("admin", "link-token") and not gate("admin", "link-token")  # the link opens once
    for _ in range(5):
        assert not gate("admin", "guess")
    # Act / Assert: admin is refused even with the right password until the window passes; alice is not affected.
    assert not gate("admin", "pw-admin") and gate("alice", "pw-alice")
    now[0] = 61.0
    assert gate("admin", "pw-admin")
    # A spray over many names locks everyone for the window.
    for i in range(8):
        gate(f"user{i}", "guess")
    assert not gate("alice", "pw-alice")
    now[0] = 200.0
    assert gate("alice", "pw-alice")


@pytest.mark.slow
@pytest.mark.browser
def test_loopback_asks_for_a_login_and_the_one_time_link_opens_the_console_once(tmp_path, browser):
    from fedllm.core.tokens import issue_login_link
    from fedllm.testing.factories import make_settings

    # Arrange: what `appliance up` does before it starts the console: a one-time token under keys/.
    home = tmp_path / "home"
    token = issue_login_link(make_settings(home))
    console = start_console(home, f"http://127.0.0.1:{free_port()}", f"http://127.0.0.1:{free_port()}",
                            extra_env={"APPLIANCE_UI__REQUIRE_LOGIN": "true"})
    try:
        # Assert: on 127.0.0.1 the console is closed without a login; the token left the disk when it started.
        assert httpx.get(f"{console.url}/config", timeout=10).status_code == 401
        assert not (home / "keys" / "console_login_link").exists()
        temp_dirs = list((home / "tmp").glob("console-*"))
        assert len(temp_dirs) == 1 and (temp_dirs[0].stat().st_mode & 0o777) == 0o700  # private uploads, not /tmp/gradio
        # Act: one click on the link, in a real browser.
        first = browser.new_context()
        page = first.new_page()
        page.goto(f"{console.url}/login-link#{token}")
        page.wait_for_url(f"{console.url}/", timeout=30_000)
        page.get_by_role("tab", name="Chat").wait_for(timeout=30_000)
        first.close()
        # A second use (another browser) is refused: the link works once.
        second = browser.new_context()
        page = second.new_page()
        page.goto(f"{console.url}/login-link#{token}")
        page.get_by_text("used already").wait_for(timeout=30_000)
        second.close()
    finally:
        stop_process(console.process)
    assert not list((home / "tmp").glob("console-*"))  # removed at exit
