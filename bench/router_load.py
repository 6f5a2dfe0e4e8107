"""Router load benchmark: direct vs a bare pass-through vs our router vs vLLM's Rust router vs the LiteLLM proxy, on one
fast fake backend.

Every server runs as its own process under uvicorn (uvloop + httptools), and the load generator is one more
process, so they share the machine's cores the same way for every target. Each cell is a closed loop of
`concurrency` clients for `--duration-s` seconds (after a short warm-up), streaming or not.

    .venv/bin/python bench/router_load.py [--duration-s 4] [--concurrency 1 64 256] [--no-litellm] [--no-vllm-router]
        [--no-install] [--vllm] [--baseline DIR]

With `--baseline DIR` (another checkout of this repository, e.g. `git worktree add /tmp/before REV`), the router
of that checkout runs beside today's, as "router@base", measured cell by cell between the same backend and the same
load generator: a before/after comparison in one run (the table's "vs base" column is today's throughput over it).

Prints one table: requests/s, p50/p99 latency, and for each proxy the added p50/p99 (its latency minus direct's)
and its throughput as a share of direct's and of the bare pass-through's. LiteLLM runs only if
`/tmp/litellm-venv/bin/litellm` exists (`python3 -m venv /tmp/litellm-venv && /tmp/litellm-venv/bin/pip install
'litellm[proxy]'`); otherwise the table says why it was skipped. It is never a dependency of the project.

vLLM's own router (`vllm-router`, Rust, round robin, its Prometheus metrics on) runs from its own virtualenv,
`/tmp/vllm-router-venv` (`VLLM_ROUTER_VENV`): the bench makes it when it is missing (`python3 -m venv` and
`pip install 'vllm-router==0.1.17'` from the configured package index, about 130 MB), unless `--no-install`, in which
case (as when the install fails) the table says why it was skipped. It is never a dependency of the project either.

Internal roles (used by the script itself): `--serve-bare PORT UPSTREAM`, `--serve-router PORT UPSTREAMS HOME POLICY`,
`--load JSON`.

With `--vllm`, a second part runs two real vLLM workers (CPU, prefix caching on) behind two routers, one with
round robin and one with the score policy (prefix affinity), on a workload of shared system prompts, and prints
throughput and time to first token for each.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PYTHON = sys.executable
LITELLM = Path(os.environ.get("LITELLM_BIN", "/tmp/litellm-venv/bin/litellm"))
VLLM_ROUTER_VENV = Path(os.environ.get("VLLM_ROUTER_VENV", "/tmp/vllm-router-venv"))
VLLM_ROUTER_PIN = "vllm-router==0.1.17"
MODEL = "fake"
API_KEY_NAME = "bench"


# ---------------------------------------------------------------- the bare pass-through (about a dozen lines)
def serve_bare(port: int, upstream: str) -> None:
    """A bare one-hop proxy: raw ASGI in, aiohttp out, body and chunks passed through. No routing, auth, metrics."""
    import aiohttp
    import uvicorn

    state: dict = {}

    async def app(scope, receive, send):
        if scope["type"] == "lifespan":
            while (msg := await receive())["type"] != "lifespan.shutdown":
                state["s"] = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))
                await send({"type": "lifespan.startup.complete"})
            await state["s"].close()
            return await send({"type": "lifespan.shutdown.complete"})
        body, more = b"", True
        while more:
            msg = await receive()
            body, more = body + msg.get("body", b""), msg.get("more_body", False)
        async with state["s"].post(upstream + scope["path"], data=body, headers={"content-type": "application/json"}) as r:
            await send({"type": "http.response.start", "status": r.status, "headers": [(b"content-type", r.headers["content-type"].encode())]})
            async for chunk in r.content.iter_any():
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b""})

    uvicorn.run(app, host="127.0.0.1", port=port, loop="uvloop", http="httptools", log_level="warning", access_log=False)


# ---------------------------------------------------------------- our router, fully configured
def serve_router(port: int, upstream: str, home: str, policy: str = "score") -> None:
    """Our router (`upstream` may list several workers, comma-separated) with API keys and metrics on."""
    sys.path.insert(0, str(REPO))
    import logging

    from fedllm.core.settings import load_settings
    from fedllm.serve import run_router

    logging.basicConfig(level=logging.WARNING)
    workers = [{"url": u, "region": "local"} for u in upstream.split(",")]
    settings = load_settings(overrides={"home": home, "serve": {"port": port, "policy": policy, "workers": workers}})
    run_router(settings)


# ---------------------------------------------------------------- processes
@dataclass
class Server:
    name: str
    url: str
    proc: subprocess.Popen | None
    headers: dict

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()


def group_cpu_s(pgid: int) -> float:
    """CPU seconds (user + system) used so far by every process of the process group `pgid` (Linux /proc)."""
    total = 0
    tick = os.sysconf("SC_CLK_TCK")
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid:  # fields after the name: state ppid pgrp ... utime(11) stime(12)
            total += int(fields[11]) + int(fields[12])
    return total / tick


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn(cmd: list[str], env: dict | None = None, log: Path | None = None) -> subprocess.Popen:
    out = open(log, "wb") if log else subprocess.DEVNULL
    return subprocess.Popen(cmd, cwd=REPO, env={**os.environ, **(env or {})}, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def wait_ready(url: str, proc: subprocess.Popen, timeout_s: float = 120.0, headers: dict | None = None, model: str = MODEL) -> None:
    import httpx

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{url}: process exited with {proc.returncode}")
        try:
            r = httpx.post(url, json={"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8},
                           headers=headers, timeout=5)
            if r.status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise TimeoutError(f"{url} not ready within {timeout_s} s")


def start_backend(chunks: int = 8) -> Server:
    port = free_port()
    proc = spawn([PYTHON, "-m", "fedllm.testing.fake_vllm", "--port", str(port), "--model", MODEL, "--chunks", str(chunks)])
    url = f"http://127.0.0.1:{port}"
    wait_ready(url + "/v1/chat/completions", proc)
    return Server("direct", url, proc, {})


def start_bare(upstream: str) -> Server:
    port = free_port()
    proc = spawn([PYTHON, __file__, "--serve-bare", str(port), upstream])
    url = f"http://127.0.0.1:{port}"
    wait_ready(url + "/v1/chat/completions", proc)
    return Server("bare proxy", url, proc, {})


def start_router(upstream: str, home: Path, policy: str = "score", model: str = MODEL, tree: Path = REPO,
                 name: str = "our router") -> Server:
    """Our router from checkout `tree` (default: this one), with a metered API key of its own in `home`."""
    home.mkdir(parents=True, exist_ok=True)
    make_key = ("import sys; from fedllm.serve.keys import create_key; "
                "print(create_key(__import__('pathlib').Path(sys.argv[1]), sys.argv[2], rpm=10_000_000, tpm=10_000_000_000))")
    env = {**os.environ, "PYTHONPATH": str(tree)}
    key = subprocess.run([PYTHON, "-c", make_key, str(home / "keys"), f"{API_KEY_NAME}-{int(time.time() * 1000)}"], cwd=tree,
                         env=env, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
    port = free_port()
    proc = subprocess.Popen([PYTHON, str(tree / "bench" / "router_load.py"), "--serve-router", str(port), upstream, str(home), policy],
                            cwd=tree, env=env, stdout=open(home / f"router-{port}.log", "wb"), stderr=subprocess.STDOUT,
                            start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    headers = {"Authorization": f"Bearer {key}"}
    wait_ready(url + "/v1/chat/completions", proc, headers=headers, model=model)
    return Server(name, url, proc, headers)


def start_litellm(upstream: str, home: Path) -> Server | str:
    """LiteLLM's proxy in front of the backend, or a string saying why it was skipped."""
    if not LITELLM.exists():
        return f"skipped: {LITELLM} not found (install litellm[proxy] into /tmp/litellm-venv to include it)"
    config = home / "litellm.yaml"
    config.write_text(
        "model_list:\n"
        f"  - model_name: {MODEL}\n"
        "    litellm_params:\n"
        f"      model: openai/{MODEL}\n"
        f"      api_base: {upstream}/v1\n"
        "      api_key: none\n"
        "litellm_settings:\n  drop_params: true\n  telemetry: false\n"
    )
    port = free_port()
    env = {"LITELLM_LOCAL_MODEL_COST_MAP": "True", "LITELLM_DANGEROUSLY_PERMIT_WEAK_OR_UNSET_MASTER_KEY": "true",
           "LITELLM_LOG": "ERROR", "DISABLE_SCHEMA_UPDATE": "true"}
    proc = spawn([str(LITELLM), "--config", str(config), "--host", "127.0.0.1", "--port", str(port), "--num_workers", "1"],
                 env=env, log=home / "litellm.log")
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url + "/v1/chat/completions", proc, timeout_s=180)
    except (RuntimeError, TimeoutError) as exc:
        Server("litellm", url, proc, {}).stop()
        tail = (home / "litellm.log").read_text(errors="replace")[-400:]
        return f"skipped: LiteLLM did not start ({exc}); log tail: {tail!r}"
    return Server("litellm", url, proc, {})


def vllm_router_bin(install: bool = True) -> Path | str:
    """The `vllm-router` executable of its own virtualenv, made there when missing and `install`; or a string saying
    why there is none (the table prints it instead of the row)."""
    exe = VLLM_ROUTER_VENV / "bin" / "vllm-router"
    if exe.exists():
        return exe
    how = f"python3 -m venv {VLLM_ROUTER_VENV} && {VLLM_ROUTER_VENV}/bin/pip install '{VLLM_ROUTER_PIN}'"
    if not install:
        return f"skipped: {exe} not found and --no-install given (to include it: {how})"
    print(f"  installing {VLLM_ROUTER_PIN} into {VLLM_ROUTER_VENV} (its own virtualenv, not the project's)", file=sys.stderr, flush=True)
    try:
        subprocess.run(["python3", "-m", "venv", str(VLLM_ROUTER_VENV)], check=True, capture_output=True, text=True, timeout=300)
        subprocess.run([str(VLLM_ROUTER_VENV / "bin" / "pip"), "install", "-q", VLLM_ROUTER_PIN], check=True, capture_output=True,
                       text=True, timeout=900)
    except (OSError, subprocess.SubprocessError) as exc:
        detail = getattr(exc, "stderr", None) or str(exc)
        return f"skipped: could not install {VLLM_ROUTER_PIN} into {VLLM_ROUTER_VENV} ({detail.strip()[-300:]}); by hand: {how}"
    return exe if exe.exists() else f"skipped: {VLLM_ROUTER_PIN} installed but {exe} is missing"


def start_vllm_router(upstream: str, home: Path, install: bool = True) -> Server | str:
    """vLLM's Rust router (round robin over `upstream`, comma-separated workers), or a string saying why it was skipped."""
    exe = vllm_router_bin(install)
    if isinstance(exe, str):
        return exe
    port, metrics_port = free_port(), free_port()
    log = home / "vllm-router.log"
    proc = spawn([str(exe), "--host", "127.0.0.1", "--port", str(port), "--worker-urls", *upstream.split(","),
                  "--policy", "round_robin", "--log-level", "warning", "--prometheus-host", "127.0.0.1",
                  "--prometheus-port", str(metrics_port)], log=log)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url + "/v1/chat/completions", proc, timeout_s=60)
    except (RuntimeError, TimeoutError) as exc:
        Server("vllm-router", url, proc, {}).stop()
        tail = log.read_text(errors="replace")[-400:] if log.exists() else ""
        return f"skipped: vllm-router did not start ({exc}); log tail: {tail!r}"
    return Server("vllm-router", url, proc, {})


# ---------------------------------------------------------------- the load generator (its own process)
async def _load(url: str, headers: dict, concurrency: int, stream: bool, duration_s: float, warmup_s: float,
                model: str = MODEL, max_tokens: int = 16, systems: list[str] | None = None) -> dict:
    """A closed loop of `concurrency` clients. With `systems`, request i uses system prompt i % len(systems)."""
    import aiohttp

    def encode(system: str, i: int) -> bytes:
        return json.dumps({"model": model, "stream": stream, "max_tokens": max_tokens, "temperature": 0,
                           "messages": [{"role": "system", "content": system}, {"role": "user", "content": f"Say hi ({i % 7})."}]}).encode()

    bodies = [encode(sys_prompt, i) for i, sys_prompt in enumerate(systems)] if systems else [encode("You are terse.", 0)]
    hdrs = {"content-type": "application/json", **headers}
    latencies: list[float] = []
    ttfts: list[float] = []
    errors = 0
    kinds: dict[str, int] = {}  # what the errors were: "http STATUS: body start" or the exception
    total = 0
    start = time.perf_counter()
    measure_from = start + warmup_s
    stop_at = measure_from + duration_s

    async def client(session, index):
        nonlocal errors, total
        k = index
        while True:
            t0 = time.perf_counter()
            if t0 >= stop_at:
                return
            body = bodies[k % len(bodies)]
            k += concurrency
            first = None
            kind = None
            try:
                async with session.post(url + "/v1/chat/completions", data=body, headers=hdrs) as r:
                    head = b""
                    async for chunk in r.content.iter_any():
                        if first is None:
                            first = time.perf_counter()
                        if r.status != 200 and len(head) < 200:
                            head += chunk
                    ok = r.status == 200
                    if not ok:
                        kind = f"http {r.status}: {head[:160].decode(errors='replace')}"
            except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
                ok = False
                kind = f"{type(exc).__name__}: {str(exc)[:120]}"
            t1 = time.perf_counter()
            total += 1
            if t0 >= measure_from:
                if ok:
                    latencies.append(t1 - t0)
                    ttfts.append((first or t1) - t0)
                else:
                    errors += 1
                    kinds[kind] = kinds.get(kind, 0) + 1

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency), timeout=aiohttp.ClientTimeout(total=300)) as session:
        await asyncio.gather(*(client(session, i) for i in range(concurrency)))
    latencies.sort()
    ttfts.sort()
    n = len(latencies)
    return {"n": n, "errors": errors, "error_kinds": kinds, "total": total, "rps": n / duration_s,
            "p50_ms": statistics.median(latencies) * 1000 if n else float("nan"),
            "p99_ms": latencies[min(n - 1, int(n * 0.99))] * 1000 if n else float("nan"),
            "ttft_p50_ms": statistics.median(ttfts) * 1000 if n else float("nan")}


def run_load(url: str, headers: dict, concurrency: int, stream: bool, duration_s: float, warmup_s: float = 0.5, **extra) -> dict:
    """One cell, measured by a separate load-generator process (so it does not share a core's event loop)."""
    spec = json.dumps({"url": url, "headers": headers, "concurrency": concurrency, "stream": stream, "duration_s": duration_s,
                       "warmup_s": warmup_s, **extra})
    out = subprocess.run([PYTHON, __file__, "--load", spec], cwd=REPO, capture_output=True, text=True, timeout=duration_s + 600)
    if out.returncode != 0:
        raise RuntimeError(f"load generator failed: {out.stderr[-500:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------- the table
def print_table(title: str, rows: list[tuple[str, int, bool, dict]], notes: list[str]) -> None:
    print(f"\n{title}")
    print(f"{'target':<12} {'stream':<6} {'conc':>4} {'req/s':>9} {'p50 ms':>8} {'p99 ms':>8} {'+p50 ms':>8} {'+p99 ms':>8} {'vs direct':>9} {'vs bare':>8} {'cpu us/req':>10} {'errors':>6} {'vs base':>7}")
    before = {(c, s): r for name, c, s, r in rows if name == "router@base"}
    base = {(c, s): r for name, c, s, r in rows if name == "direct"}
    bare = {(c, s): r for name, c, s, r in rows if name == "bare proxy"}
    for name, c, s, r in rows:
        d, b = base.get((c, s)), bare.get((c, s))
        add50 = f"{r['p50_ms'] - d['p50_ms']:+.3f}" if d and name != "direct" else ""
        add99 = f"{r['p99_ms'] - d['p99_ms']:+.3f}" if d and name != "direct" else ""
        vs_d = f"{r['rps'] / d['rps']:.0%}" if d and name != "direct" else ""
        vs_b = f"{r['rps'] / b['rps']:.0%}" if b and name not in ("direct", "bare proxy") else ""
        if r["n"] == 0:
            print(f"{name:<12} {'yes' if s else 'no':<6} {c:>4}  no request finished inside the window ({r['errors']} errors)")
            continue
        old = before.get((c, s))
        vs_base = f"{r['rps'] / old['rps']:.0%}" if old and old["rps"] and name == "our router" else ""
        print(f"{name:<12} {'yes' if s else 'no':<6} {c:>4} {r['rps']:>9.1f} {r['p50_ms']:>8.3f} {r['p99_ms']:>8.3f} {add50:>8} {add99:>8} {vs_d:>9} {vs_b:>8} {r['cpu_us']:>10.0f} {r['errors']:>6} {vs_base:>7}")
    print("+p50/+p99: latency added over direct at the same concurrency; vs direct/bare: throughput share; "
          "cpu us/req: CPU time of that server's own process per request (for direct, the backend's).")
    for name, c, s, r in rows:
        for kind, count in r.get("error_kinds", {}).items():
            print(f"errors of {name} stream={'yes' if s else 'no'} c={c}: {count} x {kind}")
    for note in notes:
        print(note)


def bench(targets: list[str], concurrencies: list[int], duration_s: float, title: str,
          baseline: Path | None = None, install: bool = True) -> list[tuple[str, int, bool, dict]]:
    """Start the backend and the chosen proxies, measure every cell, print the table, stop everything."""
    servers: list[Server] = []
    notes: list[str] = []
    rows: list[tuple[str, int, bool, dict]] = []
    with tempfile.TemporaryDirectory(prefix="router-bench-") as tmp:
        home = Path(tmp)
        try:
            backend = start_backend()
            servers.append(backend)
            by_name = {"direct": backend}
            if "bare" in targets:
                by_name["bare proxy"] = start_bare(backend.url)
                servers.append(by_name["bare proxy"])
            if "router" in targets:
                by_name["our router"] = start_router(backend.url, home / "router")
                servers.append(by_name["our router"])
            if baseline is not None:
                by_name["router@base"] = start_router(backend.url, home / "base", tree=baseline, name="router@base")
                servers.append(by_name["router@base"])
            if "vllm-router" in targets:
                peer = start_vllm_router(backend.url, home, install)
                if isinstance(peer, str):
                    notes.append(f"vllm-router: {peer}")
                else:
                    by_name["vllm-router"] = peer
                    servers.append(peer)
            if "litellm" in targets:
                lite = start_litellm(backend.url, home)
                if isinstance(lite, str):
                    notes.append(f"litellm: {lite}")
                else:
                    by_name["litellm"] = lite
                    servers.append(lite)
            for stream in (False, True):
                for c in concurrencies:
                    for name, server in by_name.items():
                        # LiteLLM answers a 256-wide wave in seconds: give it a window long enough to finish some.
                        d = duration_s if name != "litellm" else max(duration_s, 10.0)
                        cpu0 = group_cpu_s(server.proc.pid)
                        result = run_load(server.url, server.headers, c, stream, d)
                        # CPU of the proxy process itself (the backend's is excluded), per request: robust to a busy machine.
                        result["cpu_us"] = (group_cpu_s(server.proc.pid) - cpu0) / max(1, result["total"]) * 1e6
                        rows.append((name, c, stream, result))
                        print(f"  measured {name} stream={stream} c={c}: {rows[-1][3]['rps']:.0f} req/s", file=sys.stderr, flush=True)
        finally:
            for s in reversed(servers):
                s.stop()
            notes += router_log_notes(home)
    print_table(title, rows, notes)
    return rows


def router_log_notes(home: Path, most: int = 8) -> list[str]:
    """The router's own warnings and errors during the run (distinct lines, counted), so the table's errors have a cause."""
    import collections
    import re

    seen: collections.Counter[str] = collections.Counter()
    for log in home.glob("**/router-*.log"):
        for line in log.read_text(errors="replace").splitlines():
            if line.startswith(("WARNING", "ERROR", "CRITICAL")) or "Traceback" in line:
                seen[re.sub(r"w-[0-9a-f]{10}", "w-…", line)[:200]] += 1
    return [f"router log: {count} x {line}" for line, count in seen.most_common(most)]


# ---------------------------------------------------------------- prefix affinity on two real vLLM workers
def _system_prompts(n: int, words: int = 220) -> list[str]:
    """`n` distinct long system prompts (shared by many requests, so a worker's prefix cache can reuse them)."""
    topics = ["tax law", "marine biology", "compilers", "baking", "medieval history", "cardiology", "jazz", "rocket engines"]
    return [f"You are an assistant for team {i} specialised in {topics[i % len(topics)]}. " +
            " ".join(f"Rule {j}: answer about {topics[i % len(topics)]} carefully and cite section {i}.{j}." for j in range(words // 10))
            for i in range(n)]


def affinity_part(duration_s: float, concurrency: int, prompts: int = 8, policies: tuple[str, ...] = ("round_robin", "score")) -> None:
    """Prefix affinity (score policy) vs round robin through our router in front of two real vLLM workers (CPU)."""
    sys.path.insert(0, str(REPO))
    from fedllm.core.model_store import list_models
    from fedllm.core.sections.serve import WorkerSettings
    from fedllm.core.settings import DEFAULT_MODEL, load_settings
    from fedllm.serve.worker_launcher import VLLMWorker

    dirs = [load_settings().models_dir, REPO / ".cache" / "test-home" / "models"]
    model_dir = next((m.path for d in dirs if d.exists() for m in list_models(d) if m.name == DEFAULT_MODEL), None)
    if model_dir is None:
        print(f"\nvLLM affinity part skipped: {DEFAULT_MODEL} is not prepared (run `appliance model prepare`)")
        return
    systems = _system_prompts(prompts)
    rows = []
    with tempfile.TemporaryDirectory(prefix="router-affinity-") as tmp:
        home = Path(tmp)
        cfg = WorkerSettings(kv_cache_gib=1, max_model_len=2048, extra_args=["--enable-prefix-caching"])
        workers = [VLLMWorker(cfg, model_dir, DEFAULT_MODEL, free_port(), home) for _ in range(2)]
        routers: list[Server] = []
        try:
            for w in workers:
                w.start()
            for w in workers:
                w.wait_ready()
            upstreams = ",".join(w.url for w in workers)
            for policy in policies:
                router = start_router(upstreams, home, policy=policy, model=DEFAULT_MODEL)
                routers.append(router)
                r = run_load(router.url, router.headers, concurrency, True, duration_s, warmup_s=3.0, model=DEFAULT_MODEL,
                             max_tokens=8, systems=systems)
                rows.append((policy, r))
                print(f"  measured affinity {policy}: {r['rps']:.2f} req/s", file=sys.stderr, flush=True)
                router.stop()
        finally:
            for router in routers:
                router.stop()
            for w in workers:
                w.stop()
    print(f"\nrouter_load, vLLM part: two CPU vLLM workers ({DEFAULT_MODEL}, prefix caching on), {prompts} shared system "
          f"prompts of ~{len(systems[0].split())} words, streaming, max_tokens 8, concurrency {concurrency}, {duration_s:.0f} s per policy")
    print(f"{'policy':<12} {'req/s':>7} {'p50 ms':>9} {'p99 ms':>9} {'TTFT p50 ms':>12} {'errors':>6}")
    for policy, r in rows:
        print(f"{policy:<12} {r['rps']:>7.2f} {r['p50_ms']:>9.1f} {r['p99_ms']:>9.1f} {r['ttft_p50_ms']:>12.1f} {r['errors']:>6}")
    by_policy = dict(rows)
    if {"score", "round_robin"} <= set(by_policy) and by_policy["round_robin"]["rps"]:
        rr, sc = by_policy["round_robin"], by_policy["score"]
        print(f"score (prefix affinity) / round robin: throughput x{sc['rps'] / rr['rps']:.2f}, TTFT p50 x{sc['ttft_p50_ms'] / rr['ttft_p50_ms']:.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--serve-bare", nargs=2, metavar=("PORT", "UPSTREAM"))
    parser.add_argument("--serve-router", nargs=4, metavar=("PORT", "UPSTREAMS", "HOME", "POLICY"))
    parser.add_argument("--load", metavar="JSON")
    parser.add_argument("--duration-s", type=float, default=4.0)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 64, 256])
    parser.add_argument("--no-litellm", action="store_true", help="Leave the LiteLLM proxy out.")
    parser.add_argument("--no-vllm-router", action="store_true", help="Leave vLLM's Rust router out.")
    parser.add_argument("--no-install", action="store_true",
                        help=f"Do not make {VLLM_ROUTER_VENV} when it is missing (vllm-router's row then says it was skipped).")
    parser.add_argument("--vllm", action="store_true", help="Also run the prefix-affinity vs round-robin part on two real vLLM workers.")
    parser.add_argument("--vllm-duration-s", type=float, default=30.0)
    parser.add_argument("--vllm-concurrency", type=int, default=8)
    parser.add_argument("--vllm-only", action="store_true", help="Skip the fake-backend table.")
    parser.add_argument("--vllm-policies", nargs="+", default=["round_robin", "score"], help="Order of the policies measured.")
    parser.add_argument("--baseline", type=Path, help="Another checkout whose router runs beside today's (before/after in one run).")
    args = parser.parse_args()
    if args.serve_bare:
        serve_bare(int(args.serve_bare[0]), args.serve_bare[1])
    elif args.serve_router:
        serve_router(int(args.serve_router[0]), args.serve_router[1], args.serve_router[2], args.serve_router[3])
    elif args.load:
        import uvloop

        spec = json.loads(args.load)
        print(json.dumps(uvloop.run(_load(**spec))))
    else:
        targets = (["bare", "router"] + ([] if args.no_vllm_router else ["vllm-router"])
                   + ([] if args.no_litellm else ["litellm"]))
        if not args.vllm_only:
            bench(targets, args.concurrency, args.duration_s,
                  f"router_load: fake backend (8 chunks), {args.duration_s:.0f} s per cell, {os.cpu_count()} cores, every server its own process",
                  baseline=args.baseline.resolve() if args.baseline else None, install=not args.no_install)
        if args.vllm or args.vllm_only:
            affinity_part(args.vllm_duration_s, args.vllm_concurrency, policies=tuple(args.vllm_policies))


if __name__ == "__main__":
    main()
