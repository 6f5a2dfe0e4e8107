"""The Adapters tab's alias history and Rollback in headless Chromium, against the real router (`appliance serve` in
front of a fake vLLM worker process): a held-back version shows "held back" with the gate's two figures, promoted
moves show their figures from the run's gate log, and Rollback moves the alias on the router."""

from __future__ import annotations

import json

import httpx
import pytest
from playwright.sync_api import expect

from tests.ui.conftest import screenshot

pytestmark = pytest.mark.browser


def test_adapters_tab_shows_the_alias_history_and_rolls_back(page, tmp_path):
    from fedllm.testing.factories import free_port
    from tests.serve.conftest import start_fake
    from tests.ui.conftest import ADMIN_TOKEN, start_console, stop_process
    from tests.ui.services import start_router

    worker = start_fake("m")
    router = start_router(tmp_path / "router-home", [{"url": worker.url, "region": "local"}], ADMIN_TOKEN)
    admin = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    console_home = tmp_path / "console-home"
    # The run's gate log, as the coordinator writes it on the console's home (appliance up): figures of promoted moves
    gate_log = console_home / "federation" / "fed" / "gate.jsonl"
    gate_log.parent.mkdir(parents=True)
    gate_log.write_text("\n".join(json.dumps(r) for r in [
        {"adapter": "fed-v1", "loss": 1.9069, "current_loss": None, "decision": "promoted"},
        {"adapter": "fed-v2", "loss": 12.4325, "current_loss": 1.9069, "decision": "held back"},
        {"adapter": "fed-v3", "loss": 1.3021, "current_loss": 1.9069, "decision": "promoted"}]) + "\n")
    console = None
    try:
        for n in (1, 2, 3):
            folder = tmp_path / "fed" / str(n)
            folder.mkdir(parents=True)
            body = {"name": f"fed-v{n}", "path": str(folder), "version": n, "by": f"federation fed round {n}",
                    "aliases": [] if n == 2 else ["fed-latest"], "base_model": "m"}
            if n == 2:
                body["held_back"] = {"alias": "fed-latest", "loss": 12.4325, "current_loss": 1.9069}
            assert httpx.post(f"{router.url}/admin/adapters", json=body, headers=admin, timeout=30).status_code == 200
        console = start_console(console_home, router.url, f"http://127.0.0.1:{free_port()}")

        page.goto(console.url)
        page.get_by_role("tab", name="Adapters").click()
        page.locator("#history-alias input").click()
        page.get_by_role("option", name="fed-latest").click()
        page.locator("#history-show").click()
        expect(page.locator("#history-summary")).to_contain_text("fed-latest answers from fed-v3")
        table = page.locator("#history-table")
        expect(table).to_contain_text("fed-v1 (v1)")
        text = table.inner_text()  # Gradio draws the rows as cells of one table row: read them in order
        v3, v2, v1 = (text.index(f"fed-v{n} (v{n})") for n in (3, 2, 1))
        assert v3 < v2 < v1, text  # newest first
        newest, held = text[v3:v2], text[v2:v1]
        assert "1.3021" in newest and "1.9069" in newest and "held back" not in newest, newest  # figures from the gate log
        assert "held back" in held and "12.4325" in held and "1.9069" in held, held
        screenshot(page, "adapters-history")

        page.locator("#history-to textarea, #history-to input").first.fill("1")
        page.locator("#history-rollback").click()
        expect(page.locator("#history-summary")).to_contain_text("now names fed-v1 (was fed-v3)")
        current = httpx.get(f"{router.url}/admin/adapters/fed-latest/history", headers=admin, timeout=10).json()["current"]
        assert current == "fed-v1"
        answered = httpx.post(f"{router.url}/v1/chat/completions", json={"model": "fed-latest", "messages": []}, timeout=10)
        assert answered.json()["model"] == "fed-v1"
        screenshot(page, "adapters-rollback")
    finally:
        if console is not None:
            stop_process(console.process)
        router.stop()
        worker.stop()
