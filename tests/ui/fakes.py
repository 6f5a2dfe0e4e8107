"""A small fake router that speaks the router's OpenAI and admin API (docs/CONTRACTS.md), served on loopback.

Used where the test is about the console or the publisher, not the router: it answers `/v1/models`, streams chat
completions word by word, and keeps workers and adapters in memory. `fail_publish` makes the next N
`POST /admin/adapters` answer 503, to exercise retries.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import PlainTextResponse, StreamingResponse

from fedllm.testing.factories import free_port


@dataclass
class FakeRouterState:
    admin_token: str
    base_model: str = "smollm2-135m-instruct"
    fail_publish: int = 0
    reject_names: set[str] = field(default_factory=set)  # publishes of these names always answer 503
    adapters: dict[str, dict[str, Any]] = field(default_factory=dict)
    workers: list[dict[str, Any]] = field(default_factory=list)
    worker_keys: dict[str, str | None] = field(default_factory=dict)
    publish_calls: list[dict[str, Any]] = field(default_factory=list)
    chats: list[dict[str, Any]] = field(default_factory=list)


def build_app(state: FakeRouterState):
    app = FastAPI()

    def check_admin(request: Request) -> None:
        if request.headers.get("authorization") != f"Bearer {state.admin_token}":
            raise HTTPException(401, "bad admin token")

    @app.get("/health")
    def health():
        return {"status": "ok"}

    @app.get("/v1/models")
    def models():
        names = [state.base_model] + [n for a in state.adapters.values() for n in [a["name"], *a["aliases"]]]
        return {"object": "list", "data": [{"id": n, "object": "model", "owned_by": "fake"} for n in names]}

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        body = await request.json()
        state.chats.append(body)
        words = f"Hello from {body['model']}: the answer streams word by word .".split()

        async def sse():
            for w in words:
                chunk = {"id": "x", "object": "chat.completion.chunk", "model": body["model"],
                         "choices": [{"index": 0, "delta": {"content": w + " "}, "finish_reason": None}]}
                yield f"data: {json.dumps(chunk)}\n\n"
                await asyncio.sleep(0.05)
            yield "data: [DONE]\n\n"

        if body.get("stream"):
            return StreamingResponse(sse(), media_type="text/event-stream")
        return {"choices": [{"index": 0, "message": {"role": "assistant", "content": " ".join(words)}}]}

    @app.get("/admin/workers")
    def workers(request: Request):
        check_admin(request)
        return state.workers

    @app.post("/admin/workers")
    async def add_worker(request: Request):
        check_admin(request)
        body = await request.json()
        wid = f"w{len(state.workers) + 1}"
        state.workers.append({"id": wid, "url": body["url"], "region": body.get("region", "local"), "healthy": True,
                              "draining": False, "outstanding": 0, "latency_ms": 12.5,
                              "models": body.get("models", []), "adapters": [], "quarantined": False})
        state.worker_keys[wid] = body.get("api_key")  # kept apart: the real router never lists a worker's key
        return {"id": wid}

    @app.post("/admin/workers/{wid}/clear")
    def clear(wid: str, request: Request):
        check_admin(request)
        for w in state.workers:
            if w["id"] == wid:
                w["quarantined"], w["canary"] = False, "cleared"
                return {"id": wid}
        raise HTTPException(404, "no such worker")

    @app.post("/admin/workers/{wid}/drain")
    def drain(wid: str, request: Request):
        check_admin(request)
        for w in state.workers:
            if w["id"] == wid:
                w["draining"] = True
                return {"id": wid}
        raise HTTPException(404, "no such worker")

    @app.get("/admin/adapters")
    def adapters(request: Request):
        check_admin(request)
        return list(state.adapters.values())

    @app.post("/admin/adapters")
    async def publish(request: Request):
        check_admin(request)
        body = await request.json()
        state.publish_calls.append(body)
        if body["name"] in state.reject_names:
            raise HTTPException(503, "worker cannot load this adapter")
        if state.fail_publish > 0:
            state.fail_publish -= 1
            raise HTTPException(503, "worker busy")
        for a in state.adapters.values():  # an alias moves to the newest version
            a["aliases"] = [x for x in a["aliases"] if x not in body.get("aliases", [])]
        state.adapters[body["name"]] = {"name": body["name"], "path": body["path"], "aliases": body.get("aliases", [])}
        return {"name": body["name"]}

    @app.delete("/admin/adapters/{name}")
    def unpublish(name: str, request: Request):
        check_admin(request)
        state.adapters.pop(name, None)
        return {"name": name}

    @app.get("/metrics")
    def metrics():
        return PlainTextResponse(
            "# TYPE router_requests_total counter\nrouter_requests_total{status=\"200\"} 42\n"  # the router's names
            "router_request_seconds_sum 1.5\nrouter_request_seconds_count 42\n"
            "router_ttft_seconds_bucket{model=\"m\",worker=\"w0\",le=\"0.05\"} 42\n"
            "router_ttft_seconds_bucket{model=\"m\",worker=\"w0\",le=\"+Inf\"} 42\n"
        )

    return app


class ServerThread:
    """Serve an ASGI app with uvicorn on 127.0.0.1:<free port> in a background thread; `stop()` shuts it down."""

    def __init__(self, app, port: int | None = None):
        import uvicorn

        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self._thread = threading.Thread(target=self._server.run, daemon=True)

    def start(self):
        self._thread.start()
        deadline = time.monotonic() + 20
        while not self._server.started:
            if time.monotonic() > deadline or not self._thread.is_alive():
                raise RuntimeError("fake server did not start")
            time.sleep(0.05)
        return self

    def stop(self) -> None:
        self._server.should_exit = True
        self._thread.join(10)


class FakeRouter(ServerThread):
    """The fake router on loopback; `state` holds what it was told."""

    def __init__(self, admin_token: str = "test-admin-token", port: int | None = None):
        self.state = FakeRouterState(admin_token=admin_token)
        super().__init__(build_app(self.state), port)


class FakeCoordinator(ServerThread):
    """A coordinator status endpoint (`GET /status`, docs/CONTRACTS.md) serving `self.status`."""

    def __init__(self, status: dict[str, Any]):
        self.status = status
        app = FastAPI()
        app.get("/status")(lambda: self.status)
        super().__init__(app)


def sample_status(now: float) -> dict[str, Any]:
    """A federation three rounds in, with three silos (one offline), for the Federation tab."""
    silos = ["hospital-a", "hospital-b", "clinic-c"]
    rounds = []
    for r in range(1, 4):
        per_silo = {s: {"train_loss": 2.4 - 0.3 * r + 0.1 * i, "eval_loss": 2.5 - 0.28 * r + 0.12 * i} for i, s in enumerate(silos)}
        rounds.append({"round": r, "participants": silos, "metrics": {"train_loss": 2.45 - 0.3 * r, "eval_loss": 2.55 - 0.29 * r},
                       "per_silo": per_silo, "bytes_in": 3_686_400, "bytes_out": 3_686_400, "duration_s": 41.5 + r,
                       "epsilon": 0.8 * r, "adapter": f"federation:{r}",
                       "timings": {s: {"download_s": 0.2 + i, "train_s": 30.0, "upload_s": 0.4 + 2 * i, "transfer_s": 0.6 + 3 * i,
                                       "span_s": 31.0 + 3 * i, "bytes_down": 1_228_800, "bytes_up": 1_228_800}
                                   for i, s in enumerate(silos)},
                       "deadlines_s": {s: 600.0 + 10 * i for i, s in enumerate(silos)}})
    return {"run": "federation", "round": 4, "rounds_total": 10, "phase": "collecting", "deadline": now + 420,
            "strategy": "fedavg",
            "silos": [{"id": s, "online": i != 2, "last_seen": now - 3 - 60 * (i == 2), "rounds": 3, "examples": 120 + 40 * i}
                      for i, s in enumerate(silos)],
            "rounds": rounds}
