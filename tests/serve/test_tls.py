"""TLS: the router serves HTTPS with a certificate from a private CA, a worker joins it over HTTPS, clients that do
not trust the CA are refused, and the router verifies the certificates of HTTPS workers."""

from __future__ import annotations

import asyncio
import os
import signal
import ssl
import subprocess
import sys
import time

import httpx
import pytest

from fedllm.core.errors import ConfigError
from fedllm.core.tls import client_context
from fedllm.testing.factories import REPO, free_port
from tests.pki import make_pki

CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}


def _env(home, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("APPLIANCE_") and k not in ("SSL_CERT_FILE", "SSL_CERT_DIR")}
    return {**env, "APPLIANCE_HOME": str(home), **extra}


def _appliance(*args: str, env: dict[str, str], **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "fedllm.appliance", *args], cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, **kw)


def _wait_https(url: str, verify: ssl.SSLContext, proc: subprocess.Popen, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"router exited with {proc.returncode}: {proc.stdout.read()}")
        try:
            httpx.get(url, verify=verify, timeout=1)
            return
        except httpx.HTTPError:
            time.sleep(0.1)
    raise TimeoutError(f"{url} did not answer within {timeout_s} s")


def _stop(proc: subprocess.Popen) -> str:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.stdout.read() if proc.stdout else ""


WORKER_KEY = "tls-test-worker-key-0123456789"


def test_router_over_https_a_worker_joins_and_clients_without_the_ca_are_refused(fake_factory, tmp_path):
    pki = make_pki(tmp_path / "pki")
    stranger = make_pki(tmp_path / "other", name="other")  # a CA that did not sign the router's certificate
    trust = client_context(pki.ca)
    fake = fake_factory("m", api_key=WORKER_KEY)
    home = tmp_path / "router-home"
    port = free_port()
    # No trusted worker serves the joiner's model: allowed here (serve.allow_unverified), as this test is about TLS.
    router = _appliance("serve", "--port", str(port), env=_env(home, APPLIANCE_SERVE__TLS_CERT=str(pki.cert),
                                                                APPLIANCE_SERVE__TLS_KEY=str(pki.key),
                                                                APPLIANCE_SERVE__ALLOW_UNVERIFIED="true"))
    joined = None
    try:
        url = f"https://127.0.0.1:{port}"
        _wait_https(f"{url}/health", trust, router)
        admin = {"Authorization": f"Bearer {(home / 'keys' / 'admin_token').read_text().strip()}"}
        join_token = (home / "keys" / "join_token").read_text().strip()

        # A worker joins over HTTPS, trusting the private CA (tls_ca_file); the token is never on its command line.
        joined = _appliance("worker", "join", "--router", url, "--url", fake.url, "--region", "eu", "--heartbeat-s", "0.5",
                            env=_env(tmp_path / "worker-home", APPLIANCE_JOIN_TOKEN=join_token, APPLIANCE_TLS_CA_FILE=str(pki.ca),
                                     VLLM_API_KEY=WORKER_KEY))
        deadline = time.monotonic() + 60
        rows: list = []
        while time.monotonic() < deadline and not rows:
            assert joined.poll() is None, _stop(joined)
            rows = httpx.get(f"{url}/admin/workers", headers=admin, verify=trust, timeout=5).json()
            time.sleep(0.2)
        assert [(r["url"], r["region"]) for r in rows] == [(fake.url, "eu")]
        r = httpx.post(f"{url}/v1/chat/completions", json=CHAT, verify=trust, timeout=10)
        assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"].startswith("tok0")

        # Clients that do not trust the CA are refused: the system store, another CA, and the join command itself.
        for verify in (True, client_context(stranger.ca)):
            with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
                httpx.get(f"{url}/health", verify=verify, timeout=5)
        for extra in ({}, {"APPLIANCE_TLS_CA_FILE": str(stranger.ca)}):
            refused = _appliance("worker", "join", "--router", url, "--url", fake.url,
                                 env=_env(tmp_path / "stranger-home", APPLIANCE_JOIN_TOKEN=join_token, VLLM_API_KEY=WORKER_KEY, **extra))
            out, _ = refused.communicate(timeout=60)
            assert refused.returncode != 0 and "CERTIFICATE_VERIFY_FAILED" in out.replace("\n", ""), out
        assert len(httpx.get(f"{url}/admin/workers", headers=admin, verify=trust, timeout=5).json()) == 1
        # Plain HTTP to the HTTPS port gets no answer from the router.
        with pytest.raises(httpx.HTTPError):
            httpx.get(f"http://127.0.0.1:{port}/health", timeout=5)
    finally:
        if joined is not None:
            _stop(joined)
        _stop(router)


async def _https_fake(pki) -> tuple[str, "asyncio.Task", object]:
    import uvicorn

    from fedllm.testing.fake_vllm import create_fake_app

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_fake_app("m"), host="127.0.0.1", port=port, log_level="warning",
                                           ssl_certfile=str(pki.cert), ssl_keyfile=str(pki.key)))
    task = asyncio.create_task(server.serve())
    while not server.started:
        assert not task.done()
        await asyncio.sleep(0.01)
    return f"https://127.0.0.1:{port}", task, server


async def test_the_router_verifies_the_certificates_of_https_workers(router_factory, tmp_path):
    pki = make_pki(tmp_path / "pki")
    worker_url, task, server = await _https_fake(pki)
    try:
        trusting = await router_factory([worker_url], home=tmp_path / "trusting", tls_ca_file=pki.ca)
        untrusting = await router_factory([worker_url], home=tmp_path / "untrusting")
        async with httpx.AsyncClient(timeout=10) as c:
            r = await c.post(f"{trusting.url}/v1/chat/completions", json=CHAT)
            assert r.status_code == 200, r.text
            r = await c.post(f"{untrusting.url}/v1/chat/completions", json=CHAT)
            assert r.status_code in (502, 503), r.text  # the worker's certificate is not trusted: never called
            health = (await c.get(f"{untrusting.url}/health")).json()
            assert health["workers_healthy"] == 0
    finally:
        server.should_exit = True
        await task


def test_tls_settings_go_in_pairs_and_bad_files_are_refused(tmp_path):
    from fedllm.core.tls import check_server_files
    from fedllm.testing.factories import make_settings

    pki = make_pki(tmp_path / "pki")
    with pytest.raises(ConfigError, match="tls_cert and tls_key go together"):
        make_settings(tmp_path, serve={"tls_cert": str(pki.cert)})
    assert make_settings(tmp_path, ui={"tls_cert": str(pki.cert), "tls_key": str(pki.key)}).ui.scheme == "https"
    with pytest.raises(ConfigError, match="does not exist"):
        check_server_files(tmp_path / "missing.pem", pki.key)
    other = make_pki(tmp_path / "other", name="other")
    with pytest.raises(ConfigError, match="cannot serve HTTPS"):
        check_server_files(pki.cert, other.key)  # a key that does not match the certificate
    with pytest.raises(ConfigError, match="does not exist"):
        client_context(tmp_path / "no-ca.pem")
