"""Fixtures for the geo tests: a WAN test bed (network namespaces where possible, else loopback links).

Every test here is marked `geo`. Namespaces and processes are torn down at the end of each module, also on failure.
"""

from __future__ import annotations

import os

import pytest

from fedllm.testbed import netns


def pytest_collection_modifyitems(items):
    for item in items:
        if "tests/geo/" in str(item.fspath):
            item.add_marker(pytest.mark.geo)


def needs_netns() -> None:
    """Skip a netns-only check (with the reason) when the bed runs on loopback."""
    reason = netns.unavailable_reason() or ("TESTBED_NETNS=0" if os.environ.get("TESTBED_NETNS") == "0" else None)
    if reason:
        pytest.skip(f"netns-only check skipped on the loopback bed: {reason}")


def pytest_report_header(config):
    reason = netns.unavailable_reason()
    return "geo test bed: " + ("network namespaces" if reason is None else f"loopback links only: {reason}")
