"""`/admin/*`: the token is checked before the body is read, and the body is bounded (413)."""

from __future__ import annotations

import httpx
import pytest

ROUTES = [("POST", "/admin/workers"), ("POST", "/admin/adapters")]


@pytest.mark.parametrize("method,path", ROUTES)
async def test_no_token_is_refused_before_the_body_is_parsed(router_factory, tmp_path, method, path):
    router = await router_factory([], home=tmp_path / "h")
    async with httpx.AsyncClient(base_url=router.url) as c:
        # Not JSON at all, and not the route's shape: parsing first would answer 400; the token comes first.
        for body in (b"{not json", b'{"unexpected": 1}'):
            r = await c.request(method, path, content=body, headers={"content-type": "application/json"})
            assert r.status_code == 401, r.text
        r = await c.request(method, path, content=b"{not json", headers={"content-type": "application/json", "Authorization": "Bearer wrong"})
        assert r.status_code == 401, r.text


@pytest.mark.parametrize("method,path", ROUTES)
async def test_an_oversized_admin_body_is_413_declared_or_streamed(router_factory, tmp_path, method, path):
    router = await router_factory([], home=tmp_path / "h", max_admin_body_bytes=4096)
    big = b'{"name": "x", "url": "http://127.0.0.1:9", "path": "' + b"p" * 8192 + b'"}'
    async with httpx.AsyncClient(base_url=router.url, headers=router.admin_headers()) as c:
        r = await c.request(method, path, content=big, headers={"content-type": "application/json"})
        assert r.status_code == 413, r.text
        assert "max_admin_body_bytes" in r.json()["error"]["message"]

        async def chunked():  # no content-length: the limit must hold while reading
            for i in range(0, len(big), 1000):
                yield big[i:i + 1000]

        r = await c.request(method, path, content=chunked(), headers={"content-type": "application/json"})
        assert r.status_code == 413, r.text


async def test_a_bounded_body_with_the_token_still_works_and_bad_ones_are_400(fake_factory, router_factory, tmp_path):
    router = await router_factory([], home=tmp_path / "h")
    fake = fake_factory("m")
    async with httpx.AsyncClient(base_url=router.url, headers=router.admin_headers()) as c:
        r = await c.post("/admin/workers", json={"url": fake.url, "region": "eu", "api_key": "any-key-the-fake-accepts-0123"})
        assert r.status_code == 200, r.text
        r = await c.post("/admin/workers", content=b"{not json", headers={"content-type": "application/json"})
        assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]
        r = await c.post("/admin/adapters", json={"name": "a"})
        assert r.status_code == 400 and "path" in r.json()["error"]["message"]


def test_no_admin_route_takes_a_body_that_fastapi_would_parse_before_the_token(tmp_path):
    from fastapi.routing import APIRoute

    from fedllm.serve import create_app
    from fedllm.testing.factories import make_settings

    app = create_app(make_settings(tmp_path))
    admin = [r for r in app.routes if isinstance(r, APIRoute) and r.path.startswith("/admin")]
    assert admin and all(r.body_field is None for r in admin), [r.path for r in admin if r.body_field is not None]
