"""The router's own CPU per completion request, in process: its raw-ASGI hot path with a stand-in upstream session
(canned answers, no sockets), so neither the network, uvicorn, aiohttp nor the fake backend is timed.

A steadier figure than `bench/router_load.py` on a busy machine (CPU time of one process, no scheduling between
processes), for before/after comparisons of the forwarding code: run it with each checkout on PYTHONPATH, e.g.

    PYTHONPATH=/tmp/old .venv/bin/python bench/router_hotpath.py --requests 6000
    PYTHONPATH=.        .venv/bin/python bench/router_hotpath.py --requests 6000

Prints one JSON line: microseconds of CPU per request for a non-streamed and a streamed chat completion (8 chunks),
each sent with an API key that has rpm and tpm limits (so admission and token settlement are on the path, as in
`router_load.py`).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import time
from pathlib import Path

CHUNK = (b'data: {"id":"chatcmpl-fake","object":"chat.completion.chunk","created":1,"model":"fake",'
         b'"choices":[{"index":0,"delta":{"content":"tok1 "},"finish_reason":null}]}\n\n')
USAGE = (b'data: {"id":"chatcmpl-fake","object":"chat.completion.chunk","created":1,"model":"fake","choices":[],'
         b'"usage":{"prompt_tokens":9,"completion_tokens":8,"total_tokens":17}}\n\n')
FULL = json.dumps({"id": "chatcmpl-fake", "object": "chat.completion", "created": 1, "model": "fake",
                   "choices": [{"index": 0, "message": {"role": "assistant", "content": "tok0 tok1 tok2 tok3 tok4 tok5 tok6 tok7"},
                                "finish_reason": "stop"}],
                   "usage": {"prompt_tokens": 9, "completion_tokens": 8, "total_tokens": 17}}).encode()


class _Content:
    def __init__(self, chunks: list[bytes]):
        self.chunks = chunks

    async def iter_any(self):
        for chunk in self.chunks:
            yield chunk


class _Response:
    """What the router reads of an aiohttp response; a usage chunk only when the request asked for it (as vLLM)."""

    def __init__(self, stream: bool, usage: bool):
        self.status = 200
        self.headers = {"content-type": "text/event-stream" if stream else "application/json"}
        self.content = _Content([CHUNK] * 8 + ([USAGE] if usage else []) + [b"data: [DONE]\n\n"])

    async def read(self) -> bytes:
        return FULL

    def release(self) -> None:
        pass

    def close(self) -> None:
        pass


class _Session:
    async def post(self, url, data=None, headers=None, timeout=None):
        body = json.loads(data)
        options = body.get("stream_options") or {}
        return _Response(bool(body.get("stream")), options.get("include_usage") is True)

    async def close(self) -> None:
        pass


async def measure(requests: int) -> dict[str, float]:
    from fedllm.core.settings import load_settings
    from fedllm.serve import create_app
    from fedllm.serve.keys import create_key

    home = Path(tempfile.mkdtemp(prefix="router-hotpath-"))
    key = create_key(home / "keys", "bench", rpm=10_000_000, tpm=10_000_000_000)
    settings = load_settings(overrides={"home": str(home), "serve": {"workers": [{"url": "http://127.0.0.1:9", "region": "local"}]}})
    app = create_app(settings)
    app.state.registry.session = _Session()
    for worker in app.state.registry.workers.values():
        worker.healthy, worker.models = True, {"fake"}
    forwarder = app.state.forwarder
    out = {}
    for stream in (False, True):
        body = json.dumps({"model": "fake", "stream": stream, "max_tokens": 16, "temperature": 0,
                           "messages": [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Say hi (0)."}]}).encode()
        scope = {"type": "http", "method": "POST", "path": "/v1/chat/completions",
                 "headers": [(b"authorization", f"Bearer {key}".encode()), (b"content-type", b"application/json"),
                             (b"content-length", str(len(body)).encode())]}
        sent: list[dict] = []

        async def receive() -> dict:
            return {"type": "http.request", "body": body, "more_body": False}

        async def send(message: dict) -> None:
            sent.append(message)

        for _ in range(500):  # warm-up
            sent.clear()
            await forwarder.handle(scope, receive, send, "/v1/chat/completions")
        if sent[0].get("status") != 200:
            raise RuntimeError(f"the router did not answer 200: {sent[:2]}")
        start = time.process_time()
        for _ in range(requests):
            sent.clear()
            await forwarder.handle(scope, receive, send, "/v1/chat/completions")
        out["stream_us" if stream else "plain_us"] = round((time.process_time() - start) / requests * 1e6, 2)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=6000)
    print(json.dumps(asyncio.run(measure(parser.parse_args().requests))))


if __name__ == "__main__":
    main()
