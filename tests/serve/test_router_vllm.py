"""The router in front of two real vLLM workers (CPU) on the embedded model: chat, stream, models, and an adapter."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from serve.canary_shapes import CHAT, PATHS, answer_text

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
            assert len(holder) == 1
        answered = await client.chat.completions.create(model="lt", messages=messages, max_tokens=4, temperature=0)
        assert answered.model == "lora-test"
        assert {"lora-test", "lt"} <= {m.id async for m in client.models.list()}
        async with httpx.AsyncClient(base_url=router.url, timeout=120) as c:
            rows = (await c.get("/admin/workers", headers=router.admin_headers())).json()
            assert [w["id"] for w in rows if "lora-test" in w["adapters"]] == holder
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
