"""The Fleet tab's actions against a real router: add a worker with its API key, clear a quarantine (issue 19)."""

from __future__ import annotations

import pytest

from fedllm.testing.factories import make_settings, wait_until
from tests.serve.conftest import start_fake
from tests.ui.conftest import ADMIN_TOKEN
from tests.ui.services import start_router
from fedllm.ui.context import ConsoleContext
from fedllm.ui.tabs.fleet import add_worker, clear_quarantine


@pytest.mark.slow
def test_the_console_adds_a_worker_with_its_key_and_clears_it(tmp_path):
    # Arrange: a real router with one static worker, and a second worker that answers only with its key.
    static = start_fake("m")
    keyed = start_fake("m", api_key="worker-key-0123456789")
    router = start_router(tmp_path / "router", [{"url": static.url}], ADMIN_TOKEN)
    try:
        ctx = ConsoleContext.from_settings(make_settings(tmp_path / "console", ui={"router_url": router.url},
                                                         serve={"admin_token": ADMIN_TOKEN}))
        # Act: add it with its key, as the tab's button does.
        message = add_worker(ctx, keyed.url, "eu", "worker-key-0123456789")
        # Assert: the router reaches it (its /v1/models answers only with the key) and lists it healthy.
        assert "with its API key" in message
        row = wait_until(lambda: next((w for w in ctx.router.workers() if w["url"] == keyed.url and w["healthy"]), None),
                         timeout_s=30, what="the keyed worker healthy")
        assert clear_quarantine(ctx, row["id"]).startswith("Cleared")
        assert next(w for w in ctx.router.workers() if w["id"] == row["id"])["quarantined"] is False
        assert "Pick a worker" in clear_quarantine(ctx, None)
        assert "must start with http" in add_worker(ctx, "10.0.0.7:8100", "eu", "k")
        assert "API key is needed" in add_worker(ctx, keyed.url, "eu")
    finally:
        router.stop()
        static.stop()
        keyed.stop()
