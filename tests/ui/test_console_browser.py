"""The console in real headless Chromium against a console process on loopback."""

from __future__ import annotations

import pytest
from playwright.sync_api import expect

from tests.ui.conftest import screenshot

pytestmark = pytest.mark.browser


def open_tab(page, name: str) -> None:
    page.get_by_role("tab", name=name).click()


def test_chat_streams_answer_through_router(page, console, fake_router):
    page.goto(console.url)
    expect(page.locator("#chat-model input")).to_have_value("smollm2-135m-instruct")
    page.locator("#chat-input textarea").fill("Say hello")
    page.locator("#chat-send").click()
    # Streamed: the answer is seen part-way (first words, not yet the last ones) before it is complete.
    page.wait_for_function(
        "() => { const t = document.querySelector('#chatbot [data-testid=bot]')?.innerText || '';"
        " return t.includes('Hello') && !t.includes('word by word'); }", timeout=20_000, polling=10)
    bot = page.locator("#chatbot")
    expect(bot).to_contain_text("Hello from smollm2-135m-instruct", timeout=20_000)
    expect(bot).to_contain_text("word by word", timeout=20_000)
    assert fake_router.state.chats[-1]["stream"] is True
    assert fake_router.state.chats[-1]["messages"][-1] == {"role": "user", "content": "Say hello"}
    screenshot(page, "chat")


def test_tabs_show_service_down_without_crashing(page, console):
    page.goto(console.url)
    open_tab(page, "Federation")
    expect(page.locator("#fed-status")).to_contain_text("not reachable", timeout=20_000)
    screenshot(page, "federation-down")
    open_tab(page, "Fleet")
    screenshot(page, "fleet")
    open_tab(page, "Adapters")
    expect(page.locator("#adapters-status")).to_contain_text("No adapters yet")
    screenshot(page, "adapters")


@pytest.mark.vllm
def test_chat_streams_through_real_router_and_vllm(page, vllm_worker, tmp_path):
    from fedllm.testing.factories import free_port
    from tests.ui.conftest import ADMIN_TOKEN, start_console, stop_process
    from tests.ui.services import start_router

    router = start_router(tmp_path / "router-home", [vllm_worker.spec], ADMIN_TOKEN)
    console = None
    try:
        console = start_console(tmp_path / "console-home", router.url, f"http://127.0.0.1:{free_port()}")
        page.goto(console.url)
        expect(page.locator("#chat-model input")).to_have_value(vllm_worker.model)
        page.locator("#chat-input textarea").fill("What is the capital of France? Answer in one word.")
        page.locator("#chat-send").click()
        # The assistant bubble fills in while vLLM streams; the input is cleared once the turn starts.
        bot_text = page.locator("#chatbot [data-testid='bot']").last
        expect(bot_text).not_to_be_empty(timeout=120_000)
        first = bot_text.inner_text()
        # Streamed: the same bubble keeps growing as vLLM's tokens arrive through the router.
        page.wait_for_function(
            "n => (document.querySelectorAll('#chatbot [data-testid=bot]')[0]?.innerText || '').length > n",
            arg=len(first), timeout=120_000)
        expect(page.locator("#chat-status")).not_to_contain_text("⚠")
        screenshot(page, "chat-vllm")
    finally:
        if console is not None:
            stop_process(console.process)
        router.stop()
