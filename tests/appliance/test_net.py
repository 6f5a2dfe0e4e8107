"""Bind addresses: loopback or not, and where a local client dials a wildcard bind."""

from fedllm.core.net import connectable_host, is_loopback


def test_loopback_hosts_are_local_and_others_are_not():
    assert is_loopback("127.0.0.1") and is_loopback("localhost") and is_loopback("::1")
    assert not is_loopback("0.0.0.0") and not is_loopback("10.0.0.5") and not is_loopback("127.0.0.2")


def test_a_wildcard_bind_is_dialled_on_loopback_and_a_named_host_as_is():
    assert connectable_host("0.0.0.0") == connectable_host("::") == connectable_host("") == "127.0.0.1"
    assert connectable_host("10.0.0.5") == "10.0.0.5"
