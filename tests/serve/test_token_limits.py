"""Token limits cannot be bypassed: both spellings of the cap, `n`/`best_of`, and streams settled from their usage."""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import pytest

from fedllm.serve.keys import create_key
from fedllm.serve.limits import DEFAULT_TOKEN_BUDGET, RateLimiter, TokenBucket, token_budget
from fedllm.serve.protocol import read_fields
from fedllm.serve.sse import complete_events, take_usage, with_usage_asked

MESSAGES = [{"role": "user", "content": "hi"}]


# ---------------------------------------------------------------- pure pieces
def test_read_fields_takes_the_larger_cap_and_the_larger_choice_count():
    # Arrange / Act / Assert: each spelling alone, both (the larger wins either way), n and best_of.
    assert read_fields({"model": "m", "max_tokens": 7}).max_tokens == 7
    assert read_fields({"model": "m", "max_completion_tokens": 9}).max_tokens == 9
    assert read_fields({"model": "m", "max_tokens": 1, "max_completion_tokens": 900}).max_tokens == 900
    assert read_fields({"model": "m", "max_tokens": 900, "max_completion_tokens": 1}).max_tokens == 900
    assert read_fields({"model": "m"}).max_tokens is None
    assert read_fields({"model": "m", "n": 3}).choices == 3
    assert read_fields({"model": "m", "n": 2, "best_of": 5}).choices == 5
    assert read_fields({"model": "m", "stream": True, "stream_options": {"include_usage": True}}).stream_usage is True
    assert read_fields({"model": "m", "stream_options": {"include_usage": True}}).stream_usage is False  # not a stream
    for bad in ({"n": 0}, {"n": "2"}, {"best_of": 1.5}, {"max_completion_tokens": -1}, {"max_tokens": True}):
        with pytest.raises(ValueError, match="must be an integer"):
            read_fields({"model": "m", **bad})


def test_token_budget_multiplies_the_cap_by_the_choices_and_defaults_when_absent():
    assert token_budget(100, 3) == 300
    assert token_budget(None, 1) == DEFAULT_TOKEN_BUDGET
    assert token_budget(None, 2, default=10) == 20


def test_a_debt_is_kept_until_refills_pay_it_back():
    # Arrange: a 60/min bucket charged 10, then settled at 100 used (90 more than charged).
    limiter = RateLimiter()
    assert limiter.admit("k", None, 60, 10, now=0.0) == 0.0
    limiter.settle("k", 60, 10, 100, now=0.0)
    # Act / Assert: level is -40; one token needs 41 s of refill (a negative level is a debt, not an empty bucket).
    assert limiter.admit("k", None, 60, 1, now=0.0) == pytest.approx(41.0)
    assert limiter.admit("k", None, 60, 1, now=41.0) == 0.0
    bucket = TokenBucket(60)
    bucket.take(100, now=0.0)
    assert bucket.wait_s(1, now=0.0) == pytest.approx(41.0)


def test_take_usage_finds_the_usage_chunk_and_strips_it_only_when_asked():
    content = b'data: {"choices":[{"index":0,"delta":{"content":"x"}}]}\n\n'
    usage = b'data: {"choices":[],"usage":{"prompt_tokens":3,"completion_tokens":2,"total_tokens":5}}\n\n'
    done = b"data: [DONE]\n\n"
    assert take_usage(content + usage + done, strip=True) == (content + done, 5)
    assert take_usage(content + usage + done, strip=False) == (content + usage + done, 5)
    nulls = b'data: {"choices":[{"index":0,"delta":{"content":"x"}}],"usage":null}\n\n'  # OpenAI's style
    assert take_usage(nulls + done, strip=True) == (nulls + done, None)
    assert take_usage(usage, strip=True) == (b"", 5)  # alone in its chunk
    assert take_usage(nulls + usage + done, strip=True) == (nulls + done, 5)


def test_usage_is_asked_for_by_splicing_the_body():
    body = json.dumps({"model": "m", "stream": True, "messages": MESSAGES}).encode() + b"  \n"
    assert json.loads(with_usage_asked(body)) == {"model": "m", "stream": True, "messages": MESSAGES,
                                                    "stream_options": {"include_usage": True}}


def test_events_split_across_chunks_wait_for_their_end():
    assert complete_events(b'data: {"a"') == (b"", b'data: {"a"')
    assert complete_events(b"data: 1\n\ndata: 2") == (b"data: 1\n\n", b"data: 2")
    assert complete_events(b"data: 1\n\n") == (b"data: 1\n\n", b"")


# ---------------------------------------------------------------- on a real router and fake worker
async def _router_with_key(fake_factory, router_factory, tmp_path, tpm: int, **serve):
    home = tmp_path / "limits"
    key = create_key(home / "keys", "metered", tpm=tpm)
    fake = fake_factory("m")
    router = await router_factory([fake], home=home, **serve)
    return fake, router, {"Authorization": f"Bearer {key}"}


async def _while_one_is_in_flight(c: httpx.AsyncClient, fake, auth: dict, first: dict, second: dict) -> tuple[int, int]:
    """Send `first` (the worker holds it for a while), wait until the worker has it, then send `second`."""
    fake.control(delay_s=2.0)
    task = asyncio.create_task(c.post("/v1/chat/completions", json={"model": "m", "messages": MESSAGES, **first}, headers=auth))
    deadline = time.monotonic() + 10
    while not await asyncio.to_thread(fake.received) and time.monotonic() < deadline:
        await asyncio.sleep(0.02)
    r2 = await c.post("/v1/chat/completions", json={"model": "m", "messages": MESSAGES, **second}, headers=auth)
    r1 = await task
    fake.control(delay_s=0.0)
    return r1.status_code, r2.status_code


async def test_max_completion_tokens_is_charged_even_beside_a_small_max_tokens(fake_factory, router_factory, tmp_path):
    fake, router, auth = await _router_with_key(fake_factory, router_factory, tmp_path, tpm=100)
    async with httpx.AsyncClient(base_url=router.url, timeout=30) as c:
        # The worker may generate 90 tokens (vLLM honours max_completion_tokens), so 90 are held while it runs.
        codes = await _while_one_is_in_flight(c, fake, auth, {"max_tokens": 1, "max_completion_tokens": 90}, {"max_tokens": 20})
    assert codes == (200, 429)


async def test_n_multiplies_the_charge(fake_factory, router_factory, tmp_path):
    fake, router, auth = await _router_with_key(fake_factory, router_factory, tmp_path, tpm=100)
    async with httpx.AsyncClient(base_url=router.url, timeout=30) as c:
        assert await _while_one_is_in_flight(c, fake, auth, {"max_tokens": 30, "n": 3}, {"max_tokens": 20}) == (200, 429)
    # best_of counts as n does
    fake2, router2, auth2 = await _router_with_key(fake_factory, router_factory, tmp_path / "b", tpm=100)
    async with httpx.AsyncClient(base_url=router2.url, timeout=30) as c:
        assert await _while_one_is_in_flight(c, fake2, auth2, {"max_tokens": 30, "best_of": 3}, {"max_tokens": 20}) == (200, 429)


async def test_the_per_request_cap_counts_both_spellings_and_n(fake_factory, router_factory, tmp_path):
    fake = fake_factory("m")
    router = await router_factory([fake], home=tmp_path / "cap", max_tokens_cap=50)
    async with httpx.AsyncClient(base_url=router.url) as c:
        post = lambda **kw: c.post("/v1/chat/completions", json={"model": "m", "messages": MESSAGES, **kw})  # noqa: E731
        assert (await post(max_tokens=50)).status_code == 200
        for body in ({"max_tokens": 1, "max_completion_tokens": 4000}, {"max_completion_tokens": 51}, {"max_tokens": 20, "n": 3}):
            r = await post(**body)
            assert r.status_code == 400 and "serve.max_tokens_cap" in r.json()["error"]["message"], (body, r.text)
        assert (await post(n=1000)).status_code == 400  # no cap given: the default per choice, times n


async def test_a_stream_is_settled_from_its_usage_chunk_which_the_client_sees_only_if_asked(fake_factory, router_factory, tmp_path):
    fake, router, auth = await _router_with_key(fake_factory, router_factory, tmp_path, tpm=1000)
    long_prompt = [{"role": "user", "content": "word " * 2000}]  # about 2000 prompt tokens, far over the key's minute
    async with httpx.AsyncClient(base_url=router.url, timeout=30) as c:
        r = await c.post("/v1/chat/completions", headers=auth,
                         json={"model": "m", "messages": long_prompt, "max_tokens": 10, "stream": True})
        assert r.status_code == 200
        assert '"usage"' not in r.text and r.text.rstrip().endswith("data: [DONE]")  # the client did not ask for it
        assert r.text.count("tok") == 4
        # The stream used ~2009 tokens: the key is in debt, so even a small request must wait now.
        r = await c.post("/v1/chat/completions", headers=auth, json={"model": "m", "messages": MESSAGES, "max_tokens": 10})
        assert r.status_code == 429 and int(r.headers["retry-after"]) >= 1


async def test_a_client_that_asks_for_usage_gets_it_and_is_settled_too(fake_factory, router_factory, tmp_path):
    fake, router, auth = await _router_with_key(fake_factory, router_factory, tmp_path, tpm=1000)
    async with httpx.AsyncClient(base_url=router.url, timeout=30) as c:
        r = await c.post("/v1/chat/completions", headers=auth,
                         json={"model": "m", "messages": [{"role": "user", "content": "word " * 2000}], "max_tokens": 10,
                               "stream": True, "stream_options": {"include_usage": True}})
        events = [json.loads(line[6:]) for line in r.text.splitlines() if line.startswith("data: {")]
        assert events[-1]["choices"] == [] and events[-1]["usage"]["total_tokens"] == 5 + 2000 + 4
        r = await c.post("/v1/chat/completions", headers=auth, json={"model": "m", "messages": MESSAGES, "max_tokens": 10})
        assert r.status_code == 429


async def test_unmetered_streams_are_relayed_untouched(fake_factory, router_factory, tmp_path):
    fake = fake_factory("m")
    router = await router_factory([fake], home=tmp_path / "open")
    async with httpx.AsyncClient(base_url=router.url, timeout=30) as c:
        r = await c.post("/v1/chat/completions", json={"model": "m", "messages": MESSAGES, "stream": True})
        assert '"usage"' not in r.text and r.text.count("tok") == 4


async def test_a_stream_with_other_stream_options_is_settled_too(fake_factory, router_factory, tmp_path):
    fake, router, auth = await _router_with_key(fake_factory, router_factory, tmp_path, tpm=1000)
    async with httpx.AsyncClient(base_url=router.url, timeout=30) as c:
        r = await c.post("/v1/chat/completions", headers=auth,
                         json={"model": "m", "messages": [{"role": "user", "content": "word " * 2000}], "max_tokens": 10,
                               "stream": True, "stream_options": {"include_usage": False}})
        assert r.status_code == 200 and '"usage"' not in r.text
        r = await c.post("/v1/chat/completions", headers=auth, json={"model": "m", "messages": MESSAGES, "max_tokens": 10})
        assert r.status_code == 429


# ---------------------------------------------------------------- budgets that hold (issue 19: token budgets)
def test_a_prompt_list_multiplies_the_completions_and_the_prompt_is_estimated():
    from fedllm.serve.limits import prompt_estimate

    # Arrange / Act / Assert: each prompt of a list is answered n times; a list of token ids is one prompt.
    assert read_fields({"model": "m", "prompt": ["a", "b", "c"], "n": 2}).choices == 6
    assert read_fields({"model": "m", "prompt": [[1, 2], [3]]}).choices == 2
    assert read_fields({"model": "m", "prompt": [1, 2, 3]}).choices == 1
    assert read_fields({"model": "m", "prompt": "one"}).choices == 1
    assert prompt_estimate(4000) == 1001  # about four bytes of JSON per token, settled later
    assert token_budget(10, 2, prompt_tokens=7) == 27


async def test_a_metered_request_without_max_tokens_gets_the_cap_it_was_charged(fake_factory, router_factory, tmp_path):
    # Arrange: a worker that would generate 500 tokens; a metered key; the router's default cap is 7.
    home = tmp_path / "cap"
    key = create_key(home / "keys", "metered", tpm=100_000)
    fake = fake_factory("m", "--chunks", "500")
    router = await router_factory([fake], home=home, default_max_tokens=7)
    async with httpx.AsyncClient(base_url=router.url, timeout=30) as c:
        # Act
        r = await c.post("/v1/chat/completions", json={"model": "m", "messages": MESSAGES},
                         headers={"Authorization": f"Bearer {key}"})
        streamed = await c.post("/v1/responses", json={"model": "m", "input": "hi"}, headers={"Authorization": f"Bearer {key}"})
    # Assert: the worker was given max_tokens=7 (max_output_tokens on the Responses API), not left unbounded.
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 7, r.text
    assert streamed.status_code == 200 and streamed.json()["usage"]["output_tokens"] == 7, streamed.text


async def test_prompt_lists_and_prompt_tokens_are_charged_up_front(fake_factory, router_factory, tmp_path):
    fake, router, auth = await _router_with_key(fake_factory, router_factory, tmp_path, tpm=400)
    async with httpx.AsyncClient(base_url=router.url, timeout=30) as c:
        # Ten prompts of 20 tokens each: 200 completion tokens are held while it runs (charged 20 on earlier code).
        fake.control(delay_s=2.0)
        task = asyncio.create_task(c.post("/v1/completions", headers=auth,
                                          json={"model": "m", "prompt": ["p"] * 10, "max_tokens": 20}))
        await _until_received(fake)
        r2 = await c.post("/v1/completions", headers=auth, json={"model": "m", "prompt": "p", "max_tokens": 250})
        assert (await task).status_code == 200 and r2.status_code == 429
        fake.control(delay_s=0.0)
    # A long prompt is charged before the worker counts it: the next request waits (earlier code charged 10).
    fake2, router2, auth2 = await _router_with_key(fake_factory, router_factory, tmp_path / "b", tpm=1000)
    async with httpx.AsyncClient(base_url=router2.url, timeout=30) as c:
        codes = await _while_one_is_in_flight(c, fake2, auth2, {"messages": [{"role": "user", "content": "word " * 900}],
                                                                "max_tokens": 10}, {"max_tokens": 10})
    assert codes == (200, 429)
    # The per-request cap counts every prompt of a list.
    fake3 = fake_factory("m")
    router3 = await router_factory([fake3], home=tmp_path / "c", max_tokens_cap=100)
    async with httpx.AsyncClient(base_url=router3.url) as c:
        r = await c.post("/v1/completions", json={"model": "m", "prompt": ["p"] * 11, "max_tokens": 10})
        assert r.status_code == 400 and "serve.max_tokens_cap" in r.json()["error"]["message"]


async def _until_received(fake, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not await asyncio.to_thread(fake.received) and time.monotonic() < deadline:
        await asyncio.sleep(0.02)


async def test_a_stream_the_client_leaves_is_settled_from_what_was_relayed(fake_factory, router_factory, tmp_path):
    # Arrange: a key of 1200 tokens a minute; a slow stream that may generate 1000 tokens (charged ~1000 up front).
    fake, router, auth = await _router_with_key(fake_factory, router_factory, tmp_path, tpm=1200)
    fake.control(chunk_delay_s=0.2)
    async with httpx.AsyncClient(base_url=router.url, timeout=30) as c:
        # Act: read two events, then leave before the usage chunk.
        async with c.stream("POST", "/v1/chat/completions", headers=auth,
                            json={"model": "m", "messages": MESSAGES, "max_tokens": 1000, "stream": True}) as r:
            events = 0
            async for line in r.aiter_lines():
                events += line.startswith("data: {")
                if events == 2:
                    break
        fake.control(chunk_delay_s=0.0)
        await asyncio.sleep(0.5)  # the router notices the disconnect at its next chunk
        # Assert: only what was relayed stays charged, so 500 more tokens fit now (earlier code kept all 1000).
        r = await c.post("/v1/chat/completions", headers=auth, json={"model": "m", "messages": MESSAGES, "max_tokens": 500})
    assert r.status_code == 200, r.text
