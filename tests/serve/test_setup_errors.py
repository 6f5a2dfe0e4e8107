"""Calls made before their setup name what is missing, instead of failing on a None deep inside."""

from __future__ import annotations

import pytest

from fedllm.core.errors import ConfigError
from fedllm.core.contracts.router_client import RouterClient
from fedllm.core.tls import check_server_files
from fedllm.serve.registry import WorkerRegistry
from fedllm.serve.worker_launcher import RouterRegistration
from fedllm.testing.factories import free_port, make_settings


def test_a_heartbeat_before_registering_says_the_worker_is_not_registered():
    membership = RouterRegistration(RouterClient(f"http://127.0.0.1:{free_port()}"), "token", "http://127.0.0.1:1", "eu",
                                    ["m"])
    with pytest.raises(RuntimeError, match="is not registered"):
        membership.heartbeat()


def test_the_registry_without_a_session_says_the_router_sets_one_at_startup(tmp_path):
    registry = WorkerRegistry(make_settings(tmp_path).serve)
    with pytest.raises(RuntimeError, match="no HTTP session"):
        registry.http  # noqa: B018 - the property is the call under test


def test_a_certificate_without_its_key_is_refused_naming_the_key(tmp_path):
    cert = tmp_path / "cert.pem"
    cert.write_text("not read: the key is checked first")
    with pytest.raises(ConfigError, match="tls_key is not"):
        check_server_files(cert, None)
