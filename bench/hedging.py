"""Hedged requests on the WAN test bed: client TTFT p50/p99 with `serve.hedge` off and on, side by side, one run.

    .venv/bin/python bench/hedging.py                       # ~5 min; root for namespaces, else loopback links
    .venv/bin/python bench/hedging.py --duration-s 20 --tail-fraction 0.05

The bed (testbed.Bed) is bench/geo_fleet.py's: the router in `hq`; fake OpenAI workers in eu, us and ap at 5, 40 and
120 ms one way from the router, each joined with `appliance worker join`; clients in eu send `X-Region: eu`. The eu
worker, the nearest and so the one the router prefers, has a heavy tail: a `--tail-fraction` of its requests wait
`--tail-s` before their first token (after the stream's headers, as a stalled vLLM prefill would). Each setting gets a
fresh router and fresh workers with the same seeded tail; the same fleet without the tail shows what hedging costs
where it has nothing to cut. TTFT is measured by the client (first `data:` event).
"""

from __future__ import annotations

import argparse
import signal
import sys
import tempfile
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from fedllm.core.contracts.router_metrics import HEDGES, parse  # noqa: E402
from fedllm.testbed import Bed, LinkSpec  # noqa: E402
from fedllm.testbed.fleet import FAKE_MODEL, GeoFleet  # noqa: E402
from fedllm.testbed.load import LoadResult, stream_load  # noqa: E402

REGIONS = {"hq": LinkSpec(0), "eu": LinkSpec(5), "us": LinkSpec(40), "ap": LinkSpec(120)}
WORKER_REGIONS = ("eu", "us", "ap")
CLIENT_REGION = "eu"
TAIL_REGION = "eu"


def run_setting(bed: Bed, home: Path, hedge: str, tail_fraction: float, args: argparse.Namespace) -> tuple[LoadResult, dict[str, float]]:
    """One router with `serve.hedge: hedge`; returns the client's result and the router's hedge counts by result."""
    fleet = GeoFleet(bed, "hq", home / f"router-hedge-{hedge}-{tail_fraction:g}", serve_env={"HEDGE": hedge, "HEDGE_PERCENTILE": args.percentile,
                                                                           "HEDGE_MIN_DELAY_S": args.min_delay_s,
                                                                           "HEALTH_INTERVAL_S": 1.0})
    fleet.start_router()
    for region in WORKER_REGIONS:
        tail = ("--first-byte-delay-s", str(args.tail_s), "--first-byte-delay-fraction", str(tail_fraction),
                "--seed", "7") if region == TAIL_REGION and tail_fraction else ()
        fleet.add_fake_worker(region, f"hedge-{hedge}-{region}", "--delay-s", str(args.service_s), "--chunks", "8",
                              "--chunk-delay-s", "0.005", *tail, join_args=("--capacity", str(args.capacity)))
    fleet.wait_healthy()
    try:
        url = fleet.router_url(CLIENT_REGION)
        result = bed.run(CLIENT_REGION, lambda: stream_load(url, fleet.api_key, FAKE_MODEL, region=CLIENT_REGION,
                                                            concurrency=args.concurrency, duration_s=args.duration_s))
        metrics_url = f"http://{bed.address('hq')}:{fleet.router_port}/metrics"
        scrape = urllib.request.Request(metrics_url, headers={"Authorization": f"Bearer {fleet.admin_token}"})  # beyond loopback
        text = bed.call("hq", lambda: urllib.request.urlopen(scrape, timeout=10).read().decode())
        hedges = {s.labels["result"]: s.value for s in parse(text) if s.name == f"{HEDGES}_total"}
        print(f"  tail={tail_fraction:g} hedge={hedge}: {result.summary()} hedges={hedges}", file=sys.stderr, flush=True)
        return result, hedges
    finally:
        for name in [n for n in bed.processes if n.startswith(("join-", "hedge-")) or n == "router"]:
            bed.stop_process(name)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--duration-s", type=float, default=30.0, help="Load per setting (seconds).")
    p.add_argument("--concurrency", type=int, default=4, help="Concurrent streams from the client region.")
    p.add_argument("--service-s", type=float, default=0.02, help="Every fake worker's time before its headers (s).")
    p.add_argument("--tail-s", type=float, default=1.0, help="The eu worker's extra wait before a slow first token (s).")
    p.add_argument("--tail-fraction", type=float, default=0.03, help="Share of the eu worker's requests that are slow.")
    p.add_argument("--capacity", type=int, default=16, help="Each worker's --capacity at join (concurrent requests).")
    p.add_argument("--percentile", type=float, default=95.0, help="serve.hedge_percentile.")
    p.add_argument("--min-delay-s", type=float, default=0.05, help="serve.hedge_min_delay_s.")
    args = p.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # SIGTERM unwinds too: the bed's namespaces are removed
    scenarios = (args.tail_fraction, 0.0)  # the heavy tail, and the same fleet without it (what hedging costs there)
    with tempfile.TemporaryDirectory(prefix="hedging-") as tmp, Bed(REGIONS, Path(tmp) / "bed") as bed:
        mode = "network namespaces" if bed.use_netns else f"loopback links ({bed.netns_skip_reason})"
        results = {(tail, hedge): run_setting(bed, Path(tmp), hedge, tail, args) for tail in scenarios for hedge in ("off", "on")}
    print(f"bed: {mode}; router in hq; workers eu 5 ms, us 40 ms, ap 120 ms one way; client in eu (5 ms), "
          f"{args.concurrency} streams for {args.duration_s:g} s per row")
    print(f"tail: that share of the eu worker's requests wait +{1000 * args.tail_s:g} ms for their first token; service "
          f"{1000 * args.service_s:g} ms; hedge after the p{args.percentile:g} of the worker's first byte, at least "
          f"{1000 * args.min_delay_s:g} ms; client TTFT in ms")
    print(f"{'tail':<6}{'hedge':<7}{'requests':>9}{'p50':>7}{'p90':>7}{'p99':>7}{'p99.9':>7}{'req/s':>8}{'errors':>8}"
          f"{'hedges':>8}{'won':>6}{'extra':>8}")
    for tail in scenarios:
        for hedge in ("off", "on"):
            r, hedges = results[(tail, hedge)]
            fired = sum(hedges.values())
            extra = f"{100 * fired / len(r.ttft_s):.1f}%" if r.ttft_s else "-"
            print(f"{100 * tail:<5g}%{hedge:<7}{len(r.ttft_s):>9}{r.percentile(50):>7.0f}{r.percentile(90):>7.0f}"
                  f"{r.percentile(99):>7.0f}{r.percentile(99.9):>7.0f}{r.throughput:>8.1f}{sum(r.errors.values()):>8}"
                  f"{fired:>8.0f}{hedges.get('won', 0):>6.0f}{extra:>8}")
        off, on = results[(tail, "off")][0], results[(tail, "on")][0]
        print(f"{100 * tail:<5g}%{'on/off':<7}{'':>9}" + "".join(f"{on.percentile(q) / off.percentile(q):>6.2f}x" for q in (50, 90, 99, 99.9))
              + f"{on.throughput / off.throughput:>7.2f}x")

if __name__ == "__main__":
    main()
