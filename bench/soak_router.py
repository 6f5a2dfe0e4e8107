"""Router soak (issue 24): steady load through the real router to fake workers while the fleet, the keys and the
adapters change all the time, with the router process sampled throughout. Nothing may grow.

    python bench/soak_router.py [--minutes 30] [--concurrency 8] [--churn-every-s 60] [--lock /tmp/heavy.lock] [--out soak.json]

The router (`appliance serve`, API keys required, canary checks on, a short expiry for silent workers) fronts one
static fake worker (the trusted reference) and joined fake workers. `--concurrency` clients send chat requests
without pause, each with the current API key. Every `--churn-every-s` the next event of a fixed cycle happens:

  join       a new fake worker joins (join token, its own key) and heartbeats;
  leave      the oldest joined worker leaves with its secret and its process stops;
  die        a joined worker's process is killed (SIGKILL): the router finds out by itself and removes it;
  forge      a worker that forges every answer joins; the canaries quarantine it, then the operator removes it;
  keys       a new API key is created, the clients move to it, the old one is revoked;
  adapters   an adapter version is published (its alias moves) and the alias rolled back.

Sampled every `--sample-s`: the router's RSS, open file descriptors and threads (/proc), its asyncio tasks and each
per-worker table (`GET /admin/runtime`). Requests are counted by outcome: answered (200), failed with an explicit
error (an HTTP status with an OpenAI error body), or not answered (a connection error or a timeout: a bug).

Verdict: RSS, fds, threads and tasks after warm-up (the median of the tenth of samples around the end of the first
third) against the end (median of the last tenth) within 10 % (fds and tasks: plus one, and two for each worker more than at
warm-up); the per-worker tables at the end no larger than the fleet needs (one entry per worker alive, and per worker and
model or adapter for the load locks and the series cache);
no request unanswered; p99 of the last tenth of requests within 2x (plus 20 ms) of the warm-up's. Exit status 1 when
a check fails.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(HERE))  # run as a script: this checkout's packages
PYTHON = sys.executable
MODEL = "soak-model"
CYCLE = ("join", "leave", "die", "forge", "keys", "adapters")

from fedllm.testing.soak import figures_table, flat_checks, locked, proc_sample  # noqa: E402


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn(args: list[str], env: dict | None = None, log: Path | None = None) -> subprocess.Popen:
    out = open(log, "ab") if log else subprocess.DEVNULL
    return subprocess.Popen(args, cwd=HERE, env={**os.environ, "PYTHONPATH": str(HERE), **(env or {})}, stdout=out,
                            stderr=subprocess.STDOUT, start_new_session=True)


def stop(proc: subprocess.Popen, sig: int = signal.SIGTERM) -> None:
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def wait_http(url: str, proc: subprocess.Popen, timeout_s: float = 60.0, headers: dict | None = None) -> None:
    import httpx

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{url}: the process exited with {proc.returncode}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(url, headers=headers, timeout=2).status_code == 200:
                return
        time.sleep(0.2)
    raise TimeoutError(f"{url} did not answer within {timeout_s:.0f} s")


@dataclass
class FakeWorker:
    proc: subprocess.Popen
    url: str
    key: str
    id: str | None = None
    secret: str | None = None

    @classmethod
    def start(cls, home: Path, *forge: str) -> "FakeWorker":
        port, key = free_port(), f"worker-key-{free_port()}-{time.monotonic_ns()}"
        proc = spawn([PYTHON, "-m", "fedllm.testing.fake_vllm", "--port", str(port), "--model", MODEL, "--chunks", "4", *forge],
                     env={"VLLM_API_KEY": key}, log=home / "workers.log")
        worker = cls(proc, f"http://127.0.0.1:{port}", key)
        wait_http(worker.url + "/health", proc)
        return worker


@dataclass
class Soak:
    home: Path
    router_url: str
    admin: dict
    join_token: str
    static: FakeWorker
    api_key: str
    key_name: str
    joined: list[FakeWorker] = field(default_factory=list)
    events: dict = field(default_factory=lambda: {e: 0 for e in CYCLE})
    quarantined: int = 0
    key_serial: int = 0
    version: int = 0

    # -- the events --
    def join(self, *forge: str) -> FakeWorker:
        import httpx

        worker = FakeWorker.start(self.home, *forge)
        r = httpx.post(f"{self.router_url}/admin/workers", headers={"Authorization": f"Bearer {self.join_token}"}, timeout=30,
                       json={"url": worker.url, "region": "local", "models": [MODEL], "api_key": worker.key, "capacity": 8})
        r.raise_for_status()
        worker.id, worker.secret = r.json()["id"], r.json()["secret"]
        self.joined.append(worker)
        return worker

    def leave(self) -> None:
        import httpx

        if not self.joined:
            return
        worker = self.joined.pop(0)
        httpx.delete(f"{self.router_url}/admin/workers/{worker.id}", headers={"Authorization": f"Bearer {worker.secret}"}, timeout=30)
        stop(worker.proc)

    def die(self) -> None:
        if self.joined:
            worker = self.joined.pop()
            stop(worker.proc, signal.SIGKILL)  # no goodbye: the router's probes and expiry deal with it

    def forge(self) -> None:
        import httpx

        worker = self.join("--forge", "forged answer")
        deadline = time.monotonic() + 60
        quarantined = False
        while time.monotonic() < deadline and not quarantined:
            rows = httpx.get(f"{self.router_url}/admin/workers", headers=self.admin, timeout=10).json()
            quarantined = any(r["id"] == worker.id and r["quarantined"] for r in rows)
            time.sleep(0.5)
        self.quarantined += quarantined
        httpx.delete(f"{self.router_url}/admin/workers/{worker.id}", headers=self.admin, timeout=30)
        self.joined.remove(worker)
        stop(worker.proc)

    def keys(self) -> None:
        from fedllm.serve.keys import create_key, revoke_key

        self.key_serial += 1
        name = f"soak-{self.key_serial}"
        new = create_key(self.home / "keys", name)
        old = self.key_name
        self.api_key, self.key_name = new, name
        time.sleep(2.0)  # the router re-reads the key file within a second; the clients use the new key meanwhile
        revoke_key(self.home / "keys", old)

    def adapters(self) -> None:
        import httpx

        self.version += 1
        folder = self.home / "adapters" / f"v{self.version}"
        folder.mkdir(parents=True, exist_ok=True)
        body = {"name": f"soak-v{self.version}", "path": str(folder), "aliases": ["soak-latest"], "base_model": MODEL,
                "version": self.version, "by": "soak"}
        httpx.post(f"{self.router_url}/admin/adapters", headers=self.admin, json=body, timeout=60).raise_for_status()
        if self.version > 1:
            httpx.post(f"{self.router_url}/admin/adapters/soak-latest/rollback", headers=self.admin, json={}, timeout=60)
        if self.version > 2:  # the one before stays; older ones go, as an operator would tidy up
            httpx.delete(f"{self.router_url}/admin/adapters/soak-v{self.version - 2}", headers=self.admin, timeout=30)

    def heartbeat(self) -> None:
        import httpx

        for worker in list(self.joined):
            with contextlib.suppress(httpx.HTTPError):
                httpx.post(f"{self.router_url}/admin/workers/{worker.id}/heartbeat",
                           headers={"Authorization": f"Bearer {worker.secret}"}, timeout=10)

    def event(self, name: str) -> None:
        getattr(self, name)()
        self.events[name] += 1


# ---------------------------------------------------------------- load

async def load(soak: Soak, concurrency: int, until: float, outcomes: dict, latencies: list) -> None:
    import httpx

    async def client(i: int) -> None:
        async with httpx.AsyncClient(base_url=soak.router_url, timeout=30) as c:
            while time.monotonic() < until:
                key = soak.api_key
                start = time.monotonic()
                try:
                    r = await c.post("/v1/chat/completions", headers={"Authorization": f"Bearer {key}"},
                                     json={"model": MODEL, "messages": [{"role": "user", "content": f"soak {i}"}], "max_tokens": 8})
                except httpx.HTTPError as exc:
                    outcomes["unanswered"] += 1
                    outcomes.setdefault("unanswered_kinds", {}).setdefault(type(exc).__name__, 0)
                    outcomes["unanswered_kinds"][type(exc).__name__] += 1
                    continue
                if r.status_code == 200:
                    outcomes["answered"] += 1
                    latencies.append((time.monotonic(), time.monotonic() - start))
                else:
                    explicit = "error" in (r.json() if r.headers.get("content-type", "").startswith("application/json") else {})
                    kind = f"{r.status_code}{'' if explicit else ' (no error body)'}"
                    outcomes["failed"][kind] = outcomes["failed"].get(kind, 0) + 1
                    if r.status_code == 401 and key != soak.api_key:
                        continue  # the key was revoked under this request: the next one uses the new key
                    await asyncio.sleep(0.05)

    await asyncio.gather(*(client(i) for i in range(concurrency)))


# ---------------------------------------------------------------- sampling and verdict

def verdict(samples: list[dict], latencies: list[tuple[float, float]], outcomes: dict) -> dict:
    # Each worker may hold a probe task, a canary check and a pooled connection: a fleet bigger at the end than at
    # warm-up holds that much more, which is not growth.
    n = len(samples)
    more = max(0, samples[-1]["tables"]["workers"] - samples[n // 3]["tables"]["workers"])
    warm, end, checks = flat_checks(samples, ("rss_kb", "fds", "threads", "tasks"), slack={"tasks": 2 * more + 1, "fds": 2 * more + 1})  # +1: one in flight at a sample
    last = samples[-1]
    alive = last["tables"]["workers"]
    # Load locks and the series cache hold one entry per worker and model or adapter; the rest one per worker.
    per_adapter = alive * (1 + last.get("adapters", 0))
    over = {k: v for k, v in last["tables"].items() if k not in ("workers", "metric samples")
            and v > (per_adapter if k in ("load locks", "series cache") else alive)}
    checks["tables"] = {"growth": over or None, "flat": not over}
    checks["unanswered"] = {"growth": outcomes["unanswered"], "flat": outcomes["unanswered"] == 0}
    times = [lat for _, lat in latencies]
    m = len(times)
    if m >= 200:
        def p99(xs: list[float]) -> float:
            return sorted(xs)[int(0.99 * (len(xs) - 1))]
        early, late = p99(times[m // 3: m // 3 + m // 10]), p99(times[-(m // 10):])
        checks["p99"] = {"growth": round(late / early - 1, 4), "flat": late <= 2 * early + 0.02,
                         "warm_ms": round(early * 1000, 1), "end_ms": round(late * 1000, 1)}
    return {"start": samples[0], "warm": warm, "end": end, "checks": checks, "ok": all(c["flat"] for c in checks.values())}



def run(minutes: float, concurrency: int, churn_every_s: float, sample_s: float) -> dict:
    import httpx

    from fedllm.core.secrets import ensure_token
    from fedllm.serve.keys import create_key

    with tempfile.TemporaryDirectory(prefix="soak-router-") as tmp:
        home = Path(tmp)
        keys = home / "keys"
        join_token, admin_token = ensure_token(keys, "join_token"), ensure_token(keys, "admin_token")
        api_key = create_key(keys, "soak-0")
        static = FakeWorker.start(home)
        port = free_port()
        router = spawn([PYTHON, "-m", "fedllm.appliance", "serve", "--port", str(port)], log=home / "router.log", env={
            "APPLIANCE_HOME": str(home), "APPLIANCE_SERVE__REQUIRE_KEYS": "true",
            "APPLIANCE_SERVE__WORKERS": json.dumps([{"url": static.url, "region": "local", "api_key": static.key}]),
            "APPLIANCE_SERVE__HEALTH_INTERVAL_S": "1", "APPLIANCE_SERVE__WORKER_EXPIRY_S": "5",
            "APPLIANCE_SERVE__CANARY_DELAY_S": "0.5", "APPLIANCE_SERVE__CANARY_PENDING_RATE": "1.0",
            "APPLIANCE_SERVE__CANARY_INTERVAL_S": "10"})
        url = f"http://127.0.0.1:{port}"
        admin = {"Authorization": f"Bearer {admin_token}"}
        soak = Soak(home, url, admin, join_token, static, api_key, "soak-0")
        outcomes: dict = {"answered": 0, "failed": {}, "unanswered": 0}
        latencies: list[tuple[float, float]] = []
        samples: list[dict] = []
        started = time.monotonic()
        until = started + minutes * 60
        try:
            wait_http(url + "/admin/runtime", router, headers=admin)
            for _ in range(2):
                soak.join()

            def sampler_and_churn() -> None:
                next_event, i = time.monotonic() + churn_every_s, 0
                while time.monotonic() < until:
                    runtime = httpx.get(url + "/admin/runtime", headers=admin, timeout=10).json()
                    samples.append({"t": round(time.monotonic() - started, 1), **proc_sample(router.pid),
                                    "tasks": runtime["asyncio_tasks"], "adapters": runtime["published_adapters"],
                                    "tables": runtime["tables"]})
                    soak.heartbeat()
                    if time.monotonic() >= next_event:
                        soak.event(CYCLE[i % len(CYCLE)])
                        if len(soak.joined) < 2:
                            soak.join()  # keep a fleet to route to
                        i += 1
                        next_event = time.monotonic() + churn_every_s
                    time.sleep(sample_s)

            async def main() -> None:
                await asyncio.gather(load(soak, concurrency, until, outcomes, latencies), asyncio.to_thread(sampler_and_churn))

            asyncio.run(main())
        finally:
            for worker in [*soak.joined, static]:
                stop(worker.proc)
            stop(router)
        result = {"minutes": round((time.monotonic() - started) / 60, 2), "concurrency": concurrency,
                  "churn_every_s": churn_every_s, "events": soak.events, "quarantined": soak.quarantined,
                  "outcomes": outcomes, "samples": samples}
        result["verdict"] = verdict(samples, latencies, outcomes)
        return result


def table(result: dict) -> str:
    return figures_table(result["verdict"], (("rss_kb", "RSS MB", 1024), ("fds", "open fds", 1), ("threads", "threads", 1),
                                             ("tasks", "asyncio tasks", 1)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=30.0, help="How long (default 30).")
    parser.add_argument("--concurrency", type=int, default=8, help="Clients sending without pause (default 8).")
    parser.add_argument("--churn-every-s", type=float, default=60.0, help="Seconds between fleet/key/adapter events (default 60).")
    parser.add_argument("--sample-s", type=float, default=1.0, help="Seconds between samples of the router.")
    parser.add_argument("--lock", default=None, help="Hold this flock for the whole run (a shared machine).")
    parser.add_argument("--out", type=Path, default=None, help="Also write the result (with every sample) as JSON here.")
    args = parser.parse_args()
    with locked(args.lock):
        result = run(args.minutes, args.concurrency, args.churn_every_s, args.sample_s)
    if args.out:
        args.out.write_text(json.dumps(result, indent=1))
    o, v = result["outcomes"], result["verdict"]
    print(f"router soak: {result['minutes']:.1f} min, {result['concurrency']} clients, an event every {result['churn_every_s']:g} s "
          f"{result['events']} ({result['quarantined']} forging workers quarantined)")
    print(f"requests: {o['answered']} answered, failed explicitly {o['failed'] or 0}, unanswered {o['unanswered']}")
    if "p99" in v["checks"]:
        print(f"p99: {v['checks']['p99']['warm_ms']} ms after warm-up, {v['checks']['p99']['end_ms']} ms at the end")
    print(f"per-worker tables at the end: {result['samples'][-1]['tables']}")
    print(table(result))
    print("verdict:", "flat" if v["ok"] else "GROWS: " + ", ".join(k for k, c in v["checks"].items() if not c["flat"]))
    sys.exit(0 if v["ok"] else 1)


if __name__ == "__main__":
    main()
