"""A WAN test bed on one machine: a userspace link emulator (delay, jitter, bandwidth, cuts) and regions as network
namespaces joined through a hub. Used by tests/geo, bench/geo_*.py and `appliance sim geo`; imports only the
standard library and `fedllm.core`, and no product package imports it."""

from fedllm.testbed.bed import Bed, Region
from fedllm.testbed.link import Link, LinkSpec, Shaper
from fedllm.testbed.netns import NetnsError

__all__ = ["Bed", "Link", "LinkSpec", "NetnsError", "Region", "Shaper"]
