"""ZeroMQ transport: a ROUTER at the coordinator, a DEALER at each silo (outbound connections only).

CURVE encryption and authentication are on by default: the coordinator runs a ZAP handler that accepts only
enrolled silo public keys at connect, and every message carries the sender's public key (as its ZeroMQ User-Id),
so the coordinator checks each message against the current enrolment and a silo cannot claim another's name. Plaintext
exists for tests and must be asked for (`plaintext=True`). The socket enforces `max_message_bytes` (ZMQ_MAXMSGSIZE) and
a bounded receive queue (ZMQ_RCVHWM); ZMTP heartbeats detect dead peers; DEALERs reconnect on their own.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any, Callable

from fedllm.core.errors import ConfigError
from fedllm.federation.wire.keys import KeyPair

logger = logging.getLogger(__name__)

Lookup = Callable[[str], "str | None"]  # z85 public key -> enrolled silo name, or None


@dataclass
class Incoming:
    """One message received by the coordinator."""

    peer: bytes  # ZeroMQ routing id of the sending connection
    public_key: str | None  # the sender's z85 CURVE public key (from the handshake), None in plaintext mode
    frames: list[bytes]
    received_at: float = 0.0  # time.time() when the transport had the whole message (round timings)


def _common_options(
    sock, max_message_bytes: int, heartbeat_s: float, heartbeat_timeout_s: float | None, receive_hwm: int = 1000
) -> None:
    import zmq

    # ZeroMQ counts only whole messages as a sign of life, so the timeout must outlast the longest single transfer
    # (an adapter on a slow link); fedllm.federation.runtime.timing.connection_timeout_s sizes it.
    timeout_ms = int((heartbeat_timeout_s or 3 * heartbeat_s) * 1000)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.MAXMSGSIZE, max_message_bytes)
    sock.setsockopt(zmq.RCVHWM, receive_hwm)
    sock.setsockopt(zmq.HEARTBEAT_IVL, int(heartbeat_s * 1000))
    sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, timeout_ms)
    sock.setsockopt(zmq.HEARTBEAT_TTL, timeout_ms)


class ServerTransport:
    """The coordinator's ROUTER socket.

    Args:
        endpoint: e.g. `tcp://0.0.0.0:5555`, `tcp://127.0.0.1:0` (any free port) or `ipc:///path`.
        keypair: the coordinator's CURVE key pair; None means plaintext, which needs `plaintext=True`.
        lookup: maps a client's z85 public key to its enrolled silo name (None = refuse). Read on every handshake,
            so silos enrolled while the coordinator runs are admitted without a restart.
        plaintext: explicitly allow running without encryption and authentication.
        max_message_bytes: largest message the socket accepts; bigger ones drop the connection.
        heartbeat_s: ZMTP heartbeat interval.
        heartbeat_timeout_s: a connection that brings no whole message for this long is dropped (default 3 heartbeats).
        receive_hwm: messages ZeroMQ queues for reading before it stops reading from the peers (ZMQ_RCVHWM).
    """

    def __init__(
        self,
        endpoint: str,
        *,
        keypair: KeyPair | None,
        lookup: Lookup | None = None,
        plaintext: bool = False,
        max_message_bytes: int = 256 << 20,
        heartbeat_s: float = 5.0,
        heartbeat_timeout_s: float | None = None,
        receive_hwm: int = 64,
    ) -> None:
        if keypair is None and not plaintext:
            raise ConfigError(
                "the coordinator needs a CURVE key pair (run `appliance federation init`) or plaintext=True"
            )
        if keypair is not None and lookup is None:
            raise ConfigError("CURVE mode needs a lookup of enrolled silo keys")
        self.endpoint, self.keypair, self.lookup = endpoint, keypair, lookup
        self.max_message_bytes, self.heartbeat_s, self.heartbeat_timeout_s = (
            max_message_bytes,
            heartbeat_s,
            heartbeat_timeout_s,
        )
        self.receive_hwm = receive_hwm
        # zmq is imported when the socket opens (the base install has no zmq): typed loosely until then
        self._ctx: Any = None
        self._sock: Any = None
        self._auth: Any = None
        self.address: str | None = None

    async def start(self) -> str:
        """Bind and (in CURVE mode) start the ZAP handler; returns the bound address."""
        import zmq
        import zmq.asyncio

        self._ctx = zmq.asyncio.Context()
        if self.keypair is not None:
            assert self.lookup is not None  # the constructor refuses CURVE without a lookup
            self._auth = _make_authenticator(self._ctx, self.lookup)
            self._auth.start()
        sock = self._ctx.socket(zmq.ROUTER)
        _common_options(sock, self.max_message_bytes, self.heartbeat_s, self.heartbeat_timeout_s, self.receive_hwm)
        sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
        if self.keypair is not None:
            sock.curve_server = True
            sock.curve_secretkey = self.keypair.secret.encode("ascii")
            sock.curve_publickey = self.keypair.public.encode("ascii")
            sock.zap_domain = b"federation"
        sock.bind(self.endpoint)
        self._sock = sock
        self.address = sock.getsockopt_string(zmq.LAST_ENDPOINT)
        logger.info(
            "coordinator socket bound at %s (%s)", self.address, "plaintext" if self.keypair is None else "CURVE"
        )
        return self.address

    @property
    def socket(self) -> Any:
        """The bound ZeroMQ ROUTER socket (None before `start` and after `close`)."""
        return self._sock

    async def recv(self) -> Incoming:
        """The next message (routing id, authenticated silo name, frames)."""
        import zmq

        parts = await self._sock.recv_multipart(copy=False)
        public_key = None
        if self.keypair is not None:
            try:
                public_key = parts[-1].get("User-Id") or None
            except zmq.ZMQError:
                public_key = None
        return Incoming(bytes(parts[0].bytes), public_key, [p.bytes for p in parts[1:]], time.time())

    async def send(self, peer: bytes, frames: list[bytes]) -> bool:
        """Send to one connection; False (and a log line) if that peer is gone."""
        import zmq

        try:
            await self._sock.send_multipart([peer, *frames])
            return True
        except zmq.ZMQError as exc:
            logger.warning("could not send to peer %s: %s", peer.hex()[:12], exc)
            return False

    def close(self) -> None:
        """Close the socket, stop the ZAP handler and the context."""
        if self._sock is not None:
            self._sock.close(0)
            self._sock = None
        if self._auth is not None:
            self._auth.stop()
            self._auth = None
        if self._ctx is not None:
            self._ctx.term()
            self._ctx = None


def check_plaintext_endpoint(endpoint: str, plaintext: bool, what: str) -> None:
    """Refuse plaintext federation beyond loopback: without CURVE, anyone on the network could be a silo or read
    updates.

    Raises:
        ConfigError: `plaintext` with a tcp endpoint whose host is not a loopback address.
    """
    from urllib.parse import urlsplit

    from fedllm.core.net import is_loopback

    if not plaintext or not endpoint.startswith("tcp://"):
        return  # CURVE, or ipc:// / inproc:// (local by nature)
    host = (urlsplit(endpoint).hostname or "").strip("[]")
    if not is_loopback(host):
        raise ConfigError(
            f"federation.plaintext (--plaintext) cannot {what} {endpoint}: plaintext is for tests on "
            f"loopback (127.0.0.1) only; beyond it, use CURVE (`appliance federation init` and enrolment)"
        )


def _make_authenticator(ctx, lookup: Lookup):
    from zmq.auth.asyncio import AsyncioAuthenticator
    from zmq.utils import z85

    class _Provider:
        def callback(self, domain: str, key: bytes) -> bool:
            name = lookup(key.decode("ascii"))
            if name is None:
                logger.warning("refused a connection from an unenrolled CURVE key %s...", key.decode("ascii")[:8])
            return name is not None

    class _SiloAuthenticator(AsyncioAuthenticator):
        def curve_user_id(self, client_public_key: bytes) -> str:
            # The key itself, not the name: the coordinator resolves it against the enrolment on every message.
            return z85.encode(client_public_key).decode("ascii")

    auth = _SiloAuthenticator(ctx, log=logging.getLogger(__name__ + ".zap"))
    auth.configure_curve_callback("federation", _Provider())
    return auth


class ClientTransport:
    """A silo's DEALER socket: connects out to the coordinator and reconnects by itself.

    Args:
        endpoint: the coordinator's address, e.g. `tcp://host:5555`.
        server_key: the coordinator's z85 CURVE public key; None means plaintext, which needs `plaintext=True`.
        keypair: this silo's CURVE key pair (required with `server_key`).
        heartbeat_s, heartbeat_timeout_s: as for `ServerTransport`.
    """

    def __init__(
        self,
        endpoint: str,
        *,
        server_key: str | None,
        keypair: KeyPair | None,
        plaintext: bool = False,
        max_message_bytes: int = 256 << 20,
        heartbeat_s: float = 5.0,
        heartbeat_timeout_s: float | None = None,
    ) -> None:
        if server_key is None and not plaintext:
            raise ConfigError("a silo needs the coordinator's public key (--coordinator-key) or plaintext=True")
        if server_key is not None and keypair is None:
            raise ConfigError("a silo needs its own key pair (run `appliance silo keygen`)")
        self.endpoint, self.server_key, self.keypair = endpoint, server_key, keypair
        self.max_message_bytes, self.heartbeat_s, self.heartbeat_timeout_s = (
            max_message_bytes,
            heartbeat_s,
            heartbeat_timeout_s,
        )
        self._ctx: Any = None
        self._sock: Any = None
        self._monitor: Any = None

    def connect(self) -> None:
        """Create the socket and start connecting (returns at once; ZeroMQ connects and reconnects in the
        background)."""
        import zmq
        import zmq.asyncio

        self._ctx = zmq.asyncio.Context()
        sock = self._ctx.socket(zmq.DEALER)
        _common_options(sock, self.max_message_bytes, self.heartbeat_s, self.heartbeat_timeout_s)
        sock.setsockopt(zmq.RECONNECT_IVL, 200)
        sock.setsockopt(zmq.RECONNECT_IVL_MAX, 5000)
        if self.server_key is not None:
            assert self.keypair is not None  # the constructor refuses a server key without a key pair
            sock.curve_serverkey = self.server_key.encode("ascii")
            sock.curve_publickey = self.keypair.public.encode("ascii")
            sock.curve_secretkey = self.keypair.secret.encode("ascii")
            # Watch the handshakes from the first one on: a refused key is otherwise silent (ZeroMQ just retries).
            self._monitor = sock.get_monitor_socket(zmq.EVENT_HANDSHAKE_FAILED_AUTH)
        sock.connect(self.endpoint)
        self._sock = sock

    async def wait_refused(self) -> str:
        """Wait until the coordinator refuses this silo's key in the CURVE handshake (never returns in plaintext).

        Returns:
            What the handshake reported, e.g. `authentication refused (ZAP status 400)`.
        """
        import asyncio

        import zmq
        from zmq.utils.monitor import parse_monitor_message

        if self._monitor is None:
            await asyncio.Event().wait()  # plaintext: there is no authentication to fail
        while True:
            event = parse_monitor_message(await self._monitor.recv_multipart())
            if event["event"] == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
                return f"authentication refused (ZAP status {event['value']})"

    async def send(self, frames: list[bytes]) -> None:
        """Queue a message for the coordinator (held while disconnected)."""
        await self._sock.send_multipart(frames)

    async def recv(self, timeout_s: float | None = None) -> list[bytes] | None:
        """The next message, or None after `timeout_s`."""
        import zmq

        if timeout_s is not None and not await self._sock.poll(int(timeout_s * 1000), zmq.POLLIN):
            return None
        return [bytes(f) for f in await self._sock.recv_multipart()]

    def close(self) -> None:
        """Close the socket and its context."""
        if self._monitor is not None:
            self._sock.disable_monitor()
            self._monitor.close(0)
            self._monitor = None
        if self._sock is not None:
            self._sock.close(0)
            self._sock = None
        if self._ctx is not None:
            self._ctx.term()
            self._ctx = None
