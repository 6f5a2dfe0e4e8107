"""The worker gate: a small authenticating reverse proxy in front of a vLLM worker's private socket.

vLLM's own `--api-key` guards only `/v1`, `/v2`, `/inference` and `/cohere`: its SageMaker routes (`POST
/invocations`, and `/adapters` with runtime LoRA updates on), `/metrics`, `/tokenize`, `/docs` and the rest answer
anyone. So the worker the appliance starts keeps vLLM on a Unix socket in a private folder (`--uds`), and the gate
listens on the worker's address instead. It forwards:

- `/v1/*`: only with `Authorization: Bearer <worker key>` (compared in constant time), the request and its answer
  passed through unchanged, a stream chunk by chunk. The key stays on the request, so vLLM checks it too.
- `GET /health`: without a key (supervisors and the router's health probe use it; vLLM answers it with no body).

Everything else answers 404, and `/v1/*` without the key 401, in OpenAI's error shape. A path that is not plain
(`..`, `//`, percent-encoding, a backslash) is refused too, so nothing reaches vLLM under another spelling. A client
that disconnects closes its connection to vLLM (vLLM aborts the generation). It is raw asyncio with httptools'
parser (the cost per request is a few tens of microseconds: bench/worker_gate.py).

`WorkerGate` is the asyncio server; `GateThread` runs one in a thread of its own (the `appliance worker` process);
`python -m fedllm.serve.worker_gate --listen HOST:PORT --upstream unix:PATH` runs one as a process (key in
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
import time
from typing import Any

import httptools

logger = logging.getLogger(__name__)

MAX_BODY_BYTES = 64 * 1024 * 1024  # far above any request the router forwards (serve.max_body_bytes: 1 MiB)
IDLE_REUSE_S = 4.0  # an idle connection to vLLM older than this is not reused (uvicorn closes them after 5 s)
MAX_IDLE = 256  # idle connections to vLLM kept for reuse
MAX_HEAD_BYTES = 64 * 1024  # largest request line plus headers
CLIENT_IDLE_S = 75.0  # a caller's connection without a whole request for this long is closed (slow or idle callers)
_SAFE_V1_PATH = re.compile(r"^/v1/[A-Za-z0-9_\-.:~/]*$")
# Request headers not passed on (hop-by-hop, RFC 9110 7.6.1, and those the gate writes itself).
_DROPPED = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
        b"content-length",
        b"expect",
    }
)


def _error_bytes(status: int, message: str, close: bool = False) -> bytes:
    """A whole OpenAI-style error answer."""
    kind = {401: "authentication_error", 404: "not_found_error", 413: "invalid_request_error"}.get(status, "api_error")
    reason = {
        400: "Bad Request",
        401: "Unauthorized",
        404: "Not Found",
        413: "Payload Too Large",
        502: "Bad Gateway",
        503: "Service Unavailable",
    }[status]
    body = json.dumps({"error": {"message": message, "type": kind, "param": None, "code": status}}).encode()
    return (
        f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\ncontent-length: {len(body)}\r\n"
        f"connection: {'close' if close else 'keep-alive'}\r\n\r\n"
    ).encode() + body


_NOT_FOUND = _error_bytes(404, "not found: this worker serves only /v1/* (with its API key) and GET /health")
_NOT_PLAIN = _error_bytes(404, "not found: the path must be plain (no '..', '//', '%' or a backslash)")
_UNAUTHORIZED = _error_bytes(401, "missing or invalid worker API key: send `Authorization: Bearer <key>`")
_BAD_GATEWAY = _error_bytes(502, "the model server behind this worker's gate did not answer", close=True)
_DOWN = _error_bytes(503, "the model server behind this worker's gate is not running", close=True)  # for /health


def plain_v1_path(path: str) -> bool:
    """Whether `path` (raw, without the query) is `/v1/...` spelled plainly: no `..` or `.` segment, no `//`, no
    percent-encoding or backslash (so the path vLLM routes is the path the gate checked)."""
    return (
        _SAFE_V1_PATH.match(path) is not None
        and "//" not in path
        and not any(seg in (".", "..") for seg in path.split("/"))
    )


class WorkerGate:
    """The gate: an HTTP/1.1 server (asyncio protocols, httptools parsing) that relays allowed requests to vLLM over a
    pool of kept-alive connections. The request head is rebuilt from what was parsed (hop-by-hop headers dropped,
    the body whole with its length); the answer is relayed byte for byte as it arrives (a stream's chunks, SSE).

    Args:
        upstream: where vLLM listens: `unix:/path/to/socket` or `http://127.0.0.1:PORT`.
        api_key: the worker's key; None only on a loopback worker without one (then paths are filtered, not callers).
        max_body_bytes: largest request body accepted.
        client_idle_s: a caller's connection that sends no whole request for this long is closed (not while its
            answer is being relayed).
    """

    def __init__(
        self,
        upstream: str,
        api_key: str | None,
        *,
        max_body_bytes: int = MAX_BODY_BYTES,
        client_idle_s: float = CLIENT_IDLE_S,
    ):
        if upstream.startswith("unix:"):
            self._socket_path: str | None = upstream[len("unix:") :]
            self._address: tuple[str, int] | None = None
        elif upstream.startswith("http://"):
            host, _, port = upstream[len("http://") :].rstrip("/").rpartition(":")
            self._socket_path, self._address = None, (host.strip("[]"), int(port))
        else:
            raise ValueError(f"the gate's upstream must be unix:PATH or http://HOST:PORT, not {upstream!r}")
        self._digest = hashlib.sha256(api_key.encode()).digest() if api_key else None
        self.max_body = max_body_bytes
        self.client_idle_s = client_idle_s
        self._idle: list[_Upstream] = []
        self._clients: set[_Client] = set()
        self._server: asyncio.AbstractServer | None = None
        self.port: int | None = None

    # -- the server --
    async def start(self, host: str, port: int) -> int:
        """Listen on `host:port` (0: any free port); returns the port bound."""
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(lambda: _Client(self), host, port, reuse_address=True)
        self.port = self._server.sockets[0].getsockname()[1]
        logger.info("worker gate listening on %s:%d", host, self.port)
        return self.port

    async def stop(self) -> None:
        """Stop listening and close every connection."""
        if self._server is not None:
            self._server.close()
        for client in list(self._clients):
            client.transport.abort()
        for upstream in self._idle:
            upstream.transport.abort()
        self._idle.clear()
        if self._server is not None:
            await self._server.wait_closed()

    # -- decisions --
    def authorised(self, header: bytes | None) -> bool:
        """Whether an `Authorization` header carries the worker's key (constant time; always True without a key)."""
        if self._digest is None:
            return True
        scheme, _, token = (header or b"").partition(b" ")
        return hmac.compare_digest(hashlib.sha256(token.strip()).digest(), self._digest) and scheme.lower() == b"bearer"

    def verdict(self, method: bytes, url: bytes, auth: bytes | None) -> bytes | None:
        """The refusal to answer, or None to forward."""
        path = url.partition(b"?")[0]
        if path == b"/health":
            return None if method == b"GET" else _NOT_FOUND
        if not path.startswith(b"/v1/"):
            return _NOT_FOUND
        try:
            plain = plain_v1_path(path.decode("ascii"))
        except UnicodeDecodeError:
            plain = False
        if not plain or method in (b"HEAD", b"CONNECT"):
            return _NOT_PLAIN
        return None if self.authorised(auth) else _UNAUTHORIZED

    # -- connections to vLLM --
    def take_idle(self) -> _Upstream | None:
        """A kept-alive connection to vLLM that is young enough to reuse, or None."""
        now = time.monotonic()
        while self._idle:
            upstream = self._idle.pop()
            if not upstream.closed and now - upstream.idle_since < IDLE_REUSE_S:
                return upstream
            upstream.transport.close()
        return None

    def put_idle(self, upstream: _Upstream) -> None:
        if len(self._idle) < MAX_IDLE and not upstream.closed:
            upstream.idle_since = time.monotonic()
            self._idle.append(upstream)
        else:
            upstream.transport.close()

    def forget(self, upstream: _Upstream) -> None:
        if upstream in self._idle:
            self._idle.remove(upstream)

    async def connect(self) -> _Upstream:
        """A new connection to vLLM."""
        loop = asyncio.get_running_loop()
        if self._socket_path is not None:
            _, upstream = await loop.create_unix_connection(lambda: _Upstream(self), self._socket_path)
        else:
            assert self._address is not None  # __init__ sets the one or the other
            _, upstream = await loop.create_connection(lambda: _Upstream(self), *self._address)
        return upstream


class _Upstream(asyncio.Protocol):
    """One connection to vLLM; relays the answer to the request it carries, byte for byte, to that request's client."""

    def __init__(self, gate: WorkerGate):
        self.gate = gate
        self.transport: asyncio.Transport  # set by connection_made, which asyncio calls before any other callback
        self.client: _Client | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.idle_since = 0.0
        self.closed = False
        self.answered = False  # whether any byte of the current answer came

    def connection_made(self, transport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        client = self.client
        if client is None:  # nothing was asked: vLLM would not; drop the connection
            self.transport.abort()
            return
        self.answered = True
        client.transport.write(data)
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            client.transport.abort()
            self.transport.abort()

    def on_message_complete(self) -> None:
        client, self.client = self.client, None
        keep = self.parser.should_keep_alive()
        if client is not None:
            client.answered(keep)
        if keep:
            self.gate.put_idle(self)
        else:
            self.transport.close()

    def connection_lost(self, exc) -> None:
        self.closed = True
        self.gate.forget(self)
        client, self.client = self.client, None
        if client is not None:
            client.upstream_lost(self.answered)

    def pause_writing(self) -> None:  # vLLM reads slowly: stop reading the client
        if self.client is not None:
            self.client.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.client is not None:
            self.client.transport.resume_reading()


class _Client(asyncio.Protocol):
    """One connection from a caller: parses requests one at a time, refuses or forwards each."""

    def __init__(self, gate: WorkerGate):
        self.gate = gate
        self.transport: asyncio.Transport  # set by connection_made, which asyncio calls before any other callback
        self.parser = httptools.HttpRequestParser(self)
        self.upstream: _Upstream | None = None
        self.busy = False
        self._timer: asyncio.TimerHandle | None = None
        self._reset()

    def _arm(self) -> None:
        """Close the connection unless a whole request arrives within `client_idle_s`."""
        self._timer = asyncio.get_running_loop().call_later(self.gate.client_idle_s, self.transport.close)

    def _disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _reset(self) -> None:
        self.url = b""
        self.headers: list[bytes] = []
        self.auth: bytes | None = None
        self.body: list[bytes] = []
        self.size = 0
        self.refusal: bytes | None = None
        self.head_size = 0

    # -- the connection --
    def connection_made(self, transport) -> None:
        self.transport = transport
        self.gate._clients.add(self)
        self._arm()

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self.transport.write(_error_bytes(400, "protocol upgrades are not served here", close=True))
            self.transport.close()
        except httptools.HttpParserError:
            self.transport.write(_error_bytes(400, "malformed HTTP request", close=True))
            self.transport.close()

    def connection_lost(self, exc) -> None:
        self._disarm()
        self.gate._clients.discard(self)
        upstream, self.upstream = self.upstream, None
        if upstream is not None:  # the caller left mid-answer: vLLM sees the disconnect and aborts the request
            upstream.client = None
            upstream.transport.abort()

    def pause_writing(self) -> None:  # the caller reads slowly: stop reading vLLM
        if self.upstream is not None:
            self.upstream.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.upstream is not None:
            self.upstream.transport.resume_reading()

    # -- httptools callbacks --
    def on_message_begin(self) -> None:
        if self.busy:  # a pipelined request: the router never sends one
            self.transport.abort()
        self._reset()

    def on_url(self, url: bytes) -> None:
        self.url += url
        self.head_size += len(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self.head_size += len(name) + len(value)
        if self.head_size > MAX_HEAD_BYTES:
            raise httptools.HttpParserError("request head too large")
        lower = name.lower()
        if lower == b"authorization":
            self.auth = value
        if lower not in _DROPPED and lower != b"host":
            self.headers.append(name + b": " + value + b"\r\n")

    def on_headers_complete(self) -> None:
        if self.head_size > MAX_HEAD_BYTES:
            raise httptools.HttpParserError("request head too large")
        self.refusal = self.gate.verdict(self.parser.get_method(), self.url, self.auth)

    def on_body(self, body: bytes) -> None:
        if self.refusal is None:
            self.size += len(body)
            if self.size > self.gate.max_body:
                self.refusal = _error_bytes(
                    413, f"request body exceeds the worker gate's limit of {self.gate.max_body} bytes", close=True
                )
                self.body = []
            else:
                self.body.append(body)

    def on_message_complete(self) -> None:
        self._disarm()
        if self.refusal is not None:
            self.transport.write(self.refusal)
            if not self.parser.should_keep_alive() or b"\r\nconnection: close\r\n" in self.refusal:
                self.transport.close()
            else:
                self._arm()
            return
        self.busy = True
        self.keep_alive = self.parser.should_keep_alive()
        body = b"".join(self.body)
        self.request = b"".join(
            [
                self.parser.get_method(),
                b" ",
                self.url,
                b" HTTP/1.1\r\nhost: localhost\r\n",
                *self.headers,
                b"content-length: %d\r\n\r\n" % len(body),
                body,
            ]
        )
        self.retried = False
        upstream = self.gate.take_idle()
        if upstream is not None:
            self._send(upstream)
        else:
            asyncio.ensure_future(self._connect_and_send())

    # -- forwarding --
    def _send(self, upstream: _Upstream) -> None:
        if self.transport.is_closing():  # the caller left while the connection was made
            self.gate.put_idle(upstream)
            return
        self.upstream = upstream
        upstream.client = self
        upstream.answered = False
        upstream.transport.write(self.request)

    async def _connect_and_send(self) -> None:
        try:
            upstream = await self.gate.connect()
        except OSError as exc:
            logger.warning("the gate could not reach vLLM: %s", type(exc).__name__)
            self.busy = False
            if not self.transport.is_closing():
                self.transport.write(_DOWN if self.url.startswith(b"/health") else _BAD_GATEWAY)
                self.transport.close()
            return
        self._send(upstream)

    def answered(self, upstream_keeps_alive: bool) -> None:
        """The whole answer was relayed."""
        self.upstream = None
        self.busy = False
        self.request = b""
        if not (upstream_keeps_alive and self.keep_alive):
            self.transport.close()
        else:
            self._arm()

    def upstream_lost(self, answered: bool) -> None:
        """vLLM's connection closed before the answer was complete."""
        self.upstream = None
        if not answered and not self.retried:  # a kept-alive connection closed as it was reused: once more, fresh
            self.retried = True
            asyncio.ensure_future(self._connect_and_send())
            return
        self.busy = False
        if answered:  # part of the answer is out: the caller must see it broken, not complete
            self.transport.abort()
        elif not self.transport.is_closing():
            self.transport.write(_BAD_GATEWAY)
            self.transport.close()


class GateThread:
    """A `WorkerGate` serving in a daemon thread with its own event loop (uvloop when installed)."""

    def __init__(self, upstream: str, api_key: str | None, host: str, port: int, **options: Any):
        self.gate = WorkerGate(upstream, api_key, **options)
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

            loop: asyncio.AbstractEventLoop = uvloop.new_event_loop()
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
    parser = argparse.ArgumentParser(
        description="An authenticating gate in front of a vLLM worker (key in $WORKER_GATE_API_KEY)."
    )
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
