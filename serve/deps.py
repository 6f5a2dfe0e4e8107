"""Request dependencies of the admin routes: bearer-token checks, then a bounded JSON body.

Routes declare the token check in `dependencies=[...]` and take their body through `json_body(Model)`, never as a
plain pydantic parameter: FastAPI reads and parses plain body parameters before it runs any dependency, so a caller
without a token could make the router read and parse an unbounded body. Route dependencies run first, in order, so
the token is checked (in constant time) before a byte of the body is read, and the body is then read only up to
`serve.max_admin_body_bytes` (413 beyond).
"""

from __future__ import annotations

from typing import Any, Awaitable, Callable, TypeVar

from fastapi import Request
from pydantic import BaseModel, ValidationError

from fedllm.core.secrets import same_secret
from fedllm.serve.errors import RouterError

_loads: Callable[[bytes | str], Any]
try:
    from orjson import loads as _loads
except ImportError:  # pragma: no cover
    from json import loads as _loads

M = TypeVar("M", bound=BaseModel)


def bearer(request: Request) -> str:
    """The bearer token of the request ("" when there is none)."""
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    return token.strip() if scheme.lower() == "bearer" else ""


def require_admin(request: Request) -> None:
    """Allow only the admin token.

    Raises:
        RouterError: 401 without a valid admin token.
    """
    if not same_secret(bearer(request), request.app.state.admin_token):
        raise RouterError(
            401,
            "this admin route needs `Authorization: Bearer <admin token>` "
            "(printed by `appliance up`, stored in keys/admin_token)",
        )


def require_admin_or_join(request: Request) -> None:
    """Allow the admin token or the join token (worker registration).

    Raises:
        RouterError: 401 without a valid admin or join token.
    """
    token = bearer(request)
    state = request.app.state
    # Both comparisons always run: how long the check takes says nothing about which token was close.
    admin, join = same_secret(token, state.admin_token), same_secret(token, state.join_token)
    if not (admin or join):
        raise RouterError(
            401, "worker registration needs `Authorization: Bearer <join token>` (keys/join_token on the router)"
        )


def require_worker_or_admin(request: Request, worker_id: str) -> None:
    """Allow the admin token or the secret the router gave worker `worker_id` when it joined.

    Raises:
        RouterError: 401 without either; 404 (for the admin, or a caller that does not hold any worker's secret)
            when no worker has that id.
    """
    token = bearer(request)
    state = request.app.state
    admin = same_secret(token, state.admin_token)
    worker = state.registry.workers.get(worker_id)
    if admin or (worker is not None and worker.owns(token)):
        return
    if worker is None:
        raise RouterError(404, f"no worker with id {worker_id!r}; join again")
    raise RouterError(
        401,
        f"this route needs `Authorization: Bearer <worker {worker_id}'s secret>` "
        "(answered when it joined) or the admin token",
    )


async def read_bounded(request: Request, limit: int) -> bytes:
    """The request body, read only up to `limit` bytes.

    Raises:
        RouterError: 413 when the declared or the actual body is larger than `limit`.
    """
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise RouterError(
            413,
            f"request body of {declared} bytes exceeds the admin limit of {limit} bytes (serve.max_admin_body_bytes)",
        )
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise RouterError(
                413, f"request body exceeds the admin limit of {limit} bytes (serve.max_admin_body_bytes)"
            )
    return bytes(body)


def json_body(model: type[M]) -> Callable[[Request], Awaitable[M]]:
    """A dependency that reads the body (bounded by `serve.max_admin_body_bytes`) and validates it as `model`.

    Raises (from the dependency):
        RouterError: 413 too large, 400 not JSON or not a valid `model` (the message names the fields).
    """

    async def dependency(request: Request) -> M:
        raw = await read_bounded(request, request.app.state.settings.serve.max_admin_body_bytes)
        try:
            data: Any = _loads(raw)
        except ValueError as exc:
            raise RouterError(400, "the request body is not valid JSON") from exc
        try:
            return model.model_validate(data)
        except ValidationError as exc:
            problems = "; ".join(f"{'.'.join(str(p) for p in e['loc']) or 'body'}: {e['msg']}" for e in exc.errors())
            raise RouterError(400, f"invalid request: {problems}") from exc

    dependency.__name__ = f"json_body_{model.__name__}"
    return dependency
