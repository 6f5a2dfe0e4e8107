"""The userspace link emulator: delay, bandwidth cap, cuts, on real sockets on loopback.

Timing assertions are lower bounds derived from the configured link (never upper bounds on this machine's speed).
"""

from __future__ import annotations

import asyncio
import random
import time

import pytest

from fedllm.testbed.link import Link, LinkSpec, Shaper


async def _echo_server() -> tuple[asyncio.AbstractServer, int]:
    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(echo, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


async def _sink_server() -> tuple[asyncio.AbstractServer, int, asyncio.Future]:
    """Counts the bytes it receives; the future resolves with the total at EOF."""
    done: asyncio.Future = asyncio.get_running_loop().create_future()

    async def sink(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        total = 0
        while data := await reader.read(65536):
            total += len(data)
        if not done.done():
            done.set_result(total)
        writer.close()

    server = await asyncio.start_server(sink, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1], done


async def _round_trip(host: str, port: int, payload: bytes = b"ping") -> float:
    reader, writer = await asyncio.open_connection(host, port)
    try:
        t0 = time.monotonic()
        writer.write(payload)
        await writer.drain()
        got = await reader.readexactly(len(payload))
        assert got == payload
        return time.monotonic() - t0
    finally:
        writer.close()


# -- LinkSpec and Shaper: pure --

def test_spec_parses_delay_jitter_and_bandwidth():
    assert LinkSpec.parse("40ms") == LinkSpec(40.0)
    assert LinkSpec.parse("80ms+5ms/10mbit") == LinkSpec(80.0, 5.0, 10.0)
    assert LinkSpec.parse("0.5ms/100MBIT") == LinkSpec(0.5, 0.0, 100.0)
    with pytest.raises(ValueError, match="DELAYms"):
        LinkSpec.parse("40")


def test_specs_in_series_add_delays_and_keep_the_narrower_bandwidth():
    assert LinkSpec(5, 1, 100) + LinkSpec(40, 0, 10) == LinkSpec(45, 1, 10)
    assert LinkSpec(5) + LinkSpec(40) == LinkSpec(45, 0, None)


def test_shaper_adds_serialisation_then_delay():
    # Arrange: 8 Mbit/s = 1 byte per microsecond; 10 ms one way
    shaper = Shaper(LinkSpec(delay_ms=10, bandwidth_mbit=8))
    # Act: two 1000-byte chunks read at t=0 queue behind each other on the wire
    first = shaper.release_at(0.0, 1000)
    second = shaper.release_at(0.0, 1000)
    # Assert
    assert first == pytest.approx(0.001 + 0.010)
    assert second == pytest.approx(0.002 + 0.010)


def test_shaper_never_reorders_under_jitter():
    shaper = Shaper(LinkSpec(delay_ms=5, jitter_ms=50), random.Random(1))
    releases = [shaper.release_at(i * 0.001, 10) for i in range(200)]
    assert releases == sorted(releases)
    assert all(r >= i * 0.001 + 0.005 for i, r in enumerate(releases))


# -- Link: real sockets on loopback --

async def test_delay_is_added_each_way():
    server, port = await _echo_server()
    link = Link(("127.0.0.1", port), LinkSpec(delay_ms=40))
    host, lport = await link.start()
    try:
        rtt = await _round_trip(host, lport)
        assert rtt >= 2 * 0.040  # one-way delay on the request and on the answer
    finally:
        await link.stop()
        server.close()


async def test_jittered_stream_arrives_in_order():
    server, port = await _echo_server()
    link = Link(("127.0.0.1", port), LinkSpec(delay_ms=1, jitter_ms=20), seed=3)
    host, lport = await link.start()
    try:
        reader, writer = await asyncio.open_connection(host, lport)
        sent = b"".join(f"{i:05d}".encode() for i in range(300))
        for i in range(0, len(sent), 50):
            writer.write(sent[i:i + 50])
            await writer.drain()
            await asyncio.sleep(0)
        assert await reader.readexactly(len(sent)) == sent
        writer.close()
    finally:
        await link.stop()
        server.close()


async def test_bandwidth_cap_is_respected():
    server, port, total = await _sink_server()
    link = Link(("127.0.0.1", port), LinkSpec(bandwidth_mbit=8))  # 1 MB/s
    host, lport = await link.start()
    payload = b"x" * (512 * 1024)
    try:
        t0 = time.monotonic()
        reader, writer = await asyncio.open_connection(host, lport)
        writer.write(payload)
        await writer.drain()
        writer.write_eof()
        assert await asyncio.wait_for(total, 60) == len(payload)
        elapsed = time.monotonic() - t0
        assert elapsed >= 0.95 * len(payload) * 8 / 8e6  # never faster than the cap
        assert link.bytes["up"] == len(payload)
        writer.close()
    finally:
        await link.stop()
        server.close()


async def test_cut_resets_open_connections_and_refuses_new_ones_until_restored():
    server, port = await _echo_server()
    link = Link(("127.0.0.1", port), LinkSpec(delay_ms=5))
    host, lport = await link.start()
    try:
        reader, writer = await asyncio.open_connection(host, lport)
        writer.write(b"hello")
        assert await reader.readexactly(5) == b"hello"

        await link.cut()

        with pytest.raises(ConnectionResetError):
            assert await asyncio.wait_for(reader.read(1), 10) != b"", "a cut must reset, not close politely"
        with pytest.raises(ConnectionRefusedError):
            await asyncio.open_connection(host, lport)
        assert link.is_cut

        await link.restore()

        assert (host, lport) == link.listen_address
        assert await _round_trip(host, lport) >= 2 * 0.005
    finally:
        await link.stop()
        server.close()


async def test_reset_connections_keeps_accepting():
    server, port = await _echo_server()
    link = Link(("127.0.0.1", port))
    host, lport = await link.start()
    try:
        reader, writer = await asyncio.open_connection(host, lport)
        writer.write(b"a")
        assert await reader.readexactly(1) == b"a"

        assert link.reset_connections() == 1

        with pytest.raises(ConnectionResetError):
            await asyncio.wait_for(reader.read(1), 10)
        await _round_trip(host, lport, b"still open")  # asserts the echo came back
    finally:
        await link.stop()
        server.close()


async def test_unreachable_target_resets_the_client():
    server, port = await _echo_server()
    server.close()
    await server.wait_closed()
    link = Link(("127.0.0.1", port))
    host, lport = await link.start()
    try:
        reader, writer = await asyncio.open_connection(host, lport)
        with pytest.raises(ConnectionResetError):
            await asyncio.wait_for(reader.read(1), 10)
    finally:
        await link.stop()


async def test_reset_after_drops_a_transfer_in_flight_once():
    server, port, total = await _sink_server()
    link = Link(("127.0.0.1", port), LinkSpec(bandwidth_mbit=80))
    host, lport = await link.start()
    try:
        link.reset_after(100_000)
        reader, writer = await asyncio.open_connection(host, lport)
        writer.write(b"x" * 1_000_000)
        with pytest.raises(ConnectionResetError):
            await asyncio.wait_for(reader.read(1), 30)
        assert link.bytes["up"] == 100_000  # cut exactly there, in the middle of the transfer
        before = link.bytes["up"]
        await _send_and_close(host, lport, b"y" * 10)
        for _ in range(100):  # armed once: the next connection goes through
            if link.bytes["up"] == before + 10:
                break
            await asyncio.sleep(0.05)
        assert link.bytes["up"] == before + 10
    finally:
        await link.stop()
        server.close()


async def _send_and_close(host: str, port: int, payload: bytes) -> None:
    _, writer = await asyncio.open_connection(host, port)
    writer.write(payload)
    await writer.drain()
    writer.close()


async def test_drop_swallows_one_direction_and_keeps_the_connection_open():
    # Arrange: an echo server behind a link; one connection that works both ways
    server, port = await _echo_server()
    link = Link(("127.0.0.1", port), LinkSpec(0))
    host, lport = await link.start()
    try:
        reader, writer = await asyncio.open_connection(host, lport)
        writer.write(b"one")
        await writer.drain()
        assert await reader.readexactly(3) == b"one"
        # Act: the echoes back (down) vanish; what goes up still arrives
        link.drop("down")
        writer.write(b"two")
        await writer.drain()
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(reader.readexactly(3), 0.5)
        # Assert: nothing was reset, the server got it (and echoed it into the void); undone, traffic flows again
        assert link.connections == 1 and link.bytes["up"] == 6 and link.dropped["down"] == 3
        link.drop("down", False)
        writer.write(b"six")
        await writer.drain()
        assert await reader.readexactly(3) == b"six"
        writer.close()
        with pytest.raises(ValueError, match="direction"):
            link.drop("sideways")
    finally:
        await link.stop()
        server.close()
