"""Polling until a condition holds, for tests, benches and the test harness (one home: `testing/`)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any


def wait_until(
    predicate: Callable[[], Any], timeout_s: float = 20.0, step_s: float = 0.05, what: str = "condition"
) -> Any:
    """Poll `predicate` until it returns something truthy, and return that; fail the test naming `what` on timeout."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:g} s waiting for {what}")
        time.sleep(step_s)


async def wait_until_async(
    predicate: Callable[[], Any], timeout_s: float = 15.0, step_s: float = 0.05, what: str = "condition"
) -> Any:
    """`wait_until` for tests running in an event loop: sleeps without blocking the loop."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:g} s waiting for {what}")
        await asyncio.sleep(step_s)
