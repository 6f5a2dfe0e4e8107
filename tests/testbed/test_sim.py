"""`appliance sim geo`'s region list."""

from __future__ import annotations

import pytest

from fedllm.testbed.link import LinkSpec
from fedllm.testbed.sim import parse_regions


def test_regions_parse_with_their_links():
    assert parse_regions("eu:5ms, us:40ms/100mbit,ap:120ms+10ms/10mbit") == {
        "eu": LinkSpec(5), "us": LinkSpec(40, 0, 100), "ap": LinkSpec(120, 10, 10)}


@pytest.mark.parametrize("text, problem", [("eu", "expected NAME:"), ("eu:5ms,eu:6ms", "repeated"), ("hq:5ms", "reserved"),
                                           ("", "no regions"), ("eu:fast", "DELAYms")])
def test_bad_region_lists_are_refused_with_the_reason(text, problem):
    with pytest.raises(ValueError, match=problem):
        parse_regions(text)
