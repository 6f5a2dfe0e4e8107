"""A userspace WAN link: an asyncio TCP relay that adds one-way delay, jitter and a bandwidth cap, and can be cut.

The kernels here have no `netem` qdisc, so delay and cuts cannot come from `tc`. A `Link` listens on one address and
relays every connection it accepts to a fixed target. Each chunk read from one side is released to the other side
`delay` (+ jitter) after the link finished "serialising" it at the capped rate; both directions of all connections
of one link share one `Shaper` per direction, as packets share a real link. Order is never changed (a FIFO link).

`cut()` resets every open connection (TCP RST to both ends) and stops listening, so new connects are refused until
`restore()`. `reset_connections()` resets the open connections but keeps accepting (a flapping NAT or proxy).
`drop(direction)` silently discards one direction's bytes (a message lost on the way, e.g. a final BYE).

Sockets come from a `socket_factory`, so the relay can listen and connect inside a network namespace (see
`fedllm.testbed.netns`) while running in an ordinary asyncio loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import re
import socket
import struct
import time
from dataclasses import dataclass
from typing import Callable

logger = logging.getLogger(__name__)

CHUNK_BYTES = 64 * 1024
SocketFactory = Callable[[], socket.socket]


@dataclass(frozen=True)
class LinkSpec:
    """What a link does to traffic: one-way delay and jitter (ms) and a bandwidth cap (Mbit/s, None = uncapped)."""

    delay_ms: float = 0.0
    jitter_ms: float = 0.0
    bandwidth_mbit: float | None = None

    def __post_init__(self) -> None:
        if self.delay_ms < 0 or self.jitter_ms < 0:
            raise ValueError(f"delay and jitter must be >= 0 ms, got {self.delay_ms} and {self.jitter_ms}")
        if self.bandwidth_mbit is not None and self.bandwidth_mbit <= 0:
            raise ValueError(f"bandwidth must be > 0 Mbit/s, got {self.bandwidth_mbit}")

    @classmethod
    def parse(cls, text: str) -> "LinkSpec":
        """Parse `40ms`, `40ms/10mbit`, `40ms+5ms/100mbit` (delay, optional jitter, optional bandwidth).

        Raises:
            ValueError: the text is not of that form.
        """
        m = re.fullmatch(
            r"\s*(\d+(?:\.\d+)?)ms(?:\+(\d+(?:\.\d+)?)ms)?(?:/(\d+(?:\.\d+)?)mbit)?\s*", text, re.IGNORECASE
        )
        if m is None:
            raise ValueError(
                f"bad link spec {text!r}; expected DELAYms[+JITTERms][/BWmbit], e.g. 40ms or 80ms+5ms/10mbit"
            )
        return cls(float(m[1]), float(m[2] or 0), float(m[3]) if m[3] else None)

    def __add__(self, other: "LinkSpec") -> "LinkSpec":
        """Two links in series: delays and jitters add, the narrower bandwidth wins."""
        caps = [b for b in (self.bandwidth_mbit, other.bandwidth_mbit) if b is not None]
        return LinkSpec(self.delay_ms + other.delay_ms, self.jitter_ms + other.jitter_ms, min(caps) if caps else None)

    def describe(self) -> str:
        jitter = f"+{self.jitter_ms:g}ms" if self.jitter_ms else ""
        bw = f"/{self.bandwidth_mbit:g}mbit" if self.bandwidth_mbit else ""
        return f"{self.delay_ms:g}ms{jitter}{bw}"


class Shaper:
    """One direction of a link: when a chunk handed to it at `now` comes out at the other end (pure, no I/O).

    The chunk first waits for the link to be free, takes `bytes * 8 / bandwidth` to serialise, then travels
    `delay + U(0, jitter)`. Release times never decrease, so jitter never reorders data.
    """

    def __init__(self, spec: LinkSpec, rng: random.Random | None = None) -> None:
        self.spec = spec
        self.rng = rng or random.Random()
        self._free_at = 0.0
        self._last_release = 0.0

    def release_at(self, now: float, nbytes: int) -> float:
        """Seconds (same clock as `now`) at which a chunk of `nbytes` read at `now` is delivered."""
        spec = self.spec
        start = max(now, self._free_at)
        tx_s = nbytes * 8 / (spec.bandwidth_mbit * 1e6) if spec.bandwidth_mbit else 0.0
        self._free_at = start + tx_s
        travel_s = (spec.delay_ms + (self.rng.uniform(0, spec.jitter_ms) if spec.jitter_ms else 0.0)) / 1000
        release = max(self._free_at + travel_s, self._last_release)
        self._last_release = release
        return release

    def buffer_limit(self) -> int:
        """Bytes a pipe may hold in flight before it stops reading: the bandwidth-delay product, at least 256 KiB."""
        if not self.spec.bandwidth_mbit:
            return 4 << 20
        bdp = self.spec.bandwidth_mbit * 1e6 / 8 * (self.spec.delay_ms + self.spec.jitter_ms) / 1000
        return max(256 << 10, int(2 * bdp))


def _reset(writer: asyncio.StreamWriter) -> None:
    """Close with a TCP RST (SO_LINGER 0), as a middlebox that drops a connection does."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


class _Relay:
    """One accepted connection and its upstream: two pipes, each through its direction's shaper."""

    def __init__(
        self,
        link: "Link",
        client: tuple[asyncio.StreamReader, asyncio.StreamWriter],
        upstream: tuple[asyncio.StreamReader, asyncio.StreamWriter],
    ) -> None:
        self.link = link
        self.writers = (client[1], upstream[1])
        self.tasks = [
            asyncio.ensure_future(self._pipe(client[0], upstream[1], link.up, "up")),
            asyncio.ensure_future(self._pipe(upstream[0], client[1], link.down, "down")),
        ]

    async def run(self) -> None:
        results = await asyncio.gather(*self.tasks, return_exceptions=True)
        if any(isinstance(r, BaseException) for r in results):
            self.reset()  # one side failed: the other learns it the way a real connection would (RST)
        else:
            for w in self.writers:
                w.close()

    def reset(self) -> None:
        for task in self.tasks:
            task.cancel()
        for w in self.writers:
            _reset(w)

    async def _pipe(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, shaper: Shaper, direction: str
    ) -> None:
        queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()
        queued = 0
        room = asyncio.Event()
        room.set()

        async def deliver() -> None:
            nonlocal queued
            while True:
                at, data = await queue.get()
                wait = at - time.monotonic()
                if wait > 0:
                    await asyncio.sleep(wait)
                if not data:  # EOF travels the link like data (a delayed FIN)
                    if writer.can_write_eof():
                        writer.write_eof()
                    return
                if direction in self.link.dropping:  # a one-way black hole: the bytes vanish, the connection stays up
                    queued -= len(data)
                    self.link.dropped[direction] += len(data)
                    room.set()
                    continue
                cut = self.link.armed_cut(direction, len(data))
                if cut is not None:  # an armed reset falls inside this chunk: deliver up to it, then drop everything
                    writer.write(data[:cut])
                    await writer.drain()
                    self.link.count(direction, cut)
                    self.link.reset_connections()
                    return
                writer.write(data)
                await writer.drain()
                queued -= len(data)
                self.link.count(direction, len(data))
                if queued <= shaper.buffer_limit():
                    room.set()

        delivering = asyncio.ensure_future(deliver())
        try:
            while True:
                await room.wait()
                data = await reader.read(CHUNK_BYTES)
                queue.put_nowait((shaper.release_at(time.monotonic(), len(data)), data))
                if not data:
                    break
                queued += len(data)
                if queued > shaper.buffer_limit():
                    room.clear()
            await delivering
        finally:
            delivering.cancel()


class Link:
    """A TCP relay from a listening address to `target`, shaped by a `LinkSpec`; see the module docstring.

    Args:
        target: (host, port) every accepted connection is relayed to.
        spec: delay, jitter and bandwidth (both directions).
        listen: (host, port) to listen on; port 0 picks a free port once (kept across cut and restore).
        listen_factory: makes the listening socket (e.g. inside a network namespace); default plain IPv4 TCP.
        connect_factory: makes the upstream socket; default plain IPv4 TCP.
        name: for logs.
        seed: seeds the jitter.
    """

    def __init__(
        self,
        target: tuple[str, int],
        spec: LinkSpec = LinkSpec(),
        *,
        listen: tuple[str, int] = ("127.0.0.1", 0),
        listen_factory: SocketFactory | None = None,
        connect_factory: SocketFactory | None = None,
        name: str = "link",
        seed: int | None = None,
    ) -> None:
        self.target = target
        self.name = name
        self.listen_address = listen
        self._listen_factory = listen_factory or _tcp_socket
        self._connect_factory = connect_factory or _tcp_socket
        self._rng = random.Random(seed)
        self.up = Shaper(spec, self._rng)
        self.down = Shaper(spec, self._rng)
        self.bytes = {"up": 0, "down": 0}
        self.dropped = {"up": 0, "down": 0}  # bytes swallowed by `drop`
        self.dropping: set[str] = set()
        self.connections = 0
        self._reset_at: dict[str, int] = {}  # direction -> byte count at which to reset every connection once
        self._server: asyncio.AbstractServer | None = None
        self._relays: set[_Relay] = set()
        self._accepting: set[asyncio.Task] = set()  # connection handlers still running (awaited by `stop`)
        self._cut = False

    @property
    def spec(self) -> LinkSpec:
        return self.up.spec

    @spec.setter
    def spec(self, spec: LinkSpec) -> None:
        """Change delay, jitter or bandwidth for data read from now on."""
        self.up.spec = self.down.spec = spec

    @property
    def is_cut(self) -> bool:
        return self._cut

    async def start(self) -> tuple[str, int]:
        """Start listening; returns the (host, port) clients connect to."""
        sock = self._listen_factory()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(self.listen_address)
        sock.listen(128)
        sock.setblocking(False)
        self._server = await asyncio.start_server(self._accept, sock=sock)
        self.listen_address = sock.getsockname()[:2]
        self._cut = False
        logger.debug(
            "link %s listening on %s -> %s (%s)", self.name, self.listen_address, self.target, self.spec.describe()
        )
        return self.listen_address

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._cut:
            _reset(writer)
            return
        try:
            upstream = await self._open_upstream()
        except OSError as exc:
            logger.debug("link %s: upstream %s refused: %s", self.name, self.target, exc)
            _reset(writer)
            return
        self.connections += 1
        relay = _Relay(self, (reader, writer), upstream)
        self._relays.add(relay)
        task = asyncio.current_task()
        assert task is not None  # a connection handler runs as a task
        self._accepting.add(task)
        try:
            await relay.run()
        finally:
            self._relays.discard(relay)
            self._accepting.discard(task)

    async def _open_upstream(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        sock = self._connect_factory()
        sock.setblocking(False)
        try:
            await asyncio.get_running_loop().sock_connect(sock, self.target)
        except BaseException:
            sock.close()
            raise
        return await asyncio.open_connection(sock=sock)

    def count(self, direction: str, nbytes: int) -> None:
        """Account `nbytes` delivered in `direction` ("up": client to target)."""
        self.bytes[direction] += nbytes

    def armed_cut(self, direction: str, nbytes: int) -> int | None:
        """If an armed `reset_after` falls within the next `nbytes` of `direction`, disarm it and return how many of
        them still pass; else None."""
        at = self._reset_at.get(direction)
        if at is None or self.bytes[direction] + nbytes < at:
            return None
        del self._reset_at[direction]
        logger.info("link %s: resetting after %d bytes %s, as armed", self.name, at, direction)
        return at - self.bytes[direction]

    def reset_after(self, nbytes: int, direction: str = "up") -> None:
        """Reset every connection once, as soon as `nbytes` more bytes went `direction` (a drop in mid-transfer)."""
        self._reset_at[direction] = self.bytes[direction] + nbytes

    def drop(self, direction: str, on: bool = True) -> None:
        """Silently discard every byte going `direction` ("up": client to target, "down") until `drop(direction,
        False)`: connections stay open and nothing is reset, as on a path that loses packets one way."""
        if direction not in self.bytes:
            raise ValueError(f"direction must be 'up' or 'down', got {direction!r}")
        (self.dropping.add if on else self.dropping.discard)(direction)
        logger.info("link %s: %s dropping %s", self.name, "now" if on else "no longer", direction)

    def reset_connections(self) -> int:
        """Reset every open connection (RST both ends) but keep accepting new ones; returns how many were reset."""
        relays = list(self._relays)
        for relay in relays:
            relay.reset()
        if relays:
            logger.info("link %s: reset %d connection(s)", self.name, len(relays))
        return len(relays)

    async def cut(self) -> None:
        """Reset every open connection and refuse new connects (nothing listens) until `restore()`."""
        self._cut = True
        if self._server is not None:
            self._server.close()
            self._server = None
        self.reset_connections()
        logger.info("link %s cut", self.name)

    async def restore(self) -> None:
        """Listen again on the same address after a `cut()`."""
        if self._server is None:
            await self.start()
            logger.info("link %s restored", self.name)

    async def stop(self) -> None:
        """Stop listening, reset whatever is still open, and let the connection handlers finish."""
        await self.cut()
        if self._accepting:
            await asyncio.wait(set(self._accepting), timeout=5)


def _tcp_socket() -> socket.socket:
    return socket.socket(socket.AF_INET, socket.SOCK_STREAM)
