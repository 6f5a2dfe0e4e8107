"""Tokens under keys/: generated once (0600), never blank, never printed whole."""

from __future__ import annotations

import stat
import threading

import pytest
from pydantic import SecretStr

from fedllm.appliance.commands.up import _banner
from fedllm.core.errors import ConfigError
from fedllm.core.secrets import ensure_token, masked
from fedllm.testing.factories import make_settings


def test_a_token_is_generated_once_private_and_then_reused(tmp_path):
    first = ensure_token(tmp_path, "admin_token")

    assert len(first) >= 32 and ensure_token(tmp_path, "admin_token") == first
    assert stat.S_IMODE((tmp_path / "admin_token").stat().st_mode) == 0o600


@pytest.mark.parametrize("content", ["", "\n", "   \n\t"])
def test_an_emptied_token_file_is_refused_not_taken_as_an_empty_token(tmp_path, content):
    (tmp_path / "admin_token").write_text(content)

    with pytest.raises(ConfigError, match="admin_token is empty"):
        ensure_token(tmp_path, "admin_token")


def test_a_blank_configured_token_counts_as_unset(tmp_path):
    stored = ensure_token(tmp_path, "admin_token")
    assert ensure_token(tmp_path, "admin_token", SecretStr("  ")) == stored
    assert ensure_token(tmp_path, "admin_token", SecretStr("configured-token")) == "configured-token"


def test_processes_starting_at_once_share_one_token(tmp_path):
    tokens: list[str] = []
    threads = [threading.Thread(target=lambda: tokens.append(ensure_token(tmp_path, "join_token"))) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()

    assert len(tokens) == 8 and len(set(tokens)) == 1
    assert [p.name for p in tmp_path.iterdir()] == ["join_token"]  # no temp file left


def test_up_shows_a_masked_admin_token_and_where_the_whole_one_is(tmp_path):
    settings = make_settings(tmp_path)
    token = ensure_token(settings.keys_dir, "admin_token")

    text = _banner(settings, [], "m", token, None)

    assert token not in text
    assert masked(token) in text and str(settings.keys_dir / "admin_token") in text


def test_up_prints_the_console_password_masked_and_a_one_time_login_link(tmp_path):
    from types import SimpleNamespace

    from fedllm.appliance.commands.up import _login_link
    from fedllm.core.tokens import console_password, take_login_link

    # Arrange: a console child on loopback (the login is asked there too by default).
    settings = make_settings(tmp_path)
    children = [SimpleNamespace(name="console", url="http://127.0.0.1:7860")]
    # Act
    link = _login_link(settings, children)
    text = _banner(settings, children, "m", ensure_token(settings.keys_dir, "admin_token"), None, link)
    # Assert: the link carries the token the console will take once; the password itself is not printed.
    token = link.split("#", 1)[1]
    assert link.startswith("http://127.0.0.1:7860/login-link#") and link in text
    password = console_password(settings)
    assert password not in text and masked(password) in text and password != token
    assert take_login_link(settings) == token and take_login_link(settings) is None  # taken once, gone from disk
    off = make_settings(tmp_path / "off", ui={"require_login": False})
    assert _login_link(off, children) is None and _login_link(settings, []) is None
