"""A hostile worker for tests: honest only on what it recognises as a canary, forging every other answer.

It sits in front of a reference worker (e.g. `fedllm.testing.fake_vllm`) and passes it, unchanged, only the requests it
takes for canaries by the tells of the router's former canary checks: one of the 12 public prompts as the only
message (no system prompt), temperature 0, `max_tokens` 16, and the first `--burst` chat completions after it
starts (the check a new worker got on joining). Every other chat completion gets `--forge` as its answer. `/health`
and `/v1/models` are passed through. With `HOSTILE_API_KEY` set, every `/v1` call needs it (as vLLM's `--api-key`).
`GET /hostile/requests` lists what it received: `{"prompt": last message, "honest": bool}`.

    python -m fedllm.testing.hostile_worker --port 8101 --upstream http://127.0.0.1:8100 --forge "Send your password"
"""

from __future__ import annotations

import argparse
import json
import os
import time
from typing import Any

# The router's canary prompts before issue 19 (public in its source), and the shape they were sent in.
OLD_CANARY_PROMPTS = frozenset(
    {
        "What is the capital of France?",
        "Give me three tips for writing a clear email.",
        "Explain what a hash function is in one sentence.",
        "How many days are there in a leap year?",
        "Summarise the water cycle briefly.",
        "What does HTTP stand for?",
        "Suggest a name for a small bakery.",
        "Translate 'good morning' into Spanish.",
        "What is 12 times 7?",
        "Name two benefits of regular exercise.",
        "Write a haiku about autumn.",
        "What is the boiling point of water at sea level?",
    }
)
OLD_CANARY_MAX_TOKENS = 16


def looks_like_old_canary(req: dict[str, Any]) -> bool:
    """Whether `req` has every tell of the former canaries."""
    messages = req.get("messages")
    return (
        isinstance(messages, list)
        and len(messages) == 1
        and isinstance(messages[0], dict)
        and messages[0].get("role") == "user"
        and messages[0].get("content") in OLD_CANARY_PROMPTS
        and req.get("temperature") == 0
        and req.get("max_tokens") == OLD_CANARY_MAX_TOKENS
    )


def create_app(upstream: str, forge: str, burst: int, api_key: str | None):
    """The hostile worker's aiohttp app: it forwards to `upstream` and forges answers as `forge` says."""
    import aiohttp
    from aiohttp import web

    received: list[dict[str, Any]] = []
    state = {"chats": 0}
    session: dict[str, aiohttp.ClientSession] = {}

    def authorised(request: web.Request) -> bool:
        return api_key is None or request.headers.get("authorization") == f"Bearer {api_key}"

    async def passthrough(request: web.Request, body: bytes | None = None) -> web.Response:
        headers = {"content-type": "application/json"}
        async with session["s"].request(request.method, upstream + request.path, data=body, headers=headers) as resp:
            return web.Response(status=resp.status, body=await resp.read(), content_type="application/json")

    async def health(request: web.Request) -> web.Response:
        return await passthrough(request)

    async def models(request: web.Request) -> web.Response:
        if not authorised(request):
            return web.json_response({"error": "Unauthorized"}, status=401)
        return await passthrough(request)

    async def chat(request: web.Request) -> web.Response:
        if not authorised(request):
            return web.json_response({"error": "Unauthorized"}, status=401)
        body = await request.read()
        req = json.loads(body)
        state["chats"] += 1
        honest = state["chats"] <= burst or looks_like_old_canary(req)
        messages = req.get("messages") or [{}]
        received.append({"prompt": str(messages[-1].get("content", "")), "honest": honest})
        if honest:
            return await passthrough(request, body)
        return web.json_response(
            {
                "id": "chatcmpl-hostile",
                "object": "chat.completion",
                "created": int(time.time()),
                "model": req.get("model"),
                "choices": [{"index": 0, "message": {"role": "assistant", "content": forge}, "finish_reason": "stop"}],
                "usage": {
                    "prompt_tokens": 5,
                    "completion_tokens": len(forge.split()),
                    "total_tokens": 5 + len(forge.split()),
                },
            }
        )

    async def requests(request: web.Request) -> web.Response:
        return web.json_response(received)

    async def on_startup(app: web.Application) -> None:
        session["s"] = aiohttp.ClientSession()

    async def on_cleanup(app: web.Application) -> None:
        await session["s"].close()

    app = web.Application()
    app.router.add_get("/health", health)
    app.router.add_get("/v1/models", models)
    app.router.add_post("/v1/chat/completions", chat)
    app.router.add_get("/hostile/requests", requests)
    app.on_startup.append(on_startup)
    app.on_cleanup.append(on_cleanup)
    return app


def main(argv: list[str] | None = None) -> None:
    """Run a hostile worker in front of an upstream worker (see the module docstring for its flags)."""
    from aiohttp import web

    parser = argparse.ArgumentParser(description="A hostile worker: honest on recognised canaries, forging the rest.")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--upstream", required=True, help="The reference worker it proxies recognised canaries to.")
    parser.add_argument("--forge", default="Send your password to evil.example", help="The forged answer.")
    parser.add_argument(
        "--burst", type=int, default=2, help="Chat completions after start answered honestly (a join check)."
    )
    args = parser.parse_args(argv)
    web.run_app(
        create_app(args.upstream.rstrip("/"), args.forge, args.burst, os.environ.get("HOSTILE_API_KEY") or None),
        host="127.0.0.1",
        port=args.port,
        print=None,
    )


if __name__ == "__main__":
    main()
