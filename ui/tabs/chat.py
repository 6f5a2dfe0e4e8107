"""Chat tab: talk to the base model or any served adapter through the router, and compare two models side by side."""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Iterator
from typing import Any

from fedllm.ui.context import ConsoleContext, bind, problem
from fedllm.ui.services import ServiceUnavailable

logger = logging.getLogger(__name__)

DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant."


def message_text(content: Any) -> str:
    """The plain text of a Chatbot message's content (a string, or a list of typed parts)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(p.get("text", "") if isinstance(p, dict) else str(p) for p in content)
    if isinstance(content, dict):
        return str(content.get("text", ""))
    return str(content or "")


def build_messages(system: str, history: list[dict[str, Any]]) -> list[dict[str, str]]:
    """OpenAI chat messages from the system prompt and the Chatbot history (which ends with the new user turn)."""
    messages = [{"role": "system", "content": system}] if system.strip() else []
    for m in history:
        if m.get("role") in ("user", "assistant"):
            messages.append({"role": m["role"], "content": message_text(m.get("content"))})
    return messages


def load_models(ctx: ConsoleContext, current: str | None, cur_a: str | None, cur_b: str | None):
    """The three model pickers from the router's `/v1/models`, keeping valid picks: (model, A, B, note)."""
    import gradio as gr

    try:
        names = ctx.router.models()
    except ServiceUnavailable as exc:
        return gr.Dropdown(), gr.Dropdown(), gr.Dropdown(), problem(exc)
    pick = current if current in names else (names[0] if names else None)
    pick_a = cur_a if cur_a in names else pick
    pick_b = cur_b if cur_b in names else (names[-1] if names else None)
    note = "" if names else "The router serves no model yet: start a worker (`appliance up`)."
    return (
        gr.Dropdown(choices=names, value=pick),
        gr.Dropdown(choices=names, value=pick_a),
        gr.Dropdown(choices=names, value=pick_b),
        note,
    )


def respond(
    ctx: ConsoleContext,
    message: str,
    history: list[dict[str, Any]] | None,
    model_name: str | None,
    system_prompt: str,
    temp: float,
    max_tok: int,
) -> Iterator[tuple[str, list[dict[str, Any]], str]]:
    """Stream the answer to `message` into the history: yields (input box, history, problem)."""
    history = list(history or [])
    if not message.strip():
        yield "", history, ""
        return
    if not model_name:
        yield message, history, problem("Pick a model first (Refresh models lists what the router serves).")
        return
    history.append({"role": "user", "content": message})
    messages = build_messages(system_prompt, history)
    history.append({"role": "assistant", "content": ""})
    yield "", history, ""
    text = ""
    try:
        for piece in ctx.router.stream_chat(model_name, messages, float(temp), int(max_tok)):
            text += piece
            history[-1] = {"role": "assistant", "content": text}
            yield "", history, ""
    except ServiceUnavailable as exc:
        history[-1] = {"role": "assistant", "content": (text + "\n\n" if text else "") + problem(exc)}
        yield "", history, problem(exc)


def run_compare(
    ctx: ConsoleContext, prompt_text: str, a: str | None, b: str | None, system_prompt: str, temp: float, max_tok: int
) -> Iterator[tuple[str, str]]:
    """Stream two models' answers to one prompt side by side: yields (answer A, answer B)."""
    if not prompt_text.strip() or not a or not b:
        yield "Pick two models and write a prompt.", ""
        return
    messages = build_messages(system_prompt, [{"role": "user", "content": prompt_text}])
    texts = {"a": f"**{a}**\n\n", "b": f"**{b}**\n\n"}
    pieces: queue.Queue[tuple[str, str | None]] = queue.Queue()

    def pump(key: str, name: str) -> None:
        try:
            for piece in ctx.router.stream_chat(name, messages, float(temp), int(max_tok)):
                pieces.put((key, piece))
        except ServiceUnavailable as exc:
            pieces.put((key, "\n\n" + problem(exc)))
        finally:
            pieces.put((key, None))

    for key, name in (("a", a), ("b", b)):
        threading.Thread(target=pump, args=(key, name), daemon=True).start()
    open_streams = 2
    while open_streams:
        key, piece = pieces.get()
        if piece is None:
            open_streams -= 1
            continue
        texts[key] += piece
        yield texts["a"], texts["b"]
    yield texts["a"], texts["b"]


def build(ctx: ConsoleContext) -> None:
    """Lay out the Chat tab inside the current `gr.Tab` and wire its handlers."""
    import gradio as gr

    status = gr.Markdown("", elem_id="chat-status")
    with gr.Row():
        model = gr.Dropdown(
            label="Model (base or adapter)", choices=[], allow_custom_value=True, scale=4, elem_id="chat-model"
        )
        refresh = gr.Button("Refresh models", scale=1, elem_id="chat-refresh")
    with gr.Row():
        system = gr.Textbox(label="System prompt", value=DEFAULT_SYSTEM_PROMPT, scale=4)
        temperature = gr.Slider(0.0, 2.0, value=0.7, step=0.05, label="Temperature", scale=1)
        max_tokens = gr.Slider(16, 2048, value=256, step=16, label="Max tokens", scale=1)
    chatbot = gr.Chatbot(label="Conversation", height=340, elem_id="chatbot")
    with gr.Row():
        msg = gr.Textbox(label="Message", placeholder="Ask something and press Enter", scale=5, elem_id="chat-input")
        send = gr.Button("Send", variant="primary", scale=1, elem_id="chat-send")
        clear = gr.Button("Clear", scale=1)
    with gr.Accordion("Compare two models on one prompt", open=False, elem_id="compare"):
        with gr.Row():
            model_a = gr.Dropdown(label="Model A", choices=[], allow_custom_value=True, elem_id="compare-a")
            model_b = gr.Dropdown(label="Model B", choices=[], allow_custom_value=True, elem_id="compare-b")
        prompt = gr.Textbox(label="Prompt", elem_id="compare-prompt")
        compare = gr.Button("Compare", elem_id="compare-run")
        with gr.Row():
            out_a = gr.Markdown(elem_id="compare-out-a")
            out_b = gr.Markdown(elem_id="compare-out-b")

    inputs = [msg, chatbot, model, system, temperature, max_tokens]
    msg.submit(bind(respond, ctx), inputs, [msg, chatbot, status])
    send.click(bind(respond, ctx), inputs, [msg, chatbot, status])
    clear.click(lambda: ([], ""), None, [chatbot, status])
    refresh.click(bind(load_models, ctx), [model, model_a, model_b], [model, model_a, model_b, status])
    compare.click(bind(run_compare, ctx), [prompt, model_a, model_b, system, temperature, max_tokens], [out_a, out_b])
    ctx.on_load.append((bind(load_models, ctx), [model, model_a, model_b], [model, model_a, model_b, status]))
