"""The Fleet tab in headless Chromium tells the truth: one chat through the real router (an `appliance serve` process in
front of a fake vLLM worker process) is counted there, with a non-zero latency for the worker that answered."""

from __future__ import annotations

import re

import httpx
import pytest
from playwright.sync_api import expect

from tests.ui.conftest import screenshot

pytestmark = pytest.mark.browser


def test_fleet_tab_counts_a_real_chat_and_shows_its_latency(page, tmp_path):
    from fedllm.testing.factories import free_port
    from tests.serve.conftest import start_fake
    from tests.ui.conftest import ADMIN_TOKEN, start_console, stop_process
    from tests.ui.services import start_router
    from fedllm.ui.tabs.fleet import WORKER_HEADERS

    worker = start_fake("m")
    router = start_router(tmp_path / "router-home", [{"url": worker.url, "region": "local"}], ADMIN_TOKEN)
    console = None
    try:
        answered = httpx.post(f"{router.url}/v1/chat/completions", timeout=30,
                              json={"model": "m", "messages": [{"role": "user", "content": "hi"}]})
        assert answered.status_code == 200
        console = start_console(tmp_path / "console-home", router.url, f"http://127.0.0.1:{free_port()}")

        page.goto(console.url)
        page.get_by_role("tab", name="Fleet").click()

        summary = page.locator("#fleet-metrics")
        expect(summary).to_contain_text("Requests 1 · errors 0", timeout=60_000)
        ttft = re.search(r"TTFT p50 \S+ ([0-9.]+) ms", summary.inner_text())
        assert ttft and float(ttft.group(1)) > 0, summary.inner_text()
        expect(page.locator("#fleet-workers")).to_contain_text(worker.url)
        cells = [c.strip() for c in page.locator("#fleet-workers tbody tr").first.locator("td").all_text_contents()]
        offset = len(cells) - len(WORKER_HEADERS)  # a leading row-number cell, if the table draws one
        latency = cells[offset + WORKER_HEADERS.index("latency (ms)")]
        assert re.fullmatch(r"[0-9.]+", latency) and float(latency) > 0, cells
        expect(page.locator("#fleet-ttft-plot")).to_be_visible()
        screenshot(page, "fleet-real-router")
    finally:
        if console is not None:
            stop_process(console.process)
        router.stop()
        worker.stop()
