"""The coordinator's status endpoint: `GET /status` (the status document of docs/CONTRACTS.md) and `GET /health`,
over HTTPS with federation.tls_cert/tls_key, else plain HTTP. Bound beyond loopback, `/status` needs the status
token (keys/status_token, `Authorization: Bearer TOKEN`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable

from fedllm.core.net import connectable_host, is_loopback

if TYPE_CHECKING:
    from fedllm.core.settings import ApplianceSettings


class StatusServer:
    """Serves `status()` (a callable returning the status document): `await start()`, then `await stop()`."""

    def __init__(self, settings: ApplianceSettings, status: Callable[[], dict[str, Any]]) -> None:
        self.settings, self.cfg, self.status = settings, settings.federation, status
        self.status_url: str | None = None
        self._status_runner: Any = None  # an aiohttp AppRunner once started (aiohttp is imported then)

    async def start(self) -> str:
        """Bind the status server; returns its `/status` URL."""
        await self._start_status_server()
        assert self.status_url is not None  # set by a successful start
        return self.status_url

    async def stop(self) -> None:
        """Stop serving."""
        if self._status_runner is not None:
            await self._status_runner.cleanup()
            self._status_runner = None

    def _status_token(self) -> str | None:
        """The status token `/status` requires when bound beyond loopback (None on a loopback bind)."""
        if is_loopback(self.cfg.bind_host):
            return None
        from fedllm.core.tokens import coordinator_status_token

        return coordinator_status_token(self.settings)

    async def _start_status_server(self) -> None:
        from aiohttp import web

        from fedllm.core.secrets import same_secret
        from fedllm.core.tls import server_context

        token = self._status_token()

        async def status(request: web.Request) -> web.Response:
            if token is not None:
                given = request.headers.get("Authorization", "").removeprefix("Bearer ").strip()
                if not given or not same_secret(given, token):
                    return web.json_response(
                        {
                            "error": "the coordinator's /status needs its status token (keys/status_token, "
                            "Authorization: Bearer TOKEN) when it binds beyond loopback"
                        },
                        status=401,
                    )
            return web.json_response(self.status())

        async def health(_request: web.Request) -> web.Response:
            return web.json_response({"status": "ok"})

        app = web.Application()
        app.router.add_get("/status", status)
        app.router.add_get("/health", health)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        # HTTPS with federation.tls_cert/tls_key (fedllm.core.tls), else plain HTTP.
        tls = server_context(self.cfg.tls_cert, self.cfg.tls_key) if self.cfg.tls_cert is not None else None
        site = web.TCPSite(runner, self.cfg.bind_host, self.cfg.status_port, ssl_context=tls)
        await site.start()
        self._status_runner = runner
        port = runner.addresses[0][1]
        self.status_url = f"{self.cfg.scheme}://{connectable_host(self.cfg.bind_host)}:{port}/status"
