"""The console serves HTTPS when given a certificate and key (ui.tls_cert, ui.tls_key)."""

from __future__ import annotations

import httpx
import pytest

from fedllm.core.tls import client_context
from fedllm.testing.factories import free_port
from tests.pki import make_pki
from tests.ui.conftest import start_console, stop_process


@pytest.mark.slow
def test_console_over_https_with_a_private_ca(tmp_path):
    pki = make_pki(tmp_path / "pki")
    trust = client_context(pki.ca)
    console = start_console(tmp_path / "home", f"http://127.0.0.1:{free_port()}", f"http://127.0.0.1:{free_port()}",
                            extra_env={"APPLIANCE_UI__TLS_CERT": str(pki.cert), "APPLIANCE_UI__TLS_KEY": str(pki.key)},
                            scheme="https", verify=trust)
    try:
        assert console.url.startswith("https://")
        assert httpx.get(console.url, verify=trust, timeout=10).status_code == 200
        with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
            httpx.get(console.url, timeout=10)  # a browser or client that does not trust the CA is refused
    finally:
        stop_process(console.process)
