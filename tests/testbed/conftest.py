"""Fixtures for the test bed's own tests."""

from __future__ import annotations

import pytest

from fedllm.testbed import netns


@pytest.fixture(params=["netns", "loopback"])
def bed_mode(request) -> bool:
    """Each bed test runs on namespaces (skipped with the reason where they cannot be made) and on loopback."""
    if request.param == "netns" and netns.unavailable_reason():
        pytest.skip(f"netns mode: {netns.unavailable_reason()}")
    return request.param == "netns"
