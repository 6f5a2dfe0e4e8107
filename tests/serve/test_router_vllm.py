"""The router in front of two real vLLM workers (CPU) on the embedded model: chat, stream, models, and an adapter."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from fedllm.serve.canary_shapes import CHAT, PATHS, answer_text

pytestmark = pytest.mark.vllm

MODEL = "smollm2-135m-instruct"


async def test_chat_stream_models_and_adapter_through_router(vllm_workers, router_factory, embedded_lora_dir):
    from openai import AsyncOpenAI

    router = await router_factory([w.spec for w in vllm_workers], request_timeout_s=120)
    client = AsyncOpenAI(base_url=f"{router.url}/v1", api_key="unused", timeout=120)
    try:
        ids = [m.id async for m in client.models.list()]
        assert ids[0] == MODEL  # then any adapters earlier tests left on the session's workers
        messages = [{"role": "user", "content": "What is the capital of France? Answer in one word."}]
        out = await client.chat.completions.create(model=MODEL, messages=messages, max_tokens=8, temperature=0)
        assert out.choices[0].message.content.strip()
        assert out.model == MODEL
        stream = await client.chat.completions.create(model=MODEL, messages=messages, max_tokens=8, temperature=0, stream=True)
        pieces = [chunk.choices[0].delta.content or "" async for chunk in stream if chunk.choices]
        assert len(pieces) >= 2 and "".join(pieces).strip()

        async with httpx.AsyncClient(base_url=router.url, timeout=120) as c:
            r = await c.post("/admin/adapters", json={"name": "lora-test", "path": str(embedded_lora_dir), "aliases": ["lt"]},
                             headers=router.admin_headers())
            assert r.status_code == 200, r.text
            holder = r.json()["workers"]
            assert len(holder) == 2  # an alias names it: loaded on every eligible worker (serve.replicate_promoted)
        answered = await client.chat.completions.create(model="lt", messages=messages, max_tokens=4, temperature=0)
        assert answered.model == "lora-test"
        assert {"lora-test", "lt"} <= {m.id async for m in client.models.list()}
        async with httpx.AsyncClient(base_url=router.url, timeout=120) as c:
            rows = (await c.get("/admin/workers", headers=router.admin_headers())).json()
            assert sorted(w["id"] for w in rows if "lora-test" in w["adapters"]) == sorted(holder)
            assert (await c.delete("/admin/adapters/lora-test", headers=router.admin_headers())).status_code == 200
    finally:
        await client.close()


async def test_a_joined_real_vllm_worker_passes_its_canary_check(vllm_workers, router_factory):
    # The first worker is trusted (static); the second joins through the join token with its own API key. Same
    # weights, temperature 0: the canary answers agree and the joined worker takes traffic. The checks come from the
    # random timer here (every 0.5 s on average, no delay) instead of among user traffic.
    trusted, joining = vllm_workers
    router = await router_factory([trusted.spec], request_timeout_s=120, canary_prompts=2, policy="round_robin",
                                  canary_interval_s=0.5, canary_delay_s=0)
    # Real vLLM accepts every canary shape (chat, completions, responses; streamed or not; system prompt, seed,
    # temperature 0, a drawn max_tokens), and two workers on the same weights answer it alike.
    checker = router.app.state.canaries
    messages = [{"role": "system", "content": "You are a concise assistant."},
                {"role": "user", "content": "Name two benefits of regular exercise."}]
    texts: dict[tuple[str, bool], list[str]] = {}
    async with httpx.AsyncClient(timeout=120) as c:
        for path in PATHS:
            for stream in (False, True):
                _, body = checker.request(MODEL, messages, path=path, stream=stream)
                replies = [await c.post(f"{w.url}{path}", json=body, headers={"Authorization": f"Bearer {w.api_key}"})
                           for w in (trusted, joining, trusted)]
                assert [r.status_code for r in replies] == [200] * 3, (path, replies[0].text)
                texts[path, stream] = [answer_text(path, r.content, stream) for r in replies]
    for (path, stream), (first, other, again) in texts.items():
        assert first.strip() and first == other == again, (path, stream, first, other, again)
    short, long = sorted([texts[CHAT, True][0], texts[CHAT, False][0]], key=len)
    assert long.startswith(short)  # a streamed canary reads the same (cut at its own drawn max_tokens)
    async with httpx.AsyncClient(base_url=router.url, timeout=120) as c:
        joined = await c.post("/admin/workers", json={"url": joining.url, "api_key": joining.api_key},
                              headers={"Authorization": f"Bearer {router.join_token}"})
        assert joined.status_code == 200, joined.text
        wid = joined.json()["id"]
        for _ in range(600):
            row = next(w for w in (await c.get("/admin/workers", headers=router.admin_headers())).json() if w["id"] == wid)
            if row["canary"] != "pending":  # passed after serve.canary_passes checks, or failed
                break
            await asyncio.sleep(0.2)
        assert (row["canary"], row["quarantined"]) == ("passed", False)
        body = {"model": MODEL, "messages": [{"role": "user", "content": "Say hi."}], "max_tokens": 4, "temperature": 0}
        served = [(await c.post("/v1/chat/completions", json=body)).status_code for _ in range(2)]
        assert served == [200, 200]


async def test_a_worker_joining_after_a_promotion_serves_it_without_a_load_on_the_request_path(vllm_workers, router_factory,
                                                                                            embedded_lora_dir):
    # The first worker is trusted (static) and holds the promoted version; the second, a real worker started the
    # appliance's way (gate + vLLM), joins afterwards, declaring its --max-loras. The router loads the promoted version
    # on it before it takes the alias's traffic; then the trusted one is drained, so the first request for the alias
    # goes to the joiner: it answers from the adapter, and no load happened on the request path.
    trusted, joining = vllm_workers
    router = await router_factory([trusted.spec], request_timeout_s=120, place_adapters_on_joined=True, canary_prompts=0)
    admin = router.admin_headers()
    body = {"model": "promo-latest", "messages": [{"role": "user", "content": "Say hi."}], "max_tokens": 4, "temperature": 0}
    async with httpx.AsyncClient(base_url=router.url, timeout=120) as c:
        r = await c.post("/admin/adapters", json={"name": "promo-v1", "path": str(embedded_lora_dir), "aliases": ["promo-latest"],
                                                  "base_model": MODEL}, headers=admin)
        assert r.status_code == 200, r.text
        try:
            joined = await c.post("/admin/workers", json={"url": joining.url, "api_key": joining.api_key, "max_loras": 2},
                                  headers={"Authorization": f"Bearer {router.join_token}"})
            assert joined.status_code == 200, joined.text
            wid = joined.json()["id"]
            for _ in range(600):
                row = next(a for a in (await c.get("/admin/adapters", headers=admin)).json() if a["name"] == "promo-v1")
                if wid in row["workers"]:
                    break
                await asyncio.sleep(0.2)
            assert wid in row["workers"], row
            trusted_id = next(w for w in r.json()["workers"])
            assert (await c.post(f"/admin/workers/{trusted_id}/drain", headers=admin)).status_code == 200
            first = await c.post("/v1/chat/completions", json=body)
            assert first.status_code == 200, first.text
            row = next(a for a in (await c.get("/admin/adapters", headers=admin)).json() if a["name"] == "promo-v1")
            metrics = (await c.get("/metrics")).text
        finally:
            await c.delete("/admin/adapters/promo-v1", headers=admin)
    assert first.json()["model"] == "promo-v1" and first.json()["choices"][0]["message"]["content"].strip()
    assert _sample(metrics, "router_requests_total", model="promo-v1", worker=wid, status="200") == 1.0  # the joiner answered it
    assert row["loads"] == {"ahead": 2, "request": 0}
    assert _sample(metrics, "router_adapter_loads_when_total", when="request") in (None, 0.0)


def _sample(text: str, name: str, **labels: str) -> float | None:
    """The value of the sample `name` whose labels include `labels` in a Prometheus text exposition."""
    from fedllm.core.contracts.router_metrics import parse

    return next((s.value for s in parse(text) if s.name == name and labels.items() <= s.labels.items()), None)


def _listening_tcp(pids: set[int]) -> set[tuple[str, int]]:
    """The TCP (v4 and v6) addresses the processes `pids` listen on (Linux /proc)."""
    import ipaddress
    import os

    inodes: set[str] = set()
    for pid in pids:
        try:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
                if target.startswith("socket:["):
                    inodes.add(target[8:-1])
        except OSError:
            continue
    found = set()
    for table, width in (("/proc/net/tcp", 4), ("/proc/net/tcp6", 16)):
        for line in open(table).read().splitlines()[1:]:
            fields = line.split()
            if fields[3] != "0A" or fields[9] not in inodes:  # 0A: LISTEN
                continue
            raw_ip, raw_port = fields[1].split(":")
            packed = bytes.fromhex(raw_ip)
            packed = b"".join(packed[i:i + 4][::-1] for i in range(0, width, 4))  # /proc prints 32-bit words host-endian
            found.add((str(ipaddress.ip_address(packed)), int(raw_port, 16)))
    return found


def _process_tree(root: int) -> set[int]:
    import os

    parents: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                parents[int(entry)] = int(open(f"/proc/{entry}/stat").read().rsplit(")", 1)[1].split()[1])
            except OSError:
                pass
    tree, grew = {root}, True
    while grew:
        grew = False
        for pid, parent in parents.items():
            if parent in tree and pid not in tree:
                tree.add(pid)
                grew = True
    return tree


async def test_a_real_worker_answers_only_v1_with_its_key_and_vllm_is_not_reachable(vllm_workers, router_factory, embedded_lora_dir):
    # A worker as `appliance worker start` runs it (VLLMWorker: vLLM on a private socket, the gate on the worker's
    # address), reached directly at its advertised host:port.
    worker = vllm_workers[0]
    chat = {"model": MODEL, "messages": [{"role": "user", "content": "Say hi."}], "max_tokens": 4, "temperature": 0}
    lora = {"name": "swapped", "src": str(embedded_lora_dir)}
    keyed = {"Authorization": f"Bearer {worker.api_key}"}
    async with httpx.AsyncClient(base_url=worker.url, timeout=120) as c:
        assert (await c.post("/v1/chat/completions", json=chat)).status_code == 401
        for headers in ({}, keyed):  # the rest of vLLM's routes answer nobody, key or not
            assert (await c.post("/invocations", json=chat, headers=headers)).status_code == 404
            assert (await c.post("/adapters", json=lora, headers=headers)).status_code == 404
            assert (await c.delete("/adapters/swapped", headers=headers)).status_code == 404
            assert (await c.get("/metrics", headers=headers)).status_code == 404
        assert (await c.post("/v1/chat/completions", json=chat, headers=keyed)).status_code == 200
    # vLLM's own processes listen on loopback only (its HTTP server on a Unix socket, not on any port).
    vllm_listens = _listening_tcp(_process_tree(worker.pid))
    assert all(ip in ("127.0.0.1", "::1") for ip, _ in vllm_listens), vllm_listens
    assert worker.port not in {port for _, port in vllm_listens}
    assert "--uds" in worker.argv and "--port" not in worker.argv
    # The router, with the key, is served.
    router = await router_factory([worker.spec], request_timeout_s=120)
    async with httpx.AsyncClient(base_url=router.url, timeout=120) as c:
        assert (await c.post("/v1/chat/completions", json=chat)).status_code == 200
