"""Coordinator memory, round overhead and bytes with many simulated silos (issue 24).

For each adapter size and silo count, the coordinator runs in its own process (`fedllm.federation.demo.simulate.coordinator_part`:
the real Coordinator over CURVE, default strategy and settings, no adapter registry) and the simulated silos
(`appliance sim silos N --part silos`: real SiloClients with a model-free trainer) in another. The coordinator's
resident memory is sampled from /proc every 0.1 s and its peak (VmHWM) reported at the end.

    python bench/federation_scale.py [--small 2,10,50,100,200] [--large 2,10,25] [--rounds 2]
        [--baseline DIR] [--lock /tmp/heavy.lock] [--out results.json]

Sizes: `embedded` = SmolLM2-135M LoRA at the default r=8 on q/k/v/o (921,600 parameters, 3.7 MB in fp32), `7b` =
Llama-2-7B LoRA r=16 on every linear layer (40.0 M parameters, 160 MB in fp32); shapes from the model config, no
weights. With `--baseline DIR` (another checkout, e.g. `git worktree add --detach /tmp/base main`) each point also
runs that checkout's coordinator (same simulation code, its `federation` package) side by side. With `--lock`, each
point holds that flock while it runs (the machine is shared).

Columns: peak = the coordinator's peak RSS; over start = peak minus its RSS before the first round; per silo = the
growth of the peak per added silo from the previous count; overhead = a round's duration less its slowest silo's
training (mean over rounds); MB/round = bytes in + out of a round (mean).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import fcntl
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent.parent  # this checkout
SIMULATE = HERE / "federation" / "demo" / "simulate.py"


def _load_simulate():
    """This checkout's simulation module, whatever `federation` package is on the path (the baseline's, in a baseline
    coordinator process)."""
    spec = importlib.util.spec_from_file_location("federation_simulate_under_test", SIMULATE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def coordinator_main(args: argparse.Namespace) -> None:
    """The coordinator process: `--tree`'s federation package, this checkout's simulation code."""
    sys.path.insert(0, str(args.tree))
    import logging

    logging.basicConfig(level=logging.WARNING)
    sim = _load_simulate()
    report = asyncio.run(sim.coordinator_part(Path(args.home), args.silos, args.rounds, preset=args.adapter,
                                              timeout_s=args.timeout_s))
    report.pop("history", None)
    Path(args.report).write_text(json.dumps(report))


def _rss_kb(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


@contextlib.contextmanager
def _locked(path: str | None):
    if path is None:
        yield
        return
    with open(path, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def run_point(tree: Path, adapter: str, silos: int, rounds: int, timeout_s: float) -> dict:
    """One coordinator process (of `tree`) and one silos process; the coordinator's report plus sampled RSS."""
    with tempfile.TemporaryDirectory(prefix="fed-scale-") as tmp:
        home = Path(tmp)
        report = home / "coordinator-report.json"
        env = {**os.environ, "PYTHONPATH": str(tree)}
        coord = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--coordinator-part", "--tree", str(tree),
                                  "--home", str(home), "--silos", str(silos), "--rounds", str(rounds), "--adapter", adapter,
                                  "--report", str(report), "--timeout-s", str(timeout_s)], env=env)
        silo_env = {**os.environ, "PYTHONPATH": str(HERE)}
        silo_proc = subprocess.Popen([sys.executable, "-m", "fedllm.appliance", "sim", "silos", str(silos), "--part", "silos",
                                      "--sim-dir", str(home)], env=silo_env, stdout=subprocess.DEVNULL,
                                     stderr=open(home / "silos.log", "w"))
        samples, started = [], time.monotonic()
        try:
            while coord.poll() is None:
                if time.monotonic() - started > timeout_s:
                    raise TimeoutError(f"{adapter} x {silos}: no result within {timeout_s:.0f} s")
                samples.append(_rss_kb(coord.pid))
                time.sleep(0.1)
            silo_proc.wait(timeout=60)
        finally:
            for proc in (coord, silo_proc):
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
        if coord.returncode != 0 or not report.exists():
            tail = (home / "silos.log").read_text()[-2000:]
            raise RuntimeError(f"{adapter} x {silos}: the coordinator exited {coord.returncode}; silos' log tail:\n{tail}")
        out = json.loads(report.read_text())
        out["sampled_peak_rss_bytes"] = max(samples, default=0) * 1024
        return out


def summarise(point: dict) -> dict:
    rows = [r for r in point["rounds"] if "failed" not in r]
    return {"silos": point["silos"], "peak_mib": point["peak_rss_bytes"] / 2**20,
            "over_start_mib": (point["peak_rss_bytes"] - point["start_rss_bytes"]) / 2**20,
            "overhead_s": sum(r["overhead_s"] for r in rows) / max(1, len(rows)),
            "mb_per_round": sum(r["bytes"] for r in rows) / max(1, len(rows)) / 1e6,
            "rounds_ok": len(rows), "rounds_failed": len(point["rounds"]) - len(rows),
            "adapter_mib": point["parameters"] * 4 / 2**20}


def table(name: str, results: dict[str, list[dict]]) -> str:
    trees = list(results)
    lines = [f"### {name}", "", "| silos | " + " | ".join(
        f"{t}: peak MiB | {t}: over start MiB | {t}: MiB per added silo | {t}: overhead s | {t}: MB/round" for t in trees) + " |",
             "|---:|" + "---:|" * (5 * len(trees))]
    for i in range(len(results[trees[0]])):
        cells = [str(results[trees[0]][i]["silos"])]
        for t in trees:
            s = results[t][i]
            prev = results[t][i - 1] if i else None
            per = (s["peak_mib"] - prev["peak_mib"]) / (s["silos"] - prev["silos"]) if prev else float("nan")
            failed = f" ({s['rounds_failed']} failed)" if s["rounds_failed"] else ""
            cells += [f"{s['peak_mib']:.0f}", f"{s['over_start_mib']:.0f}", f"{per:.2f}", f"{s['overhead_s']:.2f}{failed}",
                      f"{s['mb_per_round']:.1f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--small", default="2,10,50,100,200", help="Silo counts at the embedded model's adapter size ('' to skip).")
    parser.add_argument("--large", default="2,10,25", help="Silo counts at the 7B r=16 adapter size ('' to skip).")
    parser.add_argument("--rounds", type=int, default=2, help="Rounds per point.")
    parser.add_argument("--baseline", type=Path, help="Another checkout whose coordinator runs beside this one's.")
    parser.add_argument("--lock", help="A flock file held while each point runs.")
    parser.add_argument("--timeout-s", type=float, default=900.0, help="Give up on a point after this long.")
    parser.add_argument("--out", type=Path, help="Write all results as JSON here.")
    # the coordinator process (internal)
    parser.add_argument("--coordinator-part", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--tree", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--home", help=argparse.SUPPRESS)
    parser.add_argument("--silos", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--adapter", help=argparse.SUPPRESS)
    parser.add_argument("--report", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.coordinator_part:
        coordinator_main(args)
        return
    trees = {"this": HERE}
    if args.baseline is not None:
        trees["baseline"] = args.baseline.resolve()
    everything = {}
    for adapter, counts in (("embedded", args.small), ("7b", args.large)):
        silo_counts = [int(c) for c in counts.split(",") if c.strip()]
        if not silo_counts:
            continue
        results: dict[str, list[dict]] = {t: [] for t in trees}
        raw: dict[str, list[dict]] = {t: [] for t in trees}
        for n in silo_counts:
            for name, tree in trees.items():
                with _locked(args.lock):
                    point = run_point(tree, adapter, n, args.rounds, args.timeout_s)
                raw[name].append(point)
                results[name].append(summarise(point))
                s = results[name][-1]
                print(f"{adapter} {name} {n} silos: peak {s['peak_mib']:.0f} MiB (+{s['over_start_mib']:.0f} over start), "
                      f"overhead {s['overhead_s']:.2f} s, {s['mb_per_round']:.1f} MB/round", flush=True)
        about = raw["this"][0]["adapter"]
        print()
        print(table(f"{adapter}: {about}, {raw['this'][0]['parameters']:,} parameters "
                    f"({results['this'][0]['adapter_mib']:.1f} MiB fp32), {args.rounds} rounds", results))
        print()
        everything[adapter] = {"summary": results, "raw": raw}
    if args.out is not None:
        args.out.write_text(json.dumps(everything, indent=1))


if __name__ == "__main__":
    main()
