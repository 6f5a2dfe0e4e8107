"""The coordinator's status server answers over HTTPS when given a certificate and key (federation.tls_cert/tls_key)."""

from __future__ import annotations

import httpx
import pytest

from fedllm.core.tls import client_context
from tests.federation.conftest import federation
from tests.pki import make_pki


async def test_status_over_https_is_verified_against_the_private_ca(tmp_path):
    pki = make_pki(tmp_path / "pki")
    async with federation(tmp_path, [], tls_cert=str(pki.cert), tls_key=str(pki.key)) as (coord, _):
        assert coord.status_url.startswith("https://127.0.0.1:")
        async with httpx.AsyncClient(verify=client_context(pki.ca)) as client:
            doc = (await client.get(coord.status_url)).json()
        assert doc["run"] == "testrun"
        async with httpx.AsyncClient() as client:  # the system store does not know the private CA
            with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
                await client.get(coord.status_url)
