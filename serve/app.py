"""The router app: `create_app(settings)` builds it, `run_router(settings)` serves it with uvicorn.

The completion routes are the hot path: `RouterApp.__call__` hands them to `Forwarder.handle` as raw ASGI, before
any framework layer. Everything else (models, health, metrics, the admin API) is ordinary FastAPI, whose exception
handlers turn every error into OpenAI's `{"error": {...}}` shape.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
from typing import TYPE_CHECKING, AsyncIterator

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import Request
from starlette.responses import Response

from fedllm.core.errors import ConfigError
from fedllm.core.net import is_loopback
from fedllm.core.secrets import ensure_token
from fedllm.core.tls import check_public_bind, check_server_files, client_context
from fedllm.core.tokens import router_admin_token
from fedllm.serve.canary import CanaryChecker
from fedllm.serve.errors import RouterError
from fedllm.serve.forwarding import Forwarder
from fedllm.serve.keys import KeyStore
from fedllm.serve.metrics import RouterMetrics
from fedllm.serve.placement import AdapterPlacement
from fedllm.serve.protocol import error_body
from fedllm.serve.publications import PublicationStore
from fedllm.serve.quarantine import QuarantineBook
from fedllm.serve.registry import WorkerRegistry
from fedllm.serve.replicas import ReplicaKeeper
from fedllm.serve.residency import RegionBook
from fedllm.serve.routes import admin, openai

if TYPE_CHECKING:
    from fedllm.core.settings import ApplianceSettings

logger = logging.getLogger(__name__)


def _error_response(
    status: int, message: str, *, param: str | None = None, retry_after_s: float | None = None
) -> Response:
    headers = {"retry-after": str(max(1, math.ceil(retry_after_s)))} if retry_after_s is not None else None
    return Response(error_body(status, message, param=param), status, headers=headers, media_type="application/json")


async def _router_error(request: Request, exc: RouterError) -> Response:
    return _error_response(exc.status, exc.message, param=exc.param, retry_after_s=exc.retry_after_s)


async def _http_error(request: Request, exc: StarletteHTTPException) -> Response:
    return _error_response(exc.status_code, str(exc.detail))


async def _validation_error(request: Request, exc: RequestValidationError) -> Response:
    problems = "; ".join(f"{'.'.join(str(p) for p in e.get('loc', ()))}: {e.get('msg')}" for e in exc.errors())
    return _error_response(400, f"invalid request: {problems}")


HOT_PATHS = frozenset({"/v1/chat/completions", "/v1/completions", "/v1/responses"})


class RouterApp(FastAPI):
    """FastAPI, except that completion requests go straight to the forwarder (raw ASGI, no middleware)."""

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST" and scope["path"] in HOT_PATHS:
            await self.state.forwarder.handle(scope, receive, send, scope["path"])
            return
        await super().__call__(scope, receive, send)


def create_app(settings: ApplianceSettings, *, registry: WorkerRegistry | None = None) -> RouterApp:
    """Build the router for `settings` (its `serve` section, `keys_dir` for tokens and API keys).

    Args:
        settings: the appliance settings.
        registry: a worker registry to use instead of a fresh one built from `settings.serve.workers`.

    Returns:
        The ASGI app. Its lifespan opens the upstream HTTP client and starts the health checks.
    """
    cfg = settings.serve
    metrics = RouterMetrics()
    registry = registry or WorkerRegistry(cfg)
    for spec in cfg.workers:
        registry.add_static(
            spec.url,
            region=spec.region,
            models=spec.models,
            api_key=spec.api_key.get_secret_value() if spec.api_key else None,
            max_loras=spec.max_loras,
        )
    placement = AdapterPlacement(
        cfg, registry, metrics, PublicationStore(settings.home / "router" / "publications.json")
    )
    try:
        restored = placement.store.restore(placement)
    except RouterError as exc:
        raise ConfigError(exc.message) from exc
    replicas = ReplicaKeeper(cfg, registry, placement)
    registry.quarantine = QuarantineBook(settings.keys_dir)
    registry.regions = RegionBook(settings.home / "router" / "worker_regions.json")
    canaries = CanaryChecker(cfg, registry, registry.quarantine)
    keys = KeyStore(
        settings.keys_dir,
        [k.get_secret_value() for k in cfg.api_keys],
        cfg.default_rpm,
        cfg.default_tpm,
        public=not is_loopback(cfg.host),
        require=cfg.require_keys,
    )
    forwarder = Forwarder(cfg, registry, placement, metrics, keys)
    forwarder.on_routed = canaries.on_routed
    # A removed worker leaves nothing behind: metric series, hedging windows, load locks, its canary check.
    registry.on_remove += [forwarder.forget_worker, placement.forget_worker, canaries.forget, replicas.forget]
    worker_tls = client_context(settings.tls_ca_file)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        import aiohttp

        # Calls to workers over HTTPS verify their certificates (system store, or the private CA of tls_ca_file).
        connector = aiohttp.TCPConnector(limit=0, ttl_dns_cache=300, keepalive_timeout=60, ssl=worker_tls)
        own_session = registry.session is None
        if own_session:
            registry.session = aiohttp.ClientSession(connector=connector, auto_decompress=False)
        await registry.start()
        await canaries.start()
        placing = asyncio.create_task(placement.place_restored(restored))
        replicas.start()
        logger.info(
            "router ready: %d worker(s), %d healthy, policy %s",
            len(registry.workers),
            len(registry.healthy()),
            cfg.policy,
        )
        try:
            yield
        finally:
            placing.cancel()
            await replicas.stop()
            await canaries.stop()
            await registry.stop()
            if own_session:
                await registry.http.close()
                registry.session = None

    app = RouterApp(title="FedLLM Appliance router", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.settings = settings
    app.state.registry = registry
    app.state.placement = placement
    app.state.canaries = canaries
    app.state.replicas = replicas
    app.state.metrics = metrics
    app.state.forwarder = forwarder
    app.state.admin_token = router_admin_token(settings)
    app.state.join_token = ensure_token(settings.keys_dir, "join_token", cfg.join_token)
    # arg-type: Starlette types a handler as taking any Exception; it calls each with the class it was registered for
    app.add_exception_handler(RouterError, _router_error)  # type: ignore[arg-type]
    app.add_exception_handler(StarletteHTTPException, _http_error)  # type: ignore[arg-type]
    app.add_exception_handler(RequestValidationError, _validation_error)  # type: ignore[arg-type]
    app.add_route("/v1/models", openai.list_models, methods=["GET"])
    app.add_route("/health", openai.health, methods=["GET"])
    app.add_route("/metrics", openai.metrics, methods=["GET"])
    app.include_router(admin.router)
    return app


def check_exposure(settings: ApplianceSettings) -> None:
    """Refuse to start listening beyond loopback without API keys (once running, such a router answers 401 to
    every /v1 request while it has none: `KeyStore.public`).

    Raises:
        ConfigError: `serve.host` is not a loopback address and no API key is configured.
    """
    cfg = settings.serve
    if is_loopback(cfg.host):
        return
    if KeyStore(settings.keys_dir, [k.get_secret_value() for k in cfg.api_keys]).empty:
        raise ConfigError(
            f"refusing to listen on {cfg.host}: beyond 127.0.0.1 the router requires API keys; "
            "create one with `appliance keys create --name NAME` or set serve.api_keys"
        )


def run_router(settings: ApplianceSettings) -> None:
    """Serve the router with uvicorn (uvloop and httptools when installed) until interrupted; over HTTPS when
    `serve.tls_cert` and `serve.tls_key` are set.

    Raises:
        ConfigError: the bind address needs API keys and none exist, or the certificate or key cannot be used.
    """
    import uvicorn

    cfg = settings.serve
    check_exposure(settings)
    check_public_bind("router", cfg.host, cfg.tls_cert is not None, settings.env, "serve")
    certfile = keyfile = None
    if cfg.tls_cert is not None:
        check_server_files(cfg.tls_cert, cfg.tls_key)
        certfile, keyfile = str(cfg.tls_cert), str(cfg.tls_key)
    app = create_app(settings)
    loop = "uvloop" if _has("uvloop") else "asyncio"
    http = "httptools" if _has("httptools") else "h11"
    logger.info("router listening on %s://%s:%d", cfg.scheme, cfg.host, cfg.port)
    uvicorn.run(
        app,
        host=cfg.host,
        port=cfg.port,
        loop=loop,
        http=http,
        log_level="warning",
        access_log=False,
        timeout_graceful_shutdown=5,
        ssl_certfile=certfile,
        ssl_keyfile=keyfile,
    )


def _has(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None
