"""A WAN test bed on one machine: regions as network namespaces around a hub, links through the link emulator.

Each region is a network namespace with one veth pair to a hub namespace (region `10.77.I.2/24`, hub side
`10.77.I.1/24`). The hub does not forward packets, so regions cannot reach each other directly: every cross-region
connection goes through a `fedllm.testbed.link.Link` that listens in the hub on the address facing the client's region
and connects to the target in its region. The path from region A to region B gets `spec[A] + spec[B]` (each region's
link to the hub), and cutting a region cuts every link that touches it.

Processes of a region run inside its namespace (`ip netns exec`), and the test's own clients can run there too
(`Bed.call`). Where namespaces cannot be made (not root), the same bed runs on loopback: every region is
127.0.0.1 and the links are the only thing that shapes traffic (`Bed.netns_skip_reason` says why).

    with Bed({"eu": LinkSpec(5), "us": LinkSpec(40)}, workdir=tmp) as bed:
        port = bed.free_port("us")
        bed.spawn("us", "backend", [sys.executable, "-m", "http.server", "--bind", bed.address("us"), str(port)])
        host, lport = bed.link("eu", "us", port)      # what a process in eu connects to
        bed.cut("us"); bed.restore("us")
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import signal
import socket
import subprocess
import threading
import uuid
from collections import defaultdict
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Awaitable, Callable, Coroutine, Mapping, TypeVar

from fedllm.testbed import netns
from fedllm.testbed.link import Link, LinkSpec

logger = logging.getLogger(__name__)

T = TypeVar("T")
SUBNET = "10.77"
LOOPBACK = "127.0.0.1"
_REGION_NAME = re.compile(r"[a-z][a-z0-9-]{0,15}")


@dataclass
class Region:
    """One region: its link to the hub, and where its processes listen."""

    name: str
    spec: LinkSpec
    index: int
    namespace: netns.Namespace | None = None

    @property
    def address(self) -> str:
        """The address processes of this region bind to."""
        return f"{SUBNET}.{self.index}.2" if self.namespace else LOOPBACK

    @property
    def hub_address(self) -> str:
        """The hub's address on this region's veth (where links for this region's clients listen)."""
        return f"{SUBNET}.{self.index}.1" if self.namespace else LOOPBACK


class Bed:
    """The test bed; a context manager that tears everything down on exit, also after a failure.

    Args:
        regions: region name -> its link to the hub (one-way delay, jitter, bandwidth).
        workdir: folder for the logs of spawned processes.
        use_netns: True needs namespaces (raises NetnsError without), False runs on loopback, None picks what works
            (`TESTBED_NETNS=0` in the environment forces loopback, to try the fallback as root).
        seed: seeds link jitter.
    """

    def __init__(
        self, regions: Mapping[str, LinkSpec], workdir: Path, *, use_netns: bool | None = None, seed: int = 0
    ) -> None:
        bad = [r for r in regions if not _REGION_NAME.fullmatch(r)]
        if bad:
            raise ValueError(f"region names must be lowercase letters, digits and '-', at most 16 long: {bad}")
        self.workdir = Path(workdir)
        self.id = uuid.uuid4().hex[:6]
        self.netns_skip_reason = netns.unavailable_reason()
        if use_netns is None and os.environ.get("TESTBED_NETNS") == "0":
            use_netns, self.netns_skip_reason = False, "TESTBED_NETNS=0"
        if use_netns and self.netns_skip_reason:
            raise netns.NetnsError(self.netns_skip_reason)
        self.use_netns = self.netns_skip_reason is None if use_netns is None else use_netns
        self.regions = {name: Region(name, spec, i + 1) for i, (name, spec) in enumerate(regions.items())}
        self.hub: netns.Namespace | None = None
        self.seed = seed
        self.processes: dict[str, subprocess.Popen] = {}
        self._links: dict[tuple[str, str, int], Link] = {}
        self._links_of: dict[str, list[Link]] = defaultdict(list)
        self._flaps: dict[str, asyncio.Task] = {}
        self._cut: set[str] = set()
        self._loop = asyncio.new_event_loop()
        self._thread: threading.Thread | None = None

    # -- life cycle --
    def __enter__(self) -> "Bed":
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def start(self) -> "Bed":
        """Make the namespaces and veth pairs (netns mode) and start the links' event loop."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        if self.use_netns:
            self.hub = netns.Namespace(f"g{self.id}-hub").create()
            for region in self.regions.values():
                region.namespace = netns.Namespace(f"g{self.id}-{region.name}").create()
                netns.connect_veth(
                    region.namespace,
                    "eth0",
                    f"{region.address}/24",
                    self.hub,
                    f"r{region.index}",
                    f"{region.hub_address}/24",
                )
        self._thread = threading.Thread(target=self._loop.run_forever, name=f"bed-{self.id}", daemon=True)
        self._thread.start()
        logger.info(
            "test bed %s up (%s): %s",
            self.id,
            "netns" if self.use_netns else "loopback",
            ", ".join(f"{r.name} {r.spec.describe()}" for r in self.regions.values()),
        )
        return self

    def close(self) -> None:
        """Stop every spawned process, every link, and delete every namespace this bed made."""
        for name in list(self.processes):
            self.stop_process(name)
        if self._thread is not None and self._thread.is_alive():
            try:
                self._run(self._stop_links(), timeout_s=30)
            finally:
                self._loop.call_soon_threadsafe(self._loop.stop)
                self._thread.join(timeout=10)
        if not self._loop.is_running():
            self._loop.close()
        for region in self.regions.values():
            if region.namespace is not None:
                region.namespace.delete()
                region.namespace = None
        if self.hub is not None:
            self.hub.delete()
            self.hub = None

    async def _stop_links(self) -> None:
        for task in self._flaps.values():
            task.cancel()
        for link in self._links.values():
            await link.stop()

    def _run(self, coro: Coroutine[Any, Any, T], timeout_s: float = 60) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout_s)

    # -- addresses and links --
    def address(self, region: str) -> str:
        """Where processes of `region` bind."""
        return self.regions[region].address

    def free_port(self, region: str) -> int:
        """A TCP port free on `region`'s address a moment ago."""

        def pick() -> int:
            with socket.socket() as s:
                s.bind((self.address(region), 0))
                return s.getsockname()[1]

        ns = self.regions[region].namespace
        return ns.call(pick) if ns else pick()

    def link(self, client: str, server: str, port: int, *, spec: LinkSpec | None = None) -> tuple[str, int]:
        """The (host, port) a process in region `client` connects to for `server`'s `port`.

        Within one region that is the server's own address; across regions it is a link in the hub with
        `spec[client] + spec[server]` (or `spec`), made once per (client, server, port).
        """
        if client == server:
            return self.address(server), port
        key = (client, server, port)
        if key not in self._links:
            c, s = self.regions[client], self.regions[server]
            link = Link(
                (s.address, port),
                spec or (c.spec + s.spec),
                listen=(c.hub_address, 0),
                listen_factory=self.hub.socket if self.hub else None,
                connect_factory=self.hub.socket if self.hub else None,
                name=f"{client}->{server}:{port}",
                seed=self.seed + len(self._links),
            )
            self._run(link.start())
            if {client, server} & self._cut:
                self._run(link.cut())
            self._links[key] = link
            self._links_of[client].append(link)
            self._links_of[server].append(link)
        return self._links[key].listen_address

    def url(self, client: str, server: str, port: int, scheme: str = "http") -> str:
        """`scheme://host:port` of `link(client, server, port)`."""
        host, lport = self.link(client, server, port)
        return f"{scheme}://{host}:{lport}"

    def links(self, region: str) -> list[Link]:
        """Every link that touches `region`."""
        return list(self._links_of[region])

    def cut(self, region: str) -> None:
        """Cut `region` off: every link touching it resets its connections and refuses new ones."""

        async def cut_all() -> None:
            for link in self._links_of[region]:
                await link.cut()

        self._cut.add(region)
        self._run(cut_all())
        logger.info("region %s cut off", region)

    def restore(self, region: str) -> None:
        """Undo `cut(region)` (links of another cut region stay cut)."""
        self._cut.discard(region)

        async def restore_all() -> None:
            for (client, server, _), link in self._links.items():
                if region in (client, server) and not {client, server} & self._cut:
                    await link.restore()

        self._run(restore_all())
        logger.info("region %s restored", region)

    def flap(self, region: str, every_s: float | None) -> None:
        """Reset every connection of `region`'s links each `every_s` seconds (None stops it); new connects still
        work."""
        old = self._flaps.pop(region, None)
        if old is not None:
            self._loop.call_soon_threadsafe(old.cancel)
        if every_s is None:
            return

        async def flapping() -> None:
            while True:
                await asyncio.sleep(every_s)
                for link in self._links_of[region]:
                    link.reset_connections()

        self._flaps[region] = self._run(_spawn_task(flapping()))

    def reset_after(self, client: str, nbytes: int, direction: str = "up") -> None:
        """Once `nbytes` more bytes go `direction` on a link from region `client`, reset its connections (once)."""

        async def arm() -> None:
            for (c, _, _), link in self._links.items():
                if c == client:
                    link.reset_after(nbytes, direction)

        self._run(arm())

    def drop(self, client: str, direction: str = "down", on: bool = True) -> None:
        """Silently lose every byte going `direction` on the links from region `client` (connections stay up) until
        `drop(client, direction, False)`: e.g. `drop("a")` loses whatever the other regions send to `a`."""

        async def set_all() -> None:
            for (c, _, _), link in self._links.items():
                if c == client:
                    link.drop(direction, on)

        self._run(set_all())

    # -- processes and clients --
    def spawn(
        self, region: str, name: str, argv: list[str], env: Mapping[str, str] | None = None, cwd: Path | None = None
    ) -> subprocess.Popen:
        """Start `argv` inside `region` (its own process group, output in `workdir/NAME.log`)."""
        if name in self.processes:
            raise ValueError(f"a process named {name!r} already runs in the bed")
        ns = self.regions[region].namespace
        full_env = {**os.environ, **(env or {})}
        log_path = self.workdir / f"{name}.log"
        with open(log_path, "ab") as log:
            proc = subprocess.Popen(
                ns.exec_argv(argv) if ns else argv,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=full_env,
                cwd=cwd,
                start_new_session=True,
            )
        self.processes[name] = proc
        logger.info("spawned %s in %s (pid %d, log %s)", name, region, proc.pid, log_path)
        return proc

    def log(self, name: str) -> str:
        """The output of spawned process `name` so far."""
        path = self.workdir / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def stop_process(self, name: str, timeout_s: float = 15.0) -> int | None:
        """SIGTERM the process group of `name`, then SIGKILL it; returns its exit code."""
        proc = self.processes.pop(name, None)
        if proc is None:
            return None
        for sig, wait_s in ((signal.SIGTERM, timeout_s), (signal.SIGKILL, 5.0)):
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                pass
            try:
                proc.wait(wait_s)
                break
            except subprocess.TimeoutExpired:
                continue
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # whatever of its group outlived it
        except ProcessLookupError:
            pass
        return proc.returncode

    def call(self, region: str, fn: Callable[[], T]) -> T:
        """Run `fn` in a thread inside `region` (its sockets are that region's); returns its result."""
        ns = self.regions[region].namespace
        return ns.call(fn) if ns else _in_thread(fn)

    def run(self, region: str, coro_fn: Callable[[], Coroutine[Any, Any, T]]) -> T:
        """Run the coroutine `coro_fn()` on a fresh event loop inside `region`; returns its result."""
        return self.call(region, lambda: asyncio.run(coro_fn()))

    def stats(self) -> list[dict[str, Any]]:
        """One row per link: name, spec, cut, connections, bytes each way."""
        return [
            {
                "link": link.name,
                "spec": link.spec.describe(),
                "cut": link.is_cut,
                "connections": link.connections,
                **link.bytes,
            }
            for link in self._links.values()
        ]


async def _spawn_task(coro: Awaitable[Any]) -> asyncio.Task:
    return asyncio.ensure_future(coro)


def _in_thread(fn: Callable[[], T]) -> T:
    future: Future = Future()

    def target() -> None:
        try:
            future.set_result(fn())
        except BaseException as exc:
            future.set_exception(exc)

    threading.Thread(target=target, daemon=True).start()
    return future.result()
