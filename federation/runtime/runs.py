"""Runs after runs: a coordinator whose run has ended keeps serving its status and can start the next run.

`appliance coordinator start --stay` (what `appliance up` runs) does not exit after its last round: `FinishedServer`
takes over the status port and answers `GET /status` with the final status document, its `phase` "finished" and the
way the run ended in `ended` ("done" or "failed"), plus `GET /health`. `POST /runs/next` (always with the status
token, `keys/status_token`: it starts work) starts the next run in the same process:

    {"run": NAME?, "rounds": N?, "strategy": S?, "min_silos": N?, "local_steps": N?}

Without `run` the same run goes on for `rounds` more rounds (default: as many as before) from its last checkpoint, so
its versions keep their numbering and `NAME-latest` keeps its history; a new `run` starts a fresh run (new adapter name,
new alias). It answers 202 `{"run", "rounds"}`, 400 naming a bad field, 401 without the token. Ctrl-C (SIGTERM) ends the
process as before.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from typing import TYPE_CHECKING, Any

from fedllm.core.errors import ConfigError

if TYPE_CHECKING:
    from fedllm.core.settings import ApplianceSettings

logger = logging.getLogger(__name__)

NEXT_FIELDS = {"run": str, "rounds": int, "strategy": str, "min_silos": int, "local_steps": int}


def next_settings(settings: ApplianceSettings, final: dict[str, Any], body: dict[str, Any]) -> ApplianceSettings:
    """The settings of the next run from the finished run's and the request's fields.

    Raises:
        ConfigError: an unknown field, a field of the wrong type, or a value the settings refuse (named).
    """
    if not isinstance(body, dict):
        raise ConfigError("the next run's request must be a JSON object")
    unknown = sorted(set(body) - set(NEXT_FIELDS))
    if unknown:
        raise ConfigError(f"unknown field(s) {', '.join(unknown)}; the next run takes {', '.join(NEXT_FIELDS)}")
    for key, kind in NEXT_FIELDS.items():
        value = body.get(key)
        if value is not None and (not isinstance(value, kind) or isinstance(value, bool)):
            raise ConfigError(f"{key} must be {'a whole number' if kind is int else 'a string'}, not {value!r}")
    fed = settings.federation
    same = not body.get("run") or body["run"] == fed.run_name
    more = body.get("rounds") or (int(final.get("rounds_total") or fed.rounds) if same else fed.rounds)
    if more < 1:
        raise ConfigError(f"rounds must be at least 1, not {more}")
    update = {
        "run_name": body.get("run") or fed.run_name,
        "rounds": int(final.get("completed_rounds") or 0) + more if same else more,
    }
    for key, setting in (("strategy", "strategy"), ("min_silos", "min_silos"), ("local_steps", "local_steps")):
        if body.get(key) is not None:
            update[setting] = body[key]
    try:
        from fedllm.core.sections import FederationSettings

        new_fed = FederationSettings.model_validate({**fed.model_dump(), **update})
    except ValueError as exc:
        raise ConfigError(f"the next run: {exc}") from exc
    from fedllm.federation.runtime.service import build_strategy

    build_strategy(new_fed, lora_alpha=settings.train.lora_alpha)  # an unknown strategy is refused here, not mid-start
    return settings.model_copy(update={"federation": new_fed})


class FinishedServer:
    """The status port of a coordinator between runs (see the module docstring)."""

    def __init__(self, settings: ApplianceSettings, final: dict[str, Any]):
        self.settings, self.final = settings, final
        self.next: ApplianceSettings | None = None
        self._wake = asyncio.Event()

    def status(self) -> dict[str, Any]:
        """The finished run's status document, `phase` "finished", `ended` how it ended."""
        return {**self.final, "phase": "finished", "ended": self.final.get("phase"), "deadline": None}

    async def wait(self) -> ApplianceSettings | None:
        """Serve until the next run is asked for (its settings) or a signal comes (None)."""
        from aiohttp import web

        from fedllm.core.net import is_loopback
        from fedllm.core.secrets import same_secret
        from fedllm.core.tls import server_context
        from fedllm.core.tokens import coordinator_status_token

        cfg = self.settings.federation
        token = coordinator_status_token(self.settings)
        status_needs_token = not is_loopback(cfg.bind_host)

        def authorised(request: web.Request) -> bool:
            given = request.headers.get("Authorization", "").removeprefix("Bearer ").strip()
            return bool(given) and same_secret(given, token)

        async def status(request: web.Request) -> web.Response:
            if status_needs_token and not authorised(request):
                return web.json_response(
                    {"error": "the coordinator's /status needs its status token (keys/status_token)"}, status=401
                )
            return web.json_response(self.status())

        async def health(_request: web.Request) -> web.Response:
            return web.json_response({"status": "ok", "phase": "finished"})

        async def next_run(request: web.Request) -> web.Response:
            if not authorised(request):
                return web.json_response(
                    {
                        "error": "starting a run needs the coordinator's status token (keys/status_token, "
                        "Authorization: Bearer TOKEN)"
                    },
                    status=401,
                )
            try:
                body = await request.json() if request.can_read_body else {}
                self.next = next_settings(self.settings, self.final, body or {})
            except ValueError:
                return web.json_response({"error": "the body must be a JSON object"}, status=400)
            except ConfigError as exc:
                return web.json_response({"error": str(exc)}, status=400)
            self._wake.set()
            fed = self.next.federation
            return web.json_response({"run": fed.run_name, "rounds": fed.rounds}, status=202)

        app = web.Application(client_max_size=64 * 1024)
        app.router.add_get("/status", status)
        app.router.add_get("/health", health)
        app.router.add_post("/runs/next", next_run)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        tls = server_context(cfg.tls_cert, cfg.tls_key) if cfg.tls_cert is not None else None
        await web.TCPSite(runner, cfg.bind_host, cfg.status_port, ssl_context=tls).start()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, self._wake.set)
        logger.info(
            "run %s %s; status kept at port %d; POST /runs/next starts the next run",
            self.final.get("run"),
            self.final.get("phase"),
            cfg.status_port,
        )
        try:
            await self._wake.wait()
        finally:
            await runner.cleanup()
        return self.next
