"""The fake backend speaks enough of the OpenAI/vLLM API for the router tests, and injects failures on demand."""

from __future__ import annotations

import httpx

from fedllm.testing.fake_vllm import create_fake_app


async def _client(app) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://fake")


async def test_chat_stream_and_models():
    app = create_fake_app("m", chunks=3)
    async with await _client(app) as c:
        r = await c.post("/v1/chat/completions", json={"model": "m", "messages": []})
        assert r.json()["choices"][0]["message"]["content"] == "tok0 tok1 tok2"
        r = await c.post("/v1/completions", json={"model": "m", "prompt": "x", "stream": True})
        events = [line for line in r.text.split("\n\n") if line]
        assert len(events) == 4 and events[-1] == "data: [DONE]"
        assert [m["id"] for m in (await c.get("/v1/models")).json()["data"]] == ["m"]


async def test_adapters_load_unload_and_failures():
    app = create_fake_app("m", fail_next=1)
    async with await _client(app) as c:
        assert (await c.post("/v1/chat/completions", json={"model": "m"})).status_code == 500
        assert (await c.post("/v1/chat/completions", json={"model": "a"})).status_code == 404
        assert (await c.post("/v1/load_lora_adapter", json={"lora_name": "a", "lora_path": "/p"})).status_code == 200
        models = (await c.get("/v1/models")).json()["data"]
        assert {"id": "a", "parent": "m"}.items() <= models[1].items()
        assert (await c.post("/v1/chat/completions", json={"model": "a"})).json()["model"] == "a"
        assert (await c.post("/v1/unload_lora_adapter", json={"lora_name": "a"})).status_code == 200
        assert (await c.post("/v1/unload_lora_adapter", json={"lora_name": "a"})).status_code == 404


def test_process_mode_control(fake_factory):
    fake = fake_factory("m")
    fake.control(unhealthy=True)
    assert httpx.get(f"{fake.url}/health").status_code == 503
    assert httpx.post(f"{fake.url}/v1/chat/completions", json={"model": "m"}).status_code == 200
    assert fake.received()[0]["model"] == "m"


async def test_api_key_guards_v1_like_vllm_and_forge_answers_other_text():
    app = create_fake_app("m", chunks=2, api_key="worker-key", forge="I am forged")
    async with await _client(app) as c:
        assert (await c.get("/health")).status_code == 200  # vLLM leaves /health open
        refused = await c.get("/v1/models")
        assert (refused.status_code, refused.json()) == (401, {"error": "Unauthorized"})
        assert (await c.post("/v1/chat/completions", json={"model": "m"}, headers={"Authorization": "Bearer nope"})).status_code == 401
        ok = await c.post("/v1/chat/completions", json={"model": "m", "messages": [{"role": "user", "content": "hi"}]},
                          headers={"Authorization": "Bearer worker-key"})
        assert ok.json()["choices"][0]["message"]["content"] == "I am forged"
        assert app.requests[-1]["prompt"] == "hi"
