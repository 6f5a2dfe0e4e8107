"""A tiny, fast fake vLLM OpenAI worker for tests and benchmarks (a test double: not part of the product).

It is a raw ASGI app, so it costs almost nothing per request and can be mounted in process
(`httpx.ASGITransport(app=create_fake_app())`) or run as a real process:

    python -m testing.fake_vllm --port 8101 --model fake

Endpoints: `GET /health`, `GET /v1/models`, `POST /v1/chat/completions`, `POST /v1/completions` (streaming SSE
and not), `POST /v1/load_lora_adapter`, `POST /v1/unload_lora_adapter`. Loaded adapters appear in `/v1/models`
with `parent` set to the base model, as in vLLM, and answer as `"model": <lora_name>`. With an API key (`api_key`,
or the `VLLM_API_KEY` environment variable in process mode, as vLLM reads it) every `/v1/*` path answers 401
`{"error": "Unauthorized"}` without `Authorization: Bearer <key>`, as vLLM's own middleware does; `/health` stays open.
Every answer is `tok0 tok1 ...` (`chunks` tokens), whatever the prompt; `forge` replaces it with forged text (a
lying worker). Token accounting follows vLLM: an answer stops at `max_completion_tokens`, else `max_tokens` (the
former wins when both are given), each of `n` choices is generated, and `usage` counts one prompt token per word of
the prompt plus 5 (the chat template) and every choice's tokens. A stream ends with a usage chunk (`"choices": []`)
when the request asks for `stream_options.include_usage`, as vLLM's does.

Failure injection (constructor arguments, or at run time with `POST /fake/control` and a JSON object of the same
names): `fail_next` (the next N completion requests answer `fail_status`, default 500), `delay_s` (sleep before
answering), `first_byte_delay_s` (a slow first token: a stream sends its headers at once, as vLLM does, then waits
this long before its first chunk; a non-streamed answer waits before answering) on a `first_byte_delay_fraction` of the
completion requests (default all; drawn from a generator seeded by `seed`: a heavy tail), `chunk_delay_s` (sleep
between stream chunks), `break_after_chunks` (a stream stops after K chunks
without its `[DONE]`, connection closed), `unhealthy` (`/health` answers 503), `die_after` (the process exits
after N more completion requests: only for process mode), `refuse_loads` (adapter loads answer 400), `forge` (answer this text instead). `GET /fake/requests` lists what was
received (path, model, the last message or prompt as `prompt`, headers named `x-*`), for assertions; a completion whose client disconnected
during its `delay_s` or `first_byte_delay_s` is abandoned, as vLLM aborts it, and its entry gets `"cancelled": true`.
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

_CONTROL_FIELDS = ("fail_next", "fail_status", "delay_s", "chunk_delay_s", "break_after_chunks", "unhealthy", "die_after",
                   "refuse_loads", "forge", "first_byte_delay_s", "first_byte_delay_fraction")


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
        if self._auth is not None and path.startswith("/v1") and dict(scope["headers"]).get(b"authorization") != self._auth:
            await self._send_json(send, 401, {"error": "Unauthorized"})
            return
        if method == "GET":
            if path == "/health":
                await self._send(send, 503 if self.unhealthy else 200, b"" if not self.unhealthy else b'{"status":"unhealthy"}')
            elif path == "/v1/models":
                await self._send_json(send, 200, self._models())
            elif path == "/fake/requests":
                await self._send_json(send, 200, self.requests)
            else:
                await self._send_json(send, 404, _error("not found", "NotFoundError", 404))
            return
        body = await _read_body(receive)
        if path in ("/v1/chat/completions", "/v1/completions"):
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
        data = [{"id": self.model, "object": "model", "created": self.created, "owned_by": "fake", "root": self.model, "parent": None}]
        data += [
            {"id": n, "object": "model", "created": self.created, "owned_by": "fake", "root": p, "parent": self.model}
            for n, p in self.adapters.items()
        ]
        return {"object": "list", "data": data}

    async def _load(self, body: bytes, send: Send) -> None:
        req = json.loads(body or b"{}")
        self.requests.append({"path": "/v1/load_lora_adapter", "model": req.get("lora_name"), "lora_path": req.get("lora_path")})
        if not req.get("lora_name") or not req.get("lora_path"):
            await self._send_json(send, 400, _error("lora_name and lora_path are required", "BadRequestError", 400))
            return
        if self.refuse_loads:
            await self._send_json(send, 400, _error(f"Loading lora {req['lora_name']} failed: no adapter found at {req['lora_path']}", "BadRequestError", 400))
            return
        if req["lora_name"] in self.adapters:
            await self._send_json(send, 400, _error(f"The lora adapter '{req['lora_name']}' has already been loaded.", "InvalidUserInput", 400))
            return
        self.adapters[req["lora_name"]] = req["lora_path"]
        await self._send(send, 200, f"Success: LoRA adapter '{req['lora_name']}' added successfully.".encode(), b"text/plain")

    async def _unload(self, body: bytes, send: Send) -> None:
        req = json.loads(body or b"{}")
        self.requests.append({"path": "/v1/unload_lora_adapter", "model": req.get("lora_name")})
        if self.adapters.pop(req.get("lora_name", ""), None) is None:
            await self._send_json(send, 404, _error(f"The lora adapter '{req.get('lora_name')}' cannot be found.", "NotFoundError", 404))
            return
        await self._send(send, 200, f"Success: LoRA adapter '{req['lora_name']}' removed successfully.".encode(), b"text/plain")

    async def _complete(self, scope: Scope, path: str, body: bytes, receive: Receive, send: Send) -> None:
        try:
            req = json.loads(body)
        except ValueError:
            await self._send_json(send, 400, _error("invalid JSON body", "BadRequestError", 400))
            return
        model = req.get("model")
        headers = {k.decode(): v.decode() for k, v in scope.get("headers", []) if k.startswith(b"x-")}
        entry: dict[str, Any] = {"path": path, "model": model, "stream": bool(req.get("stream")), "headers": headers,
                                 "prompt": _prompt(req)}
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
        late = self.first_byte_delay_s if self.first_byte_delay_s and self._rng.random() < self.first_byte_delay_fraction else 0.0
        if late and not req.get("stream") and await _client_left_within(receive, late):
            entry["cancelled"] = True
            logger.info("fake backend %s: the client left before the first byte; request abandoned", self.name)
            return
        if self.fail_next > 0:
            self.fail_next -= 1
            await self._send_json(send, self.fail_status, _error("injected failure", "InternalServerError", self.fail_status))
            return
        if model != self.model and model not in self.adapters:
            await self._send_json(send, 404, _error(f"The model `{model}` does not exist.", "NotFoundError", 404))
            return
        chat = path.endswith("chat/completions")
        pieces = self._pieces(req)
        choices = req.get("n") if isinstance(req.get("n"), int) and req.get("n") > 0 else 1
        completion = len(pieces) * choices
        prompt_tokens = 5 + len(_all_prompt_text(req).split())
        usage = {"prompt_tokens": prompt_tokens, "completion_tokens": completion, "total_tokens": prompt_tokens + completion}
        if req.get("stream"):
            options = req.get("stream_options")
            with_usage = isinstance(options, dict) and options.get("include_usage") is True
            if not await self._stream(send, model, chat, pieces, choices, usage if with_usage else None, late, receive):
                entry["cancelled"] = True
                logger.info("fake backend %s: the client left before the first chunk; stream abandoned", self.name)
        else:
            await self._send_json(send, 200, self._completion(model, chat, pieces, choices, usage))

    def _pieces(self, req: dict[str, Any]) -> list[str]:
        """The answer's stream pieces: `tok0 `, `tok1 `, ... or the forged text's words, cut at the request's limit."""
        words = self.forge.split() if self.forge is not None else [f"tok{i}" for i in range(self.chunks)]
        limit = req.get("max_completion_tokens") or req.get("max_tokens")  # vLLM: max_completion_tokens wins
        if isinstance(limit, int) and limit >= 0:
            words = words[:limit]
        return [w + " " for w in words]

    def _completion(self, model: str, chat: bool, pieces: list[str], choices: int, usage: dict[str, int]) -> dict[str, Any]:
        text = "".join(pieces).rstrip()
        if chat:
            return {"id": "chatcmpl-fake", "object": "chat.completion", "created": self.created, "model": model,
                    "choices": [{"index": i, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}
                                for i in range(choices)],
                    "usage": usage, "served_by": self.name}
        return {"id": "cmpl-fake", "object": "text_completion", "created": self.created, "model": model,
                "choices": [{"index": i, "text": text, "finish_reason": "stop"} for i in range(choices)],
                "usage": usage, "served_by": self.name}

    async def _stream(self, send: Send, model: str, chat: bool, pieces: list[str], choices: int,
                      usage: dict[str, int] | None, late: float = 0.0, receive: Receive | None = None) -> bool:
        """Stream the answer; False when the client left during the `late` wait before the first chunk."""
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache"), (b"x-served-by", self.name.encode())]})
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
                await send({"type": "http.response.body", "body": b"data: " + _dumps(chunk) + b"\n\n", "more_body": True})
            if self.chunk_delay_s:
                await asyncio.sleep(self.chunk_delay_s)
        if usage is not None:
            chunk = {"id": kind[0], "object": kind[1], "created": self.created, "model": model, "choices": [], "usage": usage}
            await send({"type": "http.response.body", "body": b"data: " + _dumps(chunk) + b"\n\n", "more_body": True})
        await send({"type": "http.response.body", "body": b"data: [DONE]\n\n", "more_body": False})
        return True

    async def _send_json(self, send: Send, status: int, obj: Any) -> None:
        await self._send(send, status, _dumps(obj))

    @staticmethod
    async def _send(send: Send, status: int, body: bytes, content_type: bytes = b"application/json") -> None:
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", content_type), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})


def _prompt(req: dict[str, Any]) -> str:
    """The last message's content (chat) or the prompt (completions), for `GET /fake/requests`."""
    messages = req.get("messages")
    if isinstance(messages, list) and messages and isinstance(messages[-1], dict):
        return str(messages[-1].get("content", ""))
    return str(req.get("prompt", ""))


def _all_prompt_text(req: dict[str, Any]) -> str:
    """Every message's text (chat) or the prompt (completions), for the usage count."""
    messages = req.get("messages")
    if isinstance(messages, list):
        return " ".join(str(m.get("content", "")) for m in messages if isinstance(m, dict))
    return str(req.get("prompt", ""))


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
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--model", default="fake")
    parser.add_argument("--name", default=None, help="Label returned as served_by / x-served-by (default host:port).")
    parser.add_argument("--chunks", type=int, default=4, help="Tokens per answer (stream chunks).")
    parser.add_argument("--delay-s", type=float, default=0.0)
    parser.add_argument("--chunk-delay-s", type=float, default=0.0)
    parser.add_argument("--first-byte-delay-s", type=float, default=0.0, help="A slow first token (after a stream's headers).")
    parser.add_argument("--first-byte-delay-fraction", type=float, default=1.0, help="Share of requests with the slow first token.")
    parser.add_argument("--seed", type=int, default=0, help="Seed of the draw of slow requests.")
    parser.add_argument("--fail-next", type=int, default=0)
    parser.add_argument("--break-after-chunks", type=int, default=None)
    parser.add_argument("--die-after", type=int, default=None)
    parser.add_argument("--forge", default=None, help="Answer this text instead of tok0 tok1 ... (a lying worker).")
    args = parser.parse_args(argv)
    app = create_fake_app(
        args.model, name=args.name or f"{args.host}:{args.port}", chunks=args.chunks, delay_s=args.delay_s,
        chunk_delay_s=args.chunk_delay_s, fail_next=args.fail_next, break_after_chunks=args.break_after_chunks,
        die_after=args.die_after, forge=args.forge, first_byte_delay_s=args.first_byte_delay_s,
        first_byte_delay_fraction=args.first_byte_delay_fraction, seed=args.seed, api_key=os.environ.get("VLLM_API_KEY") or None,
    )
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning", access_log=False, lifespan="on")


if __name__ == "__main__":
    main()
