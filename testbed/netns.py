"""Linux network namespaces as "hosts in other regions": create, wire with veth pairs, open sockets inside, delete.

Everything here acts only on namespaces this process created (their names carry a random prefix per bed), and on
nothing in the caller's own namespace. Needs root and the `ip` tool; `unavailable_reason()` says why not otherwise.
"""

from __future__ import annotations

import ctypes
import logging
import os
import shutil
import socket
import subprocess
import threading
import uuid
from typing import Callable, TypeVar

logger = logging.getLogger(__name__)

CLONE_NEWNET = 0x40000000
NETNS_DIR = "/var/run/netns"
T = TypeVar("T")

_libc = ctypes.CDLL("libc.so.6", use_errno=True) if os.name == "posix" else None


class NetnsError(RuntimeError):
    """An `ip` command or a namespace switch failed; the message names the command and its output."""


def ip(*args: str) -> str:
    """Run `ip ARGS` and return its output.

    Raises:
        NetnsError: it exited non-zero (the message quotes stderr).
    """
    proc = subprocess.run(["ip", *args], capture_output=True, text=True)
    if proc.returncode != 0:
        raise NetnsError(f"`ip {' '.join(args)}` failed: {proc.stderr.strip() or proc.stdout.strip()}")
    return proc.stdout


_reason: list[str | None] = []


def unavailable_reason() -> str | None:
    """None when network namespaces can be made here, else why not (checked once per process by making one)."""
    if _reason:
        return _reason[0]
    reason = None
    if _libc is None or not hasattr(os, "geteuid"):
        reason = "network namespaces need Linux"
    elif os.geteuid() != 0:
        reason = "network namespaces need root (running as uid %d)" % os.geteuid()
    elif shutil.which("ip") is None:
        reason = "the `ip` tool (iproute2) is not installed"
    else:
        probe = Namespace(f"probe-{uuid.uuid4().hex[:8]}")
        try:
            probe.create()
        except NetnsError as exc:
            reason = f"cannot create a network namespace: {exc}"
        finally:
            probe.delete()
    _reason.append(reason)
    return reason


def _setns(fd: int) -> None:
    if _libc is None:
        raise NetnsError("setns needs the C library (a POSIX system)")
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise NetnsError(f"setns failed: {os.strerror(err)}")


class Namespace:
    """One named network namespace (`ip netns add NAME`)."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._fd: int | None = None

    @property
    def path(self) -> str:
        return f"{NETNS_DIR}/{self.name}"

    def create(self) -> "Namespace":
        ip("netns", "add", self.name)
        self.ip("link", "set", "lo", "up")
        return self

    def delete(self) -> None:
        """Delete it (interfaces inside go with it); a namespace already gone is fine."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        if os.path.exists(self.path):
            try:
                ip("netns", "del", self.name)
            except NetnsError as exc:
                logger.warning("could not delete namespace %s: %s", self.name, exc)

    def ip(self, *args: str) -> str:
        """`ip -n NAME ARGS`: an ip command inside this namespace."""
        return ip("-n", self.name, *args)

    def exec_argv(self, argv: list[str]) -> list[str]:
        """The argv that runs `argv` inside this namespace."""
        return ["ip", "netns", "exec", self.name, *argv]

    def _ns_fd(self) -> int:
        if self._fd is None:
            self._fd = os.open(self.path, os.O_RDONLY)
        return self._fd

    def socket(self, family: int = socket.AF_INET, type_: int = socket.SOCK_STREAM) -> socket.socket:
        """A socket that lives in this namespace, made from the calling thread, which is switched back at once.

        A socket keeps the namespace it was created in, so the caller may bind, connect and use it from anywhere.
        """
        own = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
        try:
            _setns(self._ns_fd())
            try:
                return socket.socket(family, type_)
            finally:
                _setns(own)
        finally:
            os.close(own)

    def call(self, fn: Callable[[], T]) -> T:
        """Run `fn` in a new thread that lives in this namespace (every socket it opens is inside); returns its
        result."""
        box: dict[str, object] = {}

        def target() -> None:
            try:
                _setns(self._ns_fd())  # this thread only; it ends with fn
                box["result"] = fn()
            except BaseException as exc:  # handed to the caller below
                box["error"] = exc

        thread = threading.Thread(target=target, name=f"netns-{self.name}", daemon=True)
        thread.start()
        thread.join()
        if "error" in box:
            raise box["error"]  # type: ignore[misc]
        return box["result"]  # type: ignore[return-value]


def connect_veth(
    inner: Namespace, inner_ifname: str, inner_cidr: str, outer: Namespace, outer_ifname: str, outer_cidr: str
) -> None:
    """A veth pair from `inner` to `outer`, both ends addressed and up (made inside the namespaces, never outside)."""
    inner.ip("link", "add", inner_ifname, "type", "veth", "peer", "name", outer_ifname, "netns", outer.name)
    inner.ip("addr", "add", inner_cidr, "dev", inner_ifname)
    inner.ip("link", "set", inner_ifname, "up")
    outer.ip("addr", "add", outer_cidr, "dev", outer_ifname)
    outer.ip("link", "set", outer_ifname, "up")
