"""The Chat tab's handlers, called directly with a console context in front of the fake router (no browser)."""

from __future__ import annotations

from fedllm.testing.factories import free_port, make_settings
from tests.ui.conftest import ADMIN_TOKEN
from fedllm.ui.context import ConsoleContext
from fedllm.ui.tabs import chat as tab


def _ctx(home, router_url: str) -> ConsoleContext:
    return ConsoleContext.from_settings(make_settings(home, ui={"router_url": router_url}, serve={"admin_token": ADMIN_TOKEN}))


def test_models_fill_the_pickers_and_keep_a_valid_pick(tmp_path, fake_router):
    ctx = _ctx(tmp_path, fake_router.url)

    model, a, b, note = tab.load_models(ctx, None, None, "gone")

    base = fake_router.state.base_model
    assert model.value == a.value == b.value == base and base in [c[0] for c in model.choices] and note == ""


def test_models_with_the_router_down_leave_the_pickers_and_say_so(tmp_path):
    *_, note = tab.load_models(_ctx(tmp_path, f"http://127.0.0.1:{free_port()}"), None, None, None)
    assert note.startswith("⚠️")


def test_respond_streams_the_answer_into_the_history(tmp_path, fake_router):
    ctx = _ctx(tmp_path, fake_router.url)

    steps = list(tab.respond(ctx, "hi", [], "m1", "Be brief.", 0.0, 32))

    box, history, problem = steps[-1]
    assert box == "" and problem == ""
    assert history[0] == {"role": "user", "content": "hi"}
    assert history[1]["role"] == "assistant" and history[1]["content"].startswith("Hello from m1:")
    assert len(steps) > 3  # streamed piece by piece, not at once
    sent = fake_router.state.chats[-1]
    assert sent["model"] == "m1" and sent["messages"][0] == {"role": "system", "content": "Be brief."}


def test_respond_without_a_model_keeps_the_message_and_asks_for_one(tmp_path):
    (box, history, problem), = tab.respond(_ctx(tmp_path, "http://127.0.0.1:1"), "hi", [], None, "", 0.7, 16)
    assert box == "hi" and history == [] and "Pick a model" in problem


def test_compare_streams_both_models(tmp_path, fake_router):
    a, b = list(tab.run_compare(_ctx(tmp_path, fake_router.url), "hi", "m1", "m2", "", 0.0, 16))[-1]
    assert a.startswith("**m1**") and "Hello from m1:" in a and "Hello from m2:" in b
