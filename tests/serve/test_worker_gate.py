"""The worker gate (`fedllm.serve.worker_gate`) in front of a fake vLLM on a Unix socket, both real: what passes, what is
refused, streams, and a client that leaves. The real vLLM check is in test_router_vllm.py."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from fedllm.serve.worker_gate import GateThread, plain_v1_path
from fedllm.testing.factories import REPO

KEY = "worker-gate-test-key-0123456789"
CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}


@pytest.fixture
def behind(tmp_path: Path):
    """A fake vLLM listening on a Unix socket with its own key (as the appliance starts vLLM), and a gate in front."""
    sock = tmp_path / "vllm.sock"
    proc = subprocess.Popen([sys.executable, "-m", "fedllm.testing.fake_vllm", "--uds", str(sock), "--model", "m", "--delay-s", "0"],
                            cwd=REPO, env={**os.environ, "VLLM_API_KEY": KEY}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    gate = GateThread(f"unix:{sock}", KEY, "127.0.0.1", 0).start()
    url = f"http://127.0.0.1:{gate.port}"
    try:
        deadline = time.monotonic() + 20
        while httpx.get(f"{url}/health", timeout=2).status_code != 200:
            assert proc.poll() is None and time.monotonic() < deadline, "the fake behind the gate did not start"
            time.sleep(0.05)
        yield url, sock
    finally:
        gate.stop()
        proc.kill()
        proc.wait()


def _fake_requests(sock: Path) -> list[dict]:
    """What the fake received, asked on its own socket (the gate does not forward /fake/*)."""
    with httpx.Client(transport=httpx.HTTPTransport(uds=str(sock)), base_url="http://fake") as c:
        return c.get("/fake/requests", timeout=5).json()


def test_v1_needs_the_workers_key_and_passes_through_with_it(behind):
    url, _ = behind
    auth = {"Authorization": f"Bearer {KEY}"}
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}, {"Authorization": f"Basic {KEY}"}):
        r = httpx.post(f"{url}/v1/chat/completions", json=CHAT, headers=headers)
        assert r.status_code == 401 and r.json()["error"]["code"] == 401
    ok = httpx.post(f"{url}/v1/chat/completions", json=CHAT, headers=auth)
    assert ok.status_code == 200 and ok.json()["choices"][0]["message"]["content"].startswith("tok0")
    models = httpx.get(f"{url}/v1/models?x=1", headers=auth)
    assert [m["id"] for m in models.json()["data"]] == ["m"]
    load = httpx.post(f"{url}/v1/load_lora_adapter", json={"lora_name": "a", "lora_path": "/x"}, headers=auth)
    assert load.status_code == 200  # runtime LoRA loading goes through the gate, with the key
    assert httpx.post(f"{url}/v1/unload_lora_adapter", json={"lora_name": "a"}, headers=auth).status_code == 200
    assert httpx.get(f"{url}/health").status_code == 200  # keyless: status only


@pytest.mark.parametrize("method,path", [
    ("POST", "/invocations"), ("POST", "/adapters"), ("DELETE", "/adapters/x"), ("GET", "/metrics"), ("GET", "/docs"),
    ("GET", "/openapi.json"), ("POST", "/tokenize"), ("POST", "/detokenize"), ("GET", "/v2/models"),
    ("POST", "/inference/v1/generate"), ("GET", "/ping"), ("GET", "/version"), ("POST", "/health"), ("GET", "/fake/requests"),
    ("POST", "/v1/../invocations"), ("POST", "/v1/%2e%2e/invocations"), ("POST", "//v1/chat/completions"),
    ("POST", "/v1//chat/completions"), ("POST", "/v1/./chat/completions"), ("POST", "/V1/chat/completions"),
])
def test_everything_else_is_refused_even_with_the_key(behind, method, path):
    url, sock = behind
    before = len(_fake_requests(sock))
    status, body = _raw_request(url, method, path)  # sent as written: HTTP clients normalise dot segments
    assert status == 404 and json.loads(body)["error"]["code"] == 404
    assert len(_fake_requests(sock)) == before  # nothing reached the model server


def _raw_request(url: str, method: str, path: str) -> tuple[int, bytes]:
    """One HTTP/1.1 request with the path exactly as given; returns the status and the body."""
    host, port = url.removeprefix("http://").split(":")
    payload = json.dumps(CHAT).encode()
    head = (f"{method} {path} HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {KEY}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(payload)}\r\nConnection: close\r\n\r\n").encode()
    with socket.create_connection((host, int(port)), timeout=10) as conn:
        conn.sendall(head + payload)
        answer = b""
        while chunk := conn.recv(65536):
            answer += chunk
    status_line, _, rest = answer.partition(b"\r\n")
    return int(status_line.split()[1]), rest.partition(b"\r\n\r\n")[2]


def test_plain_v1_path():
    assert plain_v1_path("/v1/chat/completions") and plain_v1_path("/v1/responses/resp_1/cancel")
    for bad in ("/v1/../x", "/v1/./x", "/v1//x", "/v1/%2e", "/v1/a\\b", "/v2/x", "/v1"):
        assert not plain_v1_path(bad)


def test_a_stream_is_relayed_chunk_by_chunk(behind):
    url, sock = behind
    body = {**CHAT, "stream": True, "max_tokens": 6}
    with httpx.Client() as c:
        with httpx.Client(transport=httpx.HTTPTransport(uds=str(sock)), base_url="http://fake") as f:
            f.post("/fake/control", json={"chunk_delay_s": 0.2})
        with c.stream("POST", f"{url}/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {KEY}"}, timeout=20) as r:
            assert r.headers["content-type"].startswith("text/event-stream")
            arrivals = [(time.monotonic(), chunk) for chunk in r.iter_raw()]
    text = b"".join(chunk for _, chunk in arrivals)
    assert text.count(b"data: ") == 5 and text.rstrip().endswith(b"data: [DONE]")  # the fake's 4 tokens, then [DONE]
    first_token = next(t for t, chunk in arrivals if b"tok0" in chunk)
    assert arrivals[-1][0] - first_token > 0.5  # the first token came long before the end: not buffered


def test_a_client_that_leaves_aborts_the_request_behind_the_gate(behind):
    url, sock = behind
    with httpx.Client(transport=httpx.HTTPTransport(uds=str(sock)), base_url="http://fake") as f:
        f.post("/fake/control", json={"delay_s": 5})
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{url}/v1/chat/completions", json=CHAT, headers={"Authorization": f"Bearer {KEY}"}, timeout=0.5)
    deadline = time.monotonic() + 10
    while not any(r.get("cancelled") for r in _fake_requests(sock)):
        assert time.monotonic() < deadline, "the model server kept working for a client that left"
        time.sleep(0.1)


def test_health_says_503_when_the_model_server_is_gone(tmp_path):
    gate = GateThread(f"unix:{tmp_path / 'nothing.sock'}", KEY, "127.0.0.1", 0).start()
    try:
        url = f"http://127.0.0.1:{gate.port}"
        assert httpx.get(f"{url}/health").status_code == 503
        r = httpx.post(f"{url}/v1/chat/completions", json=CHAT, headers={"Authorization": f"Bearer {KEY}"})
        assert r.status_code == 502 and "nothing.sock" not in r.text
    finally:
        gate.stop()


def test_an_oversized_request_head_is_refused(behind):
    url, _ = behind
    r = httpx.post(f"{url}/v1/chat/completions", json=CHAT, headers={"Authorization": f"Bearer {KEY}", "x-pad": "a" * 70_000})
    assert r.status_code == 400


def test_a_caller_that_sends_no_request_is_disconnected(tmp_path):
    gate = GateThread(f"unix:{tmp_path / 'nothing.sock'}", KEY, "127.0.0.1", 0, client_idle_s=0.2).start()
    try:
        with socket.create_connection(("127.0.0.1", gate.port), timeout=30) as conn:
            conn.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n")  # a head that never ends
            assert conn.recv(1024) == b""  # closed by the gate, not by this test's timeout (that would raise)
    finally:
        gate.stop()
