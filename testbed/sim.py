"""`appliance sim geo`: a demo fleet and federation on a WAN test bed, for people who want to see one.

Regions are given as `NAME:SPEC` pairs (`eu:5ms,us:40ms/100mbit,ap:120ms+10ms/10mbit`); the router and the coordinator
run in an extra region `hq` with no delay of its own. Each region gets a fake vLLM worker (joined with
`appliance worker join`) and, when a prepared model is at hand, a silo (`appliance silo join`). Clients in every
region stream requests with `X-Region` for a while (optionally cutting one region halfway), then the federation runs
a few rounds; both are summarised as tables.
"""

from __future__ import annotations

import functools
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

from fedllm.testbed.bed import Bed
from fedllm.testbed.federation import GeoFederation
from fedllm.testbed.fleet import FAKE_MODEL, GeoFleet
from fedllm.testbed.link import LinkSpec
from fedllm.testbed.load import LoadResult, stream_load

HUB_REGION = "hq"
SIM_TRAIN_ENV = {
    "APPLIANCE_TRAIN__MAX_SEQ_LEN": "128",
    "APPLIANCE_TRAIN__BATCH_SIZE": "1",
    "APPLIANCE_TRAIN__WARMUP_STEPS": "0",
    "APPLIANCE_TRAIN__ZERO_STAGE": "0",
    "APPLIANCE_FEDERATION__HEARTBEAT_INTERVAL_S": "2",
    "APPLIANCE_FEDERATION__SILO_TIMEOUT_S": "20",
}


def parse_regions(text: str) -> dict[str, LinkSpec]:
    """`eu:5ms,us:40ms/100mbit` -> {"eu": LinkSpec(5), "us": LinkSpec(40, 0, 100)}.

    Raises:
        ValueError: a malformed pair, a repeated name, or the reserved name `hq`.
    """
    regions: dict[str, LinkSpec] = {}
    for pair in filter(None, (p.strip() for p in text.split(","))):
        name, sep, spec = pair.partition(":")
        if not sep:
            raise ValueError(f"bad region {pair!r}; expected NAME:DELAYms[+JITTERms][/BWmbit], e.g. eu:5ms")
        if name in regions or name == HUB_REGION:
            raise ValueError(
                f"region name {name!r} is repeated or reserved (the router and coordinator run in {HUB_REGION!r})"
            )
        regions[name] = LinkSpec.parse(spec)
    if not regions:
        raise ValueError("no regions given; e.g. --regions eu:5ms,us:40ms,ap:120ms")
    return regions


@dataclass
class SimReport:
    """What the demo saw: per client region load results, and the federation's round records."""

    mode: str
    load: dict[str, LoadResult] = field(default_factory=dict)
    served_by: dict[str, int] = field(default_factory=dict)
    rounds: list[dict[str, Any]] = field(default_factory=list)

    def fleet_table(self) -> str:
        lines = [f"{'client region':<15}{'requests':>9}{'TTFT p50 ms':>13}{'TTFT p99 ms':>13}{'errors':>8}"]
        for region, r in self.load.items():
            lines.append(
                f"{region:<15}{len(r.ttft_s):>9}{r.percentile(50):>13.0f}{r.percentile(99):>13.0f}{sum(r.errors.values()):>8}"
            )
        lines.append("served by: " + ", ".join(f"{w} {n}" for w, n in sorted(self.served_by.items())))
        return "\n".join(lines)

    def federation_table(self) -> str:
        lines = [f"{'round':<7}{'participants':<40}{'wall s':>8}{'non-training':>14}"]
        for r in self.rounds:
            if "participants" in r:
                lines.append(
                    f"{r['round']:<7}{', '.join(r['participants']):<40}"
                    f"{r['duration_s']:>8.1f}{r['non_training_share']:>14.1%}"
                )
            else:
                lines.append(f"{r['round']:<7}failed: {r.get('failed', '')}")
        last = next((r for r in reversed(self.rounds) if r.get("timings")), None)
        if last is not None:  # where each silo's time went in the last round (download and upload cross its link)
            lines.append(
                f"{'silo (round ' + str(last['round']) + ')':<28}{'download s':>11}{'train s':>9}{'upload s':>10}"
            )
            for silo, t in sorted(last["timings"].items()):
                cells = [
                    f"{t[k]:>{w}.2f}" if isinstance(t.get(k), (int, float)) else f"{'-':>{w}}"
                    for k, w in (("download_s", 11), ("train_s", 9), ("upload_s", 10))
                ]
                lines.append(f"{silo:<28}{''.join(cells)}")
        return "\n".join(lines)


def run_geo(
    regions: dict[str, LinkSpec],
    workdir: Path,
    *,
    model_dir: Path | None,
    duration_s: float = 20.0,
    concurrency: int = 2,
    cut: str | None = None,
    rounds: int = 2,
    echo: Callable[[str], None] = print,
    silo_data: Mapping[str, Path] | None = None,
) -> SimReport:
    """Bring up the bed, the fleet and (with `model_dir` and `silo_data`) the federation; run the load and the rounds;
    tear down. `silo_data` maps an organisation to its training JSONL (the caller writes it, e.g. the demo data); the
    silos of the regions take the organisations in turn."""
    if cut is not None and cut not in regions:
        raise ValueError(f"--cut {cut!r} is not one of the regions {sorted(regions)}")
    with Bed({HUB_REGION: LinkSpec(0), **regions}, workdir / "bed") as bed:
        report = SimReport("network namespaces" if bed.use_netns else f"loopback links ({bed.netns_skip_reason})")
        echo(
            f"test bed: {report.mode}; router and coordinator in {HUB_REGION}; "
            + ", ".join(f"{n} {s.describe()}" for n, s in regions.items())
        )
        fleet = GeoFleet(bed, HUB_REGION, workdir / "router-home", serve_env={"HEALTH_INTERVAL_S": "1.0"})
        fleet.start_router()
        for region in regions:
            fleet.add_fake_worker(
                region, f"worker-{region}", "--delay-s", "0.02", "--chunks", "8", join_args=("--capacity", "4")
            )
        fleet.wait_healthy()
        echo(
            f"fleet up: {len(regions)} workers joined; {concurrency} streams per region for {duration_s:g} s"
            + (f", cutting {cut} halfway" if cut else "")
        )
        report.load = _load(bed, fleet, list(regions), concurrency, duration_s, cut, echo)
        report.served_by = _served_by(bed, fleet)
        if model_dir is not None and silo_data and rounds > 0:
            report.rounds = _federate(bed, workdir, model_dir, silo_data, regions, rounds, echo)
        return report


def _load(
    bed: Bed,
    fleet: GeoFleet,
    regions: list[str],
    concurrency: int,
    duration_s: float,
    cut: str | None,
    echo: Callable[[str], None],
) -> dict[str, LoadResult]:
    def load(region: str) -> LoadResult:
        url = fleet.router_url(region)
        return bed.run(
            region,
            lambda: stream_load(
                url, fleet.api_key, FAKE_MODEL, region=region, concurrency=concurrency, duration_s=duration_s
            ),
        )

    with ThreadPoolExecutor(len(regions)) as pool:
        futures = {r: pool.submit(load, r) for r in regions}
        if cut:
            time.sleep(duration_s / 2)
            bed.cut(cut)
            echo(f"cut {cut} off")
        results = {r: f.result() for r, f in futures.items()}
    if cut:
        bed.restore(cut)
        fleet.wait_healthy(timeout_s=60)
        echo(f"{cut} restored and re-admitted")
    return results


def _served_by(bed: Bed, fleet: GeoFleet) -> dict[str, int]:
    import httpx

    def requests_of(url: str) -> list[dict[str, Any]]:
        return httpx.get(f"{url}/fake/requests", timeout=10).json()

    counts = {}
    for w in fleet.workers.values():
        received = bed.call(w.region, functools.partial(requests_of, w.url))
        counts[w.name] = sum(1 for e in received if e.get("path") == "/v1/chat/completions")
    return counts


def _federate(
    bed: Bed,
    workdir: Path,
    model_dir: Path,
    data: Mapping[str, Path],
    regions: dict[str, LinkSpec],
    rounds: int,
    echo: Callable[[str], None],
) -> list[dict[str, Any]]:
    orgs = list(data)
    fed = GeoFederation(bed, HUB_REGION, workdir / "federation", model_dir, env=SIM_TRAIN_ENV)
    fed.init()
    silos = {f"{orgs[i % len(orgs)]}-{region}": (region, orgs[i % len(orgs)]) for i, region in enumerate(regions)}
    for name, (region, _) in silos.items():
        fed.enroll(name, region)
    min_silos = min(2, len(silos))
    fed.start_coordinator(
        "--rounds", str(rounds), "--min-silos", str(min_silos), "--round-deadline", "600", "--local-steps", "1"
    )
    for name, (_, org) in silos.items():
        fed.start_silo(name, data[org])
    echo(f"federation: coordinator in {HUB_REGION} (CURVE), {len(silos)} silos, {rounds} round(s)")
    for n in range(1, rounds + 1):
        record = fed.wait_round(n, timeout_s=900)
        echo(f"round {n} done: {', '.join(record['participants'])}")
    return fed.rounds()
