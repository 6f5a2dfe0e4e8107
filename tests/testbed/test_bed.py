"""The test bed: regions that reach each other only through shaped links, cuts, and a clean teardown."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time

import pytest

from fedllm.testbed.bed import Bed
from fedllm.testbed.link import LinkSpec

ECHO = """
import asyncio, sys
async def echo(r, w):
    try:
        while data := await r.read(65536):
            w.write(data); await w.drain()
    except ConnectionError:
        pass
    w.close()
async def main():
    server = await asyncio.start_server(echo, sys.argv[1], int(sys.argv[2]))
    await server.serve_forever()
asyncio.run(main())
"""


def _start_echo(bed: Bed, region: str) -> int:
    port = bed.free_port(region)
    bed.spawn(region, f"echo-{region}", [sys.executable, "-c", ECHO, bed.address(region), str(port)])
    return port


async def _rtt(host: str, port: int, timeout_s: float = 120.0) -> float:
    """One echo round trip; retried while the echo process is still starting (the link resets or refuses), which on
    a loaded machine can take a while."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            reader, writer = await asyncio.open_connection(host, port)
            try:
                t0 = time.monotonic()
                writer.write(b"ping")
                assert await asyncio.wait_for(reader.readexactly(4), timeout_s) == b"ping"
                return time.monotonic() - t0
            finally:
                writer.close()
        except (ConnectionError, asyncio.IncompleteReadError):
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.05)


async def _connect_once(host: str, port: int) -> None:
    _, writer = await asyncio.wait_for(asyncio.open_connection(host, port), 5)
    writer.close()


def test_cross_region_path_adds_both_links_delay(bed_mode, tmp_path):
    with Bed({"eu": LinkSpec(5), "us": LinkSpec(40)}, tmp_path, use_netns=bed_mode) as bed:
        port = _start_echo(bed, "us")
        host, lport = bed.link("eu", "us", port)

        rtt = bed.run("eu", lambda: _rtt(host, lport))

        assert rtt >= 2 * (0.005 + 0.040)


def test_cut_refuses_until_restore(bed_mode, tmp_path):
    with Bed({"eu": LinkSpec(1), "us": LinkSpec(1)}, tmp_path, use_netns=bed_mode) as bed:
        port = _start_echo(bed, "us")
        host, lport = bed.link("eu", "us", port)
        bed.run("eu", lambda: _rtt(host, lport))

        bed.cut("us")
        with pytest.raises(ConnectionRefusedError):
            bed.run("eu", lambda: _connect_once(host, lport))

        bed.restore("us")
        assert bed.run("eu", lambda: _rtt(host, lport)) > 0


def test_regions_are_isolated_and_torn_down(tmp_path):
    bed = Bed({"eu": LinkSpec(1), "us": LinkSpec(1)}, tmp_path, use_netns=None)
    if not bed.use_netns:
        pytest.skip(f"netns only: {bed.netns_skip_reason}")
    with bed:
        port = _start_echo(bed, "us")
        bed.link("eu", "us", port)
        proc = bed.processes["echo-us"]
        # eu has no route to us's own address: the hub does not forward, only links connect regions
        with pytest.raises(OSError):
            bed.run("eu", lambda: _connect_once(bed.address("us"), port))
        assert bed.run("us", lambda: _rtt(bed.address("us"), port)) >= 0  # while us itself reaches it
        # and nothing of the bed is in this process's own namespace
        assert f"g{bed.id}" not in subprocess.run(["ip", "link"], capture_output=True, text=True).stdout
    names = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert f"g{bed.id}-" not in names
    assert proc.poll() is not None


def test_teardown_runs_when_the_body_fails(tmp_path):
    with pytest.raises(RuntimeError, match="boom"):
        with Bed({"eu": LinkSpec(1)}, tmp_path) as bed:
            proc = bed.spawn("eu", "sleeper", [sys.executable, "-c", "import time; time.sleep(600)"])
            raise RuntimeError("boom")
    assert proc.wait(10) is not None
    assert not any(name.startswith(f"g{bed.id}-") for name in os.listdir("/var/run/netns")) if os.path.isdir("/var/run/netns") else True
