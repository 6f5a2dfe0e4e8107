"""A tiny, fast fake vLLM OpenAI worker for tests and benchmarks (a test double: not part of the product).

It is a raw ASGI app, so it costs almost nothing per request and can be mounted in process
(`httpx.ASGITransport(app=create_fake_app())`) or run as a real process:

    python -m fedllm.testing.fake_vllm --port 8101 --model fake

Endpoints: `GET /health`, `GET /v1/models`, `POST /v1/chat/completions`, `POST /v1/completions`, `POST /v1/responses`
(streaming SSE and not), `POST /v1/load_lora_adapter`, `POST /v1/unload_lora_adapter`. Loaded adapters appear in
`/v1/models` with `parent` set to the base model, as in vLLM, and answer as `"model": <lora_name>`. With an API key
(`api_key`,
or the `VLLM_API_KEY` environment variable in process mode, as vLLM reads it) every `/v1/*` path answers 401
`{"error": "Unauthorized"}` without `Authorization: Bearer <key>`, as vLLM's own middleware does; `/health` stays open.
Every answer is `tok0 tok1 ...` (`chunks` tokens), whatever the prompt; `forge` replaces it with forged text (a
lying worker). Token accounting follows vLLM: an answer stops at `max_completion_tokens`, else `max_tokens` (the
former wins when both are given), each of `n` choices is generated, and `usage` counts one prompt token per word of
the prompt plus 5 (the chat template) and every choice's tokens. A stream ends with a usage chunk (`"choices": []`)
when the request asks for `stream_options.include_usage`, as vLLM's does. `/v1/responses` answers vLLM's Responses
object (`output` holds one assistant message with one `output_text` part; `usage` has `input_tokens`, `output_tokens`,
`total_tokens`; an answer cut at `max_output_tokens` is `incomplete` with reason `max_output_tokens`), and its stream
is vLLM's event sequence (`event: TYPE` + `data: {...}` with a `sequence_number`): `response.created`,
`response.in_progress`, `response.output_item.added`, `response.content_part.added`, one `response.output_text.delta`
per token, `response.output_text.done`, `response.content_part.done`, `response.output_item.done`, then
`response.completed` carrying the whole response (its status `incomplete` when cut), and no `[DONE]`.

Failure injection (constructor arguments, or at run time with `POST /fake/control` and a JSON object of the same names):
`fail_next` (the next N completion requests answer `fail_status`, default 500), `delay_s` (sleep before answering),
`first_byte_delay_s` (a slow first token: a stream sends its headers at once, as vLLM does, then waits this long before
its first chunk; a non-streamed answer waits before answering) on a `first_byte_delay_fraction` of the completion
requests (default all; drawn from a generator seeded by `seed`: a heavy tail), `chunk_delay_s` (sleep between stream
chunks), `break_after_chunks` (a stream stops after K chunks without its `[DONE]`, connection closed), `unhealthy`
(`/health` answers 503), `health_delay_s` (`/health` answers late), `die_after` (the process exits after N more
completion requests: only for process mode), `refuse_loads` (adapter loads answer 400), `forge` (answer this text
instead), `extra_models` (more base models its `/v1/models` lists). `GET /fake/requests` lists what was received (path,
model, the last message or prompt as `prompt`, headers named `x-*`), for assertions; a completion whose client
disconnected during its `delay_s` or `first_byte_delay_s` is abandoned, as vLLM aborts it, and its entry gets
`"cancelled": true`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import random
import time
from typing import Any, Awaitable, Callable

logger = logging.getLogger(__name__)

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]

_CONTROL_FIELDS = (
    "fail_next",
    "fail_status",
    "delay_s",
    "chunk_delay_s",
    "break_after_chunks",
    "unhealthy",
    "die_after",
    "refuse_loads",
    "forge",
    "first_byte_delay_s",
    "first_byte_delay_fraction",
    "extra_models",
    "health_delay_s",
)


def _dumps(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


class FakeBackend:
    """The ASGI app. Attributes named in `_CONTROL_FIELDS` may be changed while it runs."""

    def __init__(
        self,
        model: str = "fake",
        *,
        name: str = "fake",
        chunks: int = 4,
        fail_next: int = 0,
        fail_status: int = 500,
        delay_s: float = 0.0,
        chunk_delay_s: float = 0.0,
        break_after_chunks: int | None = None,
        unhealthy: bool = False,
        die_after: int | None = None,
        refuse_loads: bool = False,
        forge: str | None = None,
        api_key: str | None = None,
        first_byte_delay_s: float = 0.0,
        first_byte_delay_fraction: float = 1.0,
        seed: int = 0,
    ) -> None:
        self.model = model
        self.name = name
        self.chunks = chunks
        self.fail_next = fail_next
        self.fail_status = fail_status
        self.delay_s = delay_s
        self.chunk_delay_s = chunk_delay_s
        self.break_after_chunks = break_after_chunks
        self.unhealthy = unhealthy
        self.die_after = die_after
        self.refuse_loads = refuse_loads
        self.forge = forge
        self.first_byte_delay_s = first_byte_delay_s
        self.first_byte_delay_fraction = first_byte_delay_fraction
        self._rng = random.Random(seed)
        self.extra_models: list[str] = []  # more base models listed besides `model` (a worker changing its list)
        self.health_delay_s = 0.0  # `/health` answers this late (a probe that times out on a busy machine)
        self._auth = f"Bearer {api_key}".encode() if api_key else None
        self.adapters: dict[str, str] = {}
        self.requests: list[dict[str, Any]] = []
        self.created = int(time.time())

    # -- ASGI entry --
    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        path, method = scope["path"], scope["method"]
        if (
            self._auth is not None
            and path.startswith("/v1")
            and dict(scope["headers"]).get(b"authorization") != self._auth
        ):
            await self._send_json(send, 401, {"error": "Unauthorized"})
            return
        if method == "GET":
            if path == "/health":
                if self.health_delay_s:
                    await asyncio.sleep(self.health_delay_s)
                await self._send(
                    send, 503 if self.unhealthy else 200, b"" if not self.unhealthy else b'{"status":"unhealthy"}'
                )
            elif path == "/v1/models":
                await self._send_json(send, 200, self._models())
            elif path == "/fake/requests":
                await self._send_json(send, 200, self.requests)
            else:
                await self._send_json(send, 404, _error("not found", "NotFoundError", 404))
            return
        body = await _read_body(receive)
        if path in ("/v1/chat/completions", "/v1/completions", "/v1/responses"):
            await self._complete(scope, path, body, receive, send)
        elif path == "/v1/load_lora_adapter":
            await self._load(body, send)
        elif path == "/v1/unload_lora_adapter":
            await self._unload(body, send)
        elif path == "/fake/control":
            self._control(json.loads(body or b"{}"))
            await self._send_json(send, 200, {k: getattr(self, k) for k in _CONTROL_FIELDS})
        else:
            await self._send_json(send, 404, _error("not found", "NotFoundError", 404))

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return

    def _control(self, changes: dict[str, Any]) -> None:
        for key, value in changes.items():
            if key not in _CONTROL_FIELDS:
                raise ValueError(f"unknown control field {key!r}; known: {', '.join(_CONTROL_FIELDS)}")
            setattr(self, key, value)

    def _models(self) -> dict[str, Any]:
        data = [
            {"id": m, "object": "model", "created": self.created, "owned_by": "fake", "root": m, "parent": None}
            for m in [self.model, *self.extra_models]
        ]
        data += [
            {"id": n, "object": "model", "created": self.created, "owned_by": "fake", "root": p, "parent": self.model}
            for n, p in self.adapters.items()
        ]
        return {"object": "list", "data": data}

    async def _load(self, body: bytes, send: Send) -> None:
        req = json.loads(body or b"{}")
        self.requests.append(
            {"path": "/v1/load_lora_adapter", "model": req.get("lora_name"), "lora_path": req.get("lora_path")}
        )
        if not req.get("lora_name") or not req.get("lora_path"):
            await self._send_json(send, 400, _error("lora_name and lora_path are required", "BadRequestError", 400))
            return
        if self.refuse_loads:
            await self._send_json(
                send,
                400,
                _error(
                    f"Loading lora {req['lora_name']} failed: no adapter found at {req['lora_path']}",
                    "BadRequestError",
                    400,
                ),
            )
            return
        if req["lora_name"] in self.adapters:
            await self._send_json(
                send,
                400,
                _error(f"The lora adapter '{req['lora_name']}' has already been loaded.", "InvalidUserInput", 400),
            )
            return
        self.adapters[req["lora_name"]] = req["lora_path"]
        await self._send(
            send, 200, f"Success: LoRA adapter '{req['lora_name']}' added successfully.".encode(), b"text/plain"
        )

    async def _unload(self, body: bytes, send: Send) -> None:
        req = json.loads(body or b"{}")
        self.requests.append({"path": "/v1/unload_lora_adapter", "model": req.get("lora_name")})
        if self.adapters.pop(req.get("lora_name", ""), None) is None:
            await self._send_json(
                send, 404, _error(f"The lora adapter '{req.get('lora_name')}' cannot be found.", "NotFoundError", 404)
            )
            return
        await self._send(
            send, 200, f"Success: LoRA adapter '{req['lora_name']}' removed successfully.".encode(), b"text/plain"
        )

    async def _complete(self, scope: Scope, path: str, body: bytes, receive: Receive, send: Send) -> None:
        try:
            req = json.loads(body)
        except ValueError:
            await self._send_json(send, 400, _error("invalid JSON body", "BadRequestError", 400))
            return
        model = req.get("model")
        headers = {k.decode(): v.decode() for k, v in scope.get("headers", []) if k.startswith(b"x-")}
        entry: dict[str, Any] = {
            "path": path,
            "model": model,
            "stream": bool(req.get("stream")),
            "headers": headers,
            "prompt": _prompt(req),
        }
        self.requests.append(entry)
        if self.die_after is not None:
            self.die_after -= 1
            if self.die_after < 0:
                logger.warning("fake backend %s dying as asked", self.name)
                os._exit(1)
        if self.delay_s and await _client_left_within(receive, self.delay_s):
            entry["cancelled"] = True
            logger.info("fake backend %s: the client left during the delay; request abandoned", self.name)
            return
        late = (
            self.first_byte_delay_s
            if self.first_byte_delay_s and self._rng.random() < self.first_byte_delay_fraction
            else 0.0
        )
        if late and not req.get("stream") and await _client_left_within(receive, late):
            entry["cancelled"] = True
            logger.info("fake backend %s: the client left before the first byte; request abandoned", self.name)
            return
        if self.fail_next > 0:
            self.fail_next -= 1
            await self._send_json(
                send, self.fail_status, _error("injected failure", "InternalServerError", self.fail_status)
            )
            return
        if model != self.model and model not in self.adapters:
            await self._send_json(send, 404, _error(f"The model `{model}` does not exist.", "NotFoundError", 404))
            return
        if path == "/v1/responses":
            if not await self._respond(send, model, req, late, receive):
                entry["cancelled"] = True
                logger.info("fake backend %s: the client left before the first event; stream abandoned", self.name)
            return
        chat = path.endswith("chat/completions")
        pieces = self._pieces(req)
        choices = req.get("n") if isinstance(req.get("n"), int) and req.get("n") > 0 else 1
        completion = len(pieces) * choices
        prompt_tokens = 5 + len(_all_prompt_text(req).split())
        usage = {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion,
            "total_tokens": prompt_tokens + completion,
        }
        if req.get("stream"):
            options = req.get("stream_options")
            with_usage = isinstance(options, dict) and options.get("include_usage") is True
            if not await self._stream(send, model, chat, pieces, choices, usage if with_usage else None, late, receive):
                entry["cancelled"] = True
                logger.info("fake backend %s: the client left before the first chunk; stream abandoned", self.name)
        else:
            await self._send_json(send, 200, self._completion(model, chat, pieces, choices, usage))

    def _words(self) -> list[str]:
        return self.forge.split() if self.forge is not None else [f"tok{i}" for i in range(self.chunks)]

    def _pieces(self, req: dict[str, Any], limit: Any = None) -> list[str]:
        """The answer's stream pieces: `tok0 `, `tok1 `, ... or the forged text's words, cut at the request's limit."""
        words = self._words()
        if limit is None:  # chat and completions: max_completion_tokens wins over max_tokens, as in vLLM
            limit = req.get("max_completion_tokens") or req.get("max_tokens")
        if isinstance(limit, int) and limit >= 0:
            words = words[:limit]
        return [w + " " for w in words]

    def _completion(
        self, model: str, chat: bool, pieces: list[str], choices: int, usage: dict[str, int]
    ) -> dict[str, Any]:
        text = "".join(pieces).rstrip()
        if chat:
            return {
                "id": "chatcmpl-fake",
                "object": "chat.completion",
                "created": self.created,
                "model": model,
                "choices": [
                    {"index": i, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}
                    for i in range(choices)
                ],
                "usage": usage,
                "served_by": self.name,
            }
        return {
            "id": "cmpl-fake",
            "object": "text_completion",
            "created": self.created,
            "model": model,
            "choices": [{"index": i, "text": text, "finish_reason": "stop"} for i in range(choices)],
            "usage": usage,
            "served_by": self.name,
        }

    async def _stream(
        self,
        send: Send,
        model: str,
        chat: bool,
        pieces: list[str],
        choices: int,
        usage: dict[str, int] | None,
        late: float = 0.0,
        receive: Receive | None = None,
    ) -> bool:
        """Stream the answer; False when the client left during the `late` wait before the first chunk."""
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [
                    (b"content-type", b"text/event-stream"),
                    (b"cache-control", b"no-cache"),
                    (b"x-served-by", self.name.encode()),
                ],
            }
        )
        if late and receive is not None and await _client_left_within(receive, late):
            return False
        kind = ("chatcmpl-fake", "chat.completion.chunk") if chat else ("cmpl-fake", "text_completion")
        for i, piece in enumerate(pieces):
            if self.break_after_chunks is not None and i >= self.break_after_chunks:
                # End the response without [DONE]: to the client this is a connection that dies mid-stream.
                raise ConnectionAbortedError("fake backend broke the stream as asked")
            for index in range(choices):
                if chat:
                    delta = {"role": "assistant", "content": piece} if i == 0 else {"content": piece}
                    choice = {"index": index, "delta": delta, "finish_reason": None}
                else:
                    choice = {"index": index, "text": piece, "finish_reason": None}
                chunk = {"id": kind[0], "object": kind[1], "created": self.created, "model": model, "choices": [choice]}
                await send(
                    {"type": "http.response.body", "body": b"data: " + _dumps(chunk) + b"\n\n", "more_body": True}
                )
            if self.chunk_delay_s:
                await asyncio.sleep(self.chunk_delay_s)
        if usage is not None:
            chunk = {
                "id": kind[0],
                "object": kind[1],
                "created": self.created,
                "model": model,
                "choices": [],
                "usage": usage,
            }
            await send({"type": "http.response.body", "body": b"data: " + _dumps(chunk) + b"\n\n", "more_body": True})
        await send({"type": "http.response.body", "body": b"data: [DONE]\n\n", "more_body": False})
        return True

    # -- the Responses API, in vLLM's shapes --
    def _response(self, model: str, req: dict[str, Any], pieces: list[str], status: str) -> dict[str, Any]:
        """A Responses object: `status` "in_progress" (no output, no usage yet), "completed" or "incomplete"."""
        text = "".join(pieces)
        output = (
            []
            if status == "in_progress"
            else [
                {
                    "id": "msg_fake",
                    "type": "message",
                    "role": "assistant",
                    "status": "completed",
                    "content": [{"type": "output_text", "text": text, "annotations": [], "logprobs": None}],
                }
            ]
        )
        input_tokens = 5 + len(_all_prompt_text(req).split())
        usage = (
            None
            if status == "in_progress"
            else {
                "input_tokens": input_tokens,
                "input_tokens_details": {"cached_tokens": 0},
                "output_tokens": len(pieces),
                "output_tokens_details": {"reasoning_tokens": 0},
                "total_tokens": input_tokens + len(pieces),
            }
        )
        return {
            "id": "resp_fake",
            "created_at": self.created,
            "model": model,
            "object": "response",
            "status": status,
            "incomplete_details": {"reason": "max_output_tokens"} if status == "incomplete" else None,
            "instructions": req.get("instructions"),
            "metadata": req.get("metadata"),
            "output": output,
            "parallel_tool_calls": True,
            "temperature": req.get("temperature", 1.0),
            "tool_choice": "auto",
            "tools": [],
            "top_p": req.get("top_p", 1.0),
            "background": False,
            "max_output_tokens": req.get("max_output_tokens") or 2048,
            "max_tool_calls": None,
            "previous_response_id": None,
            "prompt": None,
            "reasoning": None,
            "service_tier": "auto",
            "text": None,
            "top_logprobs": None,
            "truncation": "disabled",
            "usage": usage,
            "user": None,
            "served_by": self.name,
        }

    async def _respond(
        self, send: Send, model: str, req: dict[str, Any], late: float = 0.0, receive: Receive | None = None
    ) -> bool:
        """Answer a Responses request; False when the client left during the `late` wait before the first event."""
        # Tokens as a tokenizer splits words ("tok0", " tok1", ...): the deltas add up to the answer's text exactly.
        pieces = [
            ("" if i == 0 else " ") + p.rstrip() for i, p in enumerate(self._pieces(req, req.get("max_output_tokens")))
        ]
        status = "incomplete" if len(pieces) < len(self._words()) else "completed"
        if not req.get("stream"):
            await self._send_json(send, 200, self._response(model, req, pieces, status))
            return True
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [
                    (b"content-type", b"text/event-stream"),
                    (b"cache-control", b"no-cache"),
                    (b"x-served-by", self.name.encode()),
                ],
            }
        )
        if late and receive is not None and await _client_left_within(receive, late):
            return False
        seq = 0

        async def event(body: dict[str, Any], more: bool = True) -> None:
            nonlocal seq
            body = {**body, "sequence_number": seq}
            seq += 1
            data = b"event: " + body["type"].encode() + b"\ndata: " + _dumps(body) + b"\n\n"
            await send({"type": "http.response.body", "body": data, "more_body": more})

        text = "".join(pieces)
        part = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
        where = {"item_id": "msg_fake", "output_index": 0, "content_index": 0}
        await event({"type": "response.created", "response": self._response(model, req, [], "in_progress")})
        await event({"type": "response.in_progress", "response": self._response(model, req, [], "in_progress")})
        await event(
            {
                "type": "response.output_item.added",
                "output_index": 0,
                "item": {
                    "id": "msg_fake",
                    "type": "message",
                    "role": "assistant",
                    "content": [],
                    "status": "in_progress",
                },
            }
        )
        await event({"type": "response.content_part.added", **where, "part": part})
        for i, piece in enumerate(pieces):
            if self.break_after_chunks is not None and i >= self.break_after_chunks:
                raise ConnectionAbortedError("fake backend broke the stream as asked")
            await event({"type": "response.output_text.delta", **where, "delta": piece, "logprobs": []})
            if self.chunk_delay_s:
                await asyncio.sleep(self.chunk_delay_s)
        done_part = {"type": "output_text", "text": text, "annotations": []}
        await event({"type": "response.output_text.done", **where, "text": text, "logprobs": []})
        await event({"type": "response.content_part.done", **where, "part": done_part})
        await event(
            {
                "type": "response.output_item.done",
                "output_index": 0,
                "item": {
                    "id": "msg_fake",
                    "type": "message",
                    "role": "assistant",
                    "content": [done_part],
                    "status": "completed",
                },
            }
        )
        # vLLM ends every stream with response.completed, whose response says "incomplete" when it was cut.
        await event({"type": "response.completed", "response": self._response(model, req, pieces, status)}, more=False)
        return True

    async def _send_json(self, send: Send, status: int, obj: Any) -> None:
        await self._send(send, status, _dumps(obj))

    @staticmethod
    async def _send(send: Send, status: int, body: bytes, content_type: bytes = b"application/json") -> None:
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [(b"content-type", content_type), (b"content-length", str(len(body)).encode())],
            }
        )
        await send({"type": "http.response.body", "body": body})


def _messages(req: dict[str, Any]) -> list[Any] | None:
    """The messages of a chat request, or of a Responses request whose `input` is a list of them."""
    messages = req.get("messages", req.get("input"))
    return messages if isinstance(messages, list) else None


def _content_text(content: Any) -> str:
    """A message's content as text: a string, or the `text` of its parts (Responses `input_text` parts)."""
    if isinstance(content, list):
        return " ".join(str(p.get("text", "")) for p in content if isinstance(p, dict))
    return str(content)


def _prompt(req: dict[str, Any]) -> str:
    """The last message's content (chat, responses) or the prompt / input text, for `GET /fake/requests`."""
    messages = _messages(req)
    if messages and isinstance(messages[-1], dict):
        return _content_text(messages[-1].get("content", ""))
    return str(req.get("prompt", req.get("input", "")))


def _all_prompt_text(req: dict[str, Any]) -> str:
    """Every message's text (chat, responses; with the instructions) or the prompt / input text, for the usage count."""
    messages = _messages(req)
    head = str(req.get("instructions") or "")
    if messages is not None:
        return " ".join([head, *(_content_text(m.get("content", "")) for m in messages if isinstance(m, dict))])
    return " ".join([head, str(req.get("prompt", req.get("input", "")))])


def _error(message: str, type_: str, code: int) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": None, "code": code}}


async def _read_body(receive: Receive) -> bytes:
    chunks: list[bytes] = []
    while True:
        message = await receive()
        chunks.append(message.get("body", b""))
        if not message.get("more_body"):
            return b"".join(chunks)


async def _client_left_within(receive: Receive, seconds: float) -> bool:
    """Wait `seconds`, or less if the client disconnects first; returns whether it did."""

    async def disconnected() -> None:
        while (await receive())["type"] != "http.disconnect":
            pass

    watch = asyncio.ensure_future(disconnected())
    try:
        done, _ = await asyncio.wait({watch}, timeout=seconds)
    finally:
        watch.cancel()
    return bool(done)


def create_fake_app(model: str = "fake", **options: Any) -> FakeBackend:
    """A fake OpenAI backend serving `model`; `options` are FakeBackend's keyword arguments (failure injection)."""
    return FakeBackend(model, **options)


def main(argv: list[str] | None = None) -> None:
    """Run the fake backend under uvicorn (uvloop and httptools when installed)."""
    import uvicorn

    parser = argparse.ArgumentParser(description="A fast fake OpenAI backend for tests and benchmarks.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument(
        "--uds", default=None, help="Listen on this Unix socket instead of host:port (as vLLM's --uds)."
    )
    parser.add_argument("--model", default="fake")
    parser.add_argument("--name", default=None, help="Label returned as served_by / x-served-by (default host:port).")
    parser.add_argument("--chunks", type=int, default=4, help="Tokens per answer (stream chunks).")
    parser.add_argument("--delay-s", type=float, default=0.0)
    parser.add_argument("--chunk-delay-s", type=float, default=0.0)
    parser.add_argument(
        "--first-byte-delay-s", type=float, default=0.0, help="A slow first token (after a stream's headers)."
    )
    parser.add_argument(
        "--first-byte-delay-fraction", type=float, default=1.0, help="Share of requests with the slow first token."
    )
    parser.add_argument("--seed", type=int, default=0, help="Seed of the draw of slow requests.")
    parser.add_argument("--fail-next", type=int, default=0)
    parser.add_argument("--break-after-chunks", type=int, default=None)
    parser.add_argument("--die-after", type=int, default=None)
    parser.add_argument("--forge", default=None, help="Answer this text instead of tok0 tok1 ... (a lying worker).")
    args = parser.parse_args(argv)
    app = create_fake_app(
        args.model,
        name=args.name or f"{args.host}:{args.port}",
        chunks=args.chunks,
        delay_s=args.delay_s,
        chunk_delay_s=args.chunk_delay_s,
        fail_next=args.fail_next,
        break_after_chunks=args.break_after_chunks,
        die_after=args.die_after,
        forge=args.forge,
        first_byte_delay_s=args.first_byte_delay_s,
        first_byte_delay_fraction=args.first_byte_delay_fraction,
        seed=args.seed,
        api_key=os.environ.get("VLLM_API_KEY") or None,
    )
    where = {"uds": args.uds} if args.uds else {"host": args.host, "port": args.port}
    uvicorn.run(app, **where, log_level="warning", access_log=False, lifespan="on")


if __name__ == "__main__":
    main()
