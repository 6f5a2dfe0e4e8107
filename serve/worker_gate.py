"""The worker gate: a small authenticating reverse proxy in front of a vLLM worker's private socket.

vLLM's own `--api-key` guards only `/v1`, `/v2`, `/inference` and `/cohere`: its SageMaker routes (`POST
/invocations`, and `/adapters` with runtime LoRA updates on), `/metrics`, `/tokenize`, `/docs` and the rest answer
anyone. So the worker the appliance starts keeps vLLM on a Unix socket in a private folder (`--uds`), and the gate
listens on the worker's address instead. It forwards:

- `/v1/*`: only with `Authorization: Bearer <worker key>` (compared in constant time), the request and its answer
  passed through unchanged, a stream chunk by chunk. The key stays on the request, so vLLM checks it too.
- `GET /health`: without a key, status only (supervisors and the router's health probe use it).

Everything else answers 404, and `/v1/*` without the key 401, in OpenAI's error shape. A path that is not plain
(`..`, `//`, percent-encoding, a backslash) is refused too, so nothing reaches vLLM under another spelling. A client
that disconnects cancels its handler, which closes the upstream connection (vLLM aborts the generation).

`WorkerGate` is the asyncio server; `GateThread` runs one in a thread of its own (the `appliance worker` process);
`python -m serve.worker_gate --listen HOST:PORT --upstream unix:PATH` runs one as a process (key in
`WORKER_GATE_API_KEY`).
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import hmac
import json
import logging
import os
import re
import threading
from typing import Any

from aiohttp import ClientError, ClientSession, ClientTimeout, TCPConnector, UnixConnector, web
from aiohttp.web_request import BaseRequest
from multidict import CIMultiDict

logger = logging.getLogger(__name__)

MAX_BODY_BYTES = 64 * 1024 * 1024  # far above any request the router forwards (serve.max_body_bytes: 1 MiB)
_SAFE_V1_PATH = re.compile(r"^/v1/[A-Za-z0-9_\-.:~/]*$")
# Hop-by-hop headers (RFC 9110 7.6.1) and those the gate's own HTTP stack writes; none are passed through.
_HOP = frozenset({"connection", "keep-alive", "proxy-connection", "proxy-authenticate", "proxy-authorization", "te",
                  "trailer", "transfer-encoding", "upgrade", "host", "content-length"})
_HOP_OUT = _HOP | {"date", "server"}


def error_response(status: int, message: str) -> web.Response:
    """An OpenAI-style error answer."""
    kind = {401: "authentication_error", 404: "not_found_error", 413: "invalid_request_error"}.get(status, "api_error")
    body = json.dumps({"error": {"message": message, "type": kind, "param": None, "code": status}}).encode()
    return web.Response(status=status, body=body, content_type="application/json")


def plain_v1_path(path: str) -> bool:
    """Whether `path` (raw, without the query) is `/v1/...` spelled plainly: no `..` or `.` segment, no `//`, no
    percent-encoding or backslash (so the path vLLM routes is the path the gate checked)."""
    return (_SAFE_V1_PATH.match(path) is not None and "//" not in path
            and not any(seg in (".", "..") for seg in path.split("/")))


class WorkerGate:
    """The gate's request handling and server (one event loop).

    Args:
        upstream: where vLLM listens: `unix:/path/to/socket` or `http://127.0.0.1:PORT`.
        api_key: the worker's key; None only on a loopback worker without one (then paths are filtered, not callers).
        max_body_bytes: largest request body accepted.
    """

    def __init__(self, upstream: str, api_key: str | None, *, max_body_bytes: int = MAX_BODY_BYTES):
        if upstream.startswith("unix:"):
            self._socket_path: str | None = upstream[len("unix:"):]
            self._base = "http://localhost"
        elif upstream.startswith("http://"):
            self._socket_path = None
            self._base = upstream.rstrip("/")
        else:
            raise ValueError(f"the gate's upstream must be unix:PATH or http://HOST:PORT, not {upstream!r}")
        self._digest = hashlib.sha256(api_key.encode()).digest() if api_key else None
        self._max_body = max_body_bytes
        self._session: ClientSession | None = None
        self._server: asyncio.AbstractServer | None = None
        self._web: web.Server | None = None
        self.port: int | None = None

    # -- the server --
    async def start(self, host: str, port: int) -> int:
        """Listen on `host:port` (0: any free port); returns the port bound."""
        connector = UnixConnector(self._socket_path, limit=0) if self._socket_path else TCPConnector(limit=0)
        self._session = ClientSession(connector=connector, auto_decompress=False, skip_auto_headers=("User-Agent",),
                                      timeout=ClientTimeout(total=None, sock_connect=10))
        self._web = web.Server(self.handle, request_factory=self._request, handler_cancellation=True, access_log=None)
        self._server = await asyncio.get_running_loop().create_server(self._web, host, port, reuse_address=True)
        self.port = self._server.sockets[0].getsockname()[1]
        logger.info("worker gate listening on %s:%d", host, self.port)
        return self.port

    async def stop(self) -> None:
        """Stop listening, end open connections and close the upstream pool."""
        if self._server is not None:
            self._server.close()
            if self._web is not None:
                await self._web.shutdown(1.0)
            await self._server.wait_closed()
        if self._session is not None:
            await self._session.close()

    def _request(self, message, payload, protocol, writer, task) -> BaseRequest:
        return BaseRequest(message, payload, protocol, writer, task, asyncio.get_running_loop(), client_max_size=self._max_body)

    # -- requests --
    def authorised(self, header: str | None) -> bool:
        """Whether an `Authorization` header carries the worker's key (constant time; always True without a key)."""
        if self._digest is None:
            return True
        scheme, _, token = (header or "").partition(" ")
        presented = hashlib.sha256(token.strip().encode("utf-8", "surrogateescape")).digest()
        return hmac.compare_digest(presented, self._digest) and scheme.lower() == "bearer"

    async def handle(self, request: BaseRequest) -> web.StreamResponse:
        """Route one request: `/health`, an authorised `/v1/*`, or a refusal."""
        raw = request.raw_path
        path = raw.partition("?")[0]
        if path == "/health" and request.method in ("GET", "HEAD"):
            return await self._health()
        if not path.startswith("/v1/"):
            return error_response(404, "not found: this worker serves only /v1/* (with its API key) and /health")
        if not plain_v1_path(path):
            return error_response(404, "not found: the path must be plain (no '..', '//', '%' or '\\')")
        if not self.authorised(request.headers.get("Authorization")):
            return error_response(401, "missing or invalid worker API key: send `Authorization: Bearer <key>`")
        return await self._forward(request, raw)

    async def _health(self) -> web.Response:
        try:
            async with self._session.get(self._base + "/health", timeout=ClientTimeout(total=10)) as resp:
                return web.Response(status=resp.status)
        except (ClientError, asyncio.TimeoutError, OSError):
            return web.Response(status=503)

    async def _forward(self, request: BaseRequest, raw: str) -> web.StreamResponse:
        try:
            body = await request.read()
        except web.HTTPRequestEntityTooLarge:
            return error_response(413, f"request body exceeds the worker gate's limit of {self._max_body} bytes")
        headers = CIMultiDict((k, v) for k, v in request.headers.items() if k.lower() not in _HOP)
        try:
            resp = await self._session.request(request.method, self._base + raw, data=body or None, headers=headers)
        except (ClientError, asyncio.TimeoutError, OSError) as exc:
            logger.warning("the gate could not reach vLLM: %s", type(exc).__name__)
            return error_response(502, "the model server behind this worker's gate did not answer")
        try:
            out = CIMultiDict((k, v) for k, v in resp.headers.items() if k.lower() not in _HOP_OUT)
            if "content-length" in resp.headers and request.method != "HEAD":
                answer = web.Response(status=resp.status, body=await resp.read(), headers=out)
                resp.release()
                return answer
            stream = web.StreamResponse(status=resp.status, headers=out)
            await stream.prepare(request)
            try:
                async for chunk in resp.content.iter_any():
                    await stream.write(chunk)
            except (ClientError, asyncio.TimeoutError) as exc:  # vLLM broke mid-stream: so does the gate's answer
                logger.warning("stream from vLLM broke: %s", type(exc).__name__)
                if request.transport is not None:
                    request.transport.abort()
                return stream
            await stream.write_eof()
            resp.release()
            return stream
        finally:
            resp.close()  # a no-op once released; otherwise (error, cancelled: the client left) vLLM aborts the request


class GateThread:
    """A `WorkerGate` serving in a daemon thread with its own event loop (uvloop when installed)."""

    def __init__(self, upstream: str, api_key: str | None, host: str, port: int):
        self.gate = WorkerGate(upstream, api_key)
        self.host, self.requested_port = host, port
        self.port: int | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None

    def start(self) -> "GateThread":
        """Start serving; returns once the port is bound.

        Raises:
            OSError: the address cannot be bound (in use, not local).
        """
        self._thread = threading.Thread(target=self._run, name="worker-gate", daemon=True)
        self._thread.start()
        self._ready.wait()
        if self._error is not None:
            raise self._error
        return self

    def _run(self) -> None:
        try:
            import uvloop

            loop = uvloop.new_event_loop()
        except ImportError:  # pragma: no cover
            loop = asyncio.new_event_loop()
        self._loop = loop
        asyncio.set_event_loop(loop)
        try:
            self.port = loop.run_until_complete(self.gate.start(self.host, self.requested_port))
        except BaseException as exc:  # handed to start()
            self._error = exc
            self._ready.set()
            loop.close()
            return
        self._ready.set()
        try:
            loop.run_forever()
        finally:
            loop.run_until_complete(self.gate.stop())
            loop.close()

    def stop(self) -> None:
        """Stop serving and wait for the thread (idempotent)."""
        if self._loop is not None and self._thread is not None and self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)


def main(argv: list[str] | None = None) -> None:
    """Run a gate as its own process until interrupted."""
    parser = argparse.ArgumentParser(description="An authenticating gate in front of a vLLM worker (key in $WORKER_GATE_API_KEY).")
    parser.add_argument("--listen", required=True, help="HOST:PORT to listen on.")
    parser.add_argument("--upstream", required=True, help="unix:PATH or http://127.0.0.1:PORT of vLLM.")
    args = parser.parse_args(argv)
    host, _, port = args.listen.rpartition(":")
    key = os.environ.get("WORKER_GATE_API_KEY") or None
    try:
        import uvloop

        runner: Any = uvloop.run
    except ImportError:  # pragma: no cover
        runner = asyncio.run

    async def serve() -> None:
        gate = WorkerGate(args.upstream, key)
        await gate.start(host.strip("[]"), int(port))
        try:
            await asyncio.Event().wait()
        finally:
            await gate.stop()

    runner(serve())


if __name__ == "__main__":
    main()
