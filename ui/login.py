"""Who may enter the console: the password check with a brake on guessing, and the one-time login link.

Gradio asks for the login (`launch(auth=...)`) and calls `LoginGate` with what was typed. The gate accepts user `admin`
with the console password (`fedllm.core.tokens.console_password`), a `ui.users` login, or, once, the token of the
login link `appliance up` prints. After `max_failures` wrong passwords for one user within `window_s`, that user is
refused for the rest of the window whatever is typed, and so is everyone once `max_failures_total` wrong passwords
arrive within it (a spray over many names); each lockout is logged once, without what was typed.

The link is `/login-link#TOKEN`: the token rides in the fragment, which browsers never send, so it reaches no log
or Referer. `LoginLinkPage` serves a tiny page whose script posts it to Gradio's own `/login` as user admin's password,
which sets the session cookie exactly as the login form would, then opens the console.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from fedllm.core.secrets import same_secret

logger = logging.getLogger(__name__)

LINK_PATH = "/login-link"


class LoginGate:
    """A Gradio auth function: `gate(username, password) -> bool` (constant-time compares, rate-limited)."""

    def __init__(
        self,
        admin_password: str,
        users: dict[str, str],
        *,
        once: str | None = None,
        max_failures: int = 5,
        max_failures_total: int = 30,
        window_s: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._passwords = {**users, "admin": admin_password}
        self._once = once
        self._max_failures, self._max_total, self._window_s = max_failures, max_failures_total, window_s
        self._clock = clock
        self._failures: dict[str, deque[float]] = {}
        self._all_failures: deque[float] = deque()

    def __call__(self, username: str, password: str) -> bool:
        now = self._clock()
        if self._locked(username, now):
            return False
        if username == "admin" and self._once is not None and same_secret(password, self._once):
            self._once = None  # one click, once
            logger.info("console: the one-time login link was used")
            return True
        expected = self._passwords.get(username)
        if expected is not None and same_secret(password, expected):
            return True
        self._fail(username, now)
        return False

    def _recent(self, stamps: deque[float], now: float) -> int:
        while stamps and now - stamps[0] > self._window_s:
            stamps.popleft()
        return len(stamps)

    def _locked(self, username: str, now: float) -> bool:
        return (
            self._recent(self._failures.get(username, deque()), now) >= self._max_failures
            or self._recent(self._all_failures, now) >= self._max_total
        )

    def _fail(self, username: str, now: float) -> None:
        stamps = self._failures.setdefault(username[:64], deque())
        stamps.append(now)
        self._all_failures.append(now)
        if len(self._failures) > 1024:  # names typed by a sprayer: keep the table bounded
            self._failures = {u: s for u, s in self._failures.items() if self._recent(s, now)}
        if self._recent(stamps, now) == self._max_failures:
            logger.warning(
                "console: %d wrong passwords for user %r within %.0f s; refused until the window passes",
                self._max_failures,
                username[:64],
                self._window_s,
            )
        if self._recent(self._all_failures, now) == self._max_total:
            logger.warning(
                "console: %d wrong passwords within %.0f s; every login refused until the window passes",
                self._max_total,
                self._window_s,
            )


_LINK_PAGE = b"""<!doctype html><html><head><meta charset="utf-8"><meta name="referrer" content="no-referrer">
<title>FedLLM Appliance: logging in</title></head><body><p id="m">Logging in...</p><script>
const token = location.hash.slice(1);
history.replaceState(null, "", location.pathname);
const say = (t) => { document.getElementById("m").textContent = t; };
if (!token) { say("This link carries no login token: log in with the console password (keys/console_password)."); }
else fetch("login", {method: "POST", credentials: "same-origin",
                      headers: {"Content-Type": "application/x-www-form-urlencoded"},
                      body: new URLSearchParams({username: "admin", password: token})})
  .then((r) => { if (r.ok) location.replace("./"); else say("This login link was used already (it works once): \
log in with the console password (keys/console_password)."); })
  .catch(() => say("The console did not answer; try again."));
</script></body></html>"""


class LoginLinkPage:
    """ASGI middleware: answers `GET /login-link` with the page that logs in with the link's token; passes the rest
    on."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["path"] != LINK_PATH:
            await self.app(scope, receive, send)
            return
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [
                    (b"content-type", b"text/html; charset=utf-8"),
                    (b"cache-control", b"no-store"),
                    (b"referrer-policy", b"no-referrer"),
                    (b"content-length", str(len(_LINK_PAGE)).encode()),
                ],
            }
        )
        await send({"type": "http.response.body", "body": _LINK_PAGE})
