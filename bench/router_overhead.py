"""Router overhead (issue 2): the same requests sent directly to a backend and through our router, side by side.

At concurrency 1 and 64, streaming and not, against the fast fake backend; with `--vllm` also against a real
vLLM worker on the embedded model (CPU: slow, so fewer seconds and smaller concurrency make sense there).

    .venv/bin/python bench/router_overhead.py [--duration-s 4] [--vllm [--vllm-duration-s 20]]

Prints added p50/p99 latency in ms (router minus direct) and the throughput ratio (router / direct). The router
runs with API keys, rate limits and metrics on, each server in its own process (see bench/router_load.py).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import router_load as rl  # noqa: E402


def vllm_part(concurrencies: list[int], duration_s: float) -> None:
    """Direct vs router in front of one real vLLM worker on the embedded model."""
    from fedllm.core.model_store import list_models
    from fedllm.core.sections.serve import WorkerSettings
    from fedllm.core.settings import DEFAULT_MODEL, load_settings
    from fedllm.serve.worker_launcher import VLLMWorker

    settings = load_settings()
    candidates = [settings.models_dir, rl.REPO / ".cache" / "test-home" / "models"]
    model_dir = next((m.path for d in candidates if d.exists() for m in list_models(d) if m.name == DEFAULT_MODEL), None)
    if model_dir is None:
        print(f"\nvLLM part skipped: {DEFAULT_MODEL} is not prepared (run `appliance model prepare`)")
        return
    rows = []
    with tempfile.TemporaryDirectory(prefix="router-overhead-") as tmp:
        home = Path(tmp)
        worker = VLLMWorker(WorkerSettings(kv_cache_gib=1, max_model_len=2048), model_dir, DEFAULT_MODEL, rl.free_port(), home)
        router = None
        try:
            worker.start()
            worker.wait_ready()
            router = rl.start_router(worker.url, home, model=DEFAULT_MODEL)
            direct = rl.Server("direct", worker.url, None, {})
            for stream in (False, True):
                for c in concurrencies:
                    for name, server in (("direct", direct), ("our router", router)):
                        r = rl.run_load(server.url, server.headers, c, stream, duration_s, warmup_s=2.0, model=DEFAULT_MODEL, max_tokens=16)
                        r["cpu_us"] = float("nan")
                        rows.append((name, c, stream, r))
                        print(f"  measured vllm {name} stream={stream} c={c}: {r['rps']:.1f} req/s", file=sys.stderr, flush=True)
        finally:
            if router is not None:
                router.stop()
            worker.stop()
    rl.print_table(f"router_overhead: one vLLM worker (CPU, {DEFAULT_MODEL}, max_tokens 16), {duration_s:.0f} s per cell", rows, [])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration-s", type=float, default=4.0)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 64])
    parser.add_argument("--vllm", action="store_true", help="Also measure in front of a real vLLM worker (starts one).")
    parser.add_argument("--vllm-duration-s", type=float, default=20.0)
    parser.add_argument("--vllm-concurrency", type=int, nargs="+", default=[1, 16])
    args = parser.parse_args()
    rl.bench(["router"], args.concurrency, args.duration_s,
             f"router_overhead: fake backend, {args.duration_s:.0f} s per cell, {os.cpu_count()} cores, every server its own process")
    if args.vllm:
        vllm_part(args.vllm_concurrency, args.vllm_duration_s)


if __name__ == "__main__":
    main()
