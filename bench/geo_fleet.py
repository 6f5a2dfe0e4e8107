"""Serving across regions on the WAN test bed: TTFT p50/p99 and throughput per client region, per routing policy,
with and without a worker region cut mid-run.

    .venv/bin/python bench/geo_fleet.py                      # ~2 min; root for namespaces, else loopback links
    .venv/bin/python bench/geo_fleet.py --duration-s 20 --concurrency 4

The bed (testbed.Bed): the router in `hq`; fake OpenAI workers (serve's fake backend: `--delay-s` before the first
token, `--chunk-delay-s` between tokens) in eu, us and ap at 5, 40 and 120 ms one way from the router, each joined with
`appliance worker join`; clients in eu and ap (their own link to hq: 5 and 120 ms) send `X-Region: <their region>`.
Each policy gets a fresh router; "cut" cuts region us halfway through the run (its in-flight requests fail over).
TTFT is measured by the client, so it includes the client's own round trip to the router (the same for every policy).
"""

from __future__ import annotations

import argparse
import signal
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from fedllm.testbed import Bed, LinkSpec  # noqa: E402
from fedllm.testbed.fleet import FAKE_MODEL, GeoFleet  # noqa: E402
from fedllm.testbed.load import LoadResult, stream_load  # noqa: E402

POLICIES = ("score", "least_outstanding", "round_robin")
REGIONS = {"hq": LinkSpec(0), "eu": LinkSpec(5), "us": LinkSpec(40), "ap": LinkSpec(120)}
WORKER_REGIONS = ("eu", "us", "ap")
CLIENT_REGIONS = ("eu", "ap")


def run_policy(bed: Bed, home: Path, policy: str, args: argparse.Namespace) -> dict[tuple[bool, str], LoadResult]:
    """One router with `policy`; returns {(cut, client region): result}."""
    fleet = GeoFleet(bed, "hq", home / f"router-{policy}", serve_env={"POLICY": policy, "HEALTH_INTERVAL_S": 1.0})
    fleet.start_router()
    for region in WORKER_REGIONS:
        fleet.add_fake_worker(region, f"{policy}-{region}", "--delay-s", str(args.service_s), "--chunks", "8",
                              "--chunk-delay-s", "0.005", join_args=("--capacity", str(args.capacity)))
    fleet.wait_healthy()
    out: dict[tuple[bool, str], LoadResult] = {}
    try:
        for cut in (False, True):
            def load(region: str) -> LoadResult:
                url = fleet.router_url(region)
                return bed.run(region, lambda: stream_load(url, fleet.api_key, FAKE_MODEL, region=region,
                                                           concurrency=args.concurrency, duration_s=args.duration_s))
            with ThreadPoolExecutor(len(CLIENT_REGIONS)) as pool:
                futures = {r: pool.submit(load, r) for r in CLIENT_REGIONS}
                if cut:
                    time.sleep(args.duration_s / 2)
                    bed.cut("us")
                results = {r: f.result() for r, f in futures.items()}
            if cut:
                bed.restore("us")
                fleet.wait_healthy(timeout_s=60)
            for region, result in results.items():
                out[(cut, region)] = result
                print(f"  {policy:<18} cut={cut!s:<5} {region}: {result.summary()}", file=sys.stderr, flush=True)
    finally:
        for name in [n for n in bed.processes if n.startswith(("join-", policy)) or n == "router"]:
            bed.stop_process(name)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--duration-s", type=float, default=12.0, help="Load per scenario (seconds).")
    p.add_argument("--concurrency", type=int, default=3, help="Concurrent streams per client region.")
    p.add_argument("--service-s", type=float, default=0.02, help="Fake worker's time before the first token (s).")
    p.add_argument("--capacity", type=int, default=4, help="Each worker's --capacity at join (concurrent requests).")
    p.add_argument("--policies", default=",".join(POLICIES))
    args = p.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # SIGTERM unwinds too: the bed's namespaces are removed
    with tempfile.TemporaryDirectory(prefix="geo-fleet-") as tmp, Bed(REGIONS, Path(tmp) / "bed") as bed:
        mode = "network namespaces" if bed.use_netns else f"loopback links ({bed.netns_skip_reason})"
        results = {policy: run_policy(bed, Path(tmp), policy, args) for policy in args.policies.split(",")}
    print(f"bed: {mode}; router in hq; workers eu 5 ms, us 40 ms, ap 120 ms one way; clients in eu (5 ms) and ap (120 ms);")
    print(f"{args.concurrency} streams per client region for {args.duration_s:g} s; worker capacity {args.capacity}; "
          f"service {1000 * args.service_s:g} ms to first token; cut = region us cut halfway")
    print(f"{'policy':<19}{'cut':<5}{'client':<8}{'TTFT p50 ms':>12}{'TTFT p99 ms':>12}{'req/s':>8}{'errors':>8}{'p50 vs rr':>11}")
    for policy, rows in results.items():
        for (cut, region), r in rows.items():
            rr = results.get("round_robin", {}).get((cut, region))
            ratio = f"{r.percentile(50) / rr.percentile(50):.2f}x" if rr and rr.ttft_s else "-"
            print(f"{policy:<19}{'yes' if cut else 'no':<5}{region:<8}{r.percentile(50):>12.0f}{r.percentile(99):>12.0f}"
                  f"{r.throughput:>8.1f}{sum(r.errors.values()):>8}{ratio:>11}")


if __name__ == "__main__":
    main()
