"""Coordinator soak (issue 24): the real coordinator over CURVE for many short rounds while simulated silos leave and
come back, with its process and its run folder sampled throughout. Nothing may grow but the append-only round log.

    python bench/soak_federation.py [--minutes 30] [--rounds 300] [--silos 10] [--churn-every-s 2]
        [--lock /tmp/heavy.lock] [--out soak.json]

Three processes: the coordinator (`fedllm.federation.demo.simulate.coordinator_part`: the product's Coordinator, default strategy
and checkpoint retention, no adapter registry, embedded adapter size), the silos (real `SiloClient`s with the
model-free `SimTrainer`; every `--churn-every-s` one of them leaves with a BYE and one that left earlier comes back
with a new connection, so the coordinator sees leaves and rejoins all run long), and this one, which samples the
coordinator every `--sample-s`: resident memory (VmRSS), open file descriptors, threads, and its run folder (see
`folder_sample`).

The run ends after `--rounds` rounds or `--minutes`, whichever comes first. Verdict: RSS, fds and threads after
warm-up (the first third of the run) against the end (the median of the last tenth of samples): within 10 % is flat;
at most `federation.keep_checkpoints` checkpoints (+1 staged), whose bytes and `state.json` reach no higher after
warm-up than in it; the round log and TensorBoard events are append-only logs (reported); every round completed or failed with a reason (counted).
Exit status 1 when something is not flat or bounded.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(HERE))  # run as a script: this checkout's packages

from fedllm.testing.soak import FLAT, figures_table, flat_checks, locked, proc_sample  # noqa: E402


# ---------------------------------------------------------------- the coordinator and silos processes

def coordinator_main(home: Path, silos: int, rounds: int, timeout_s: float) -> None:
    from fedllm.federation.demo.simulate import coordinator_part

    logging.basicConfig(level=logging.WARNING)
    # Short rounds: one local step, a deadline that bounds a round a leaving silo was part of, and quorum below the
    # silo count so that a round starts while one silo is away.
    report = asyncio.run(coordinator_part(home, silos, rounds, timeout_s=timeout_s, min_silos=max(1, silos - 2),
                                          round_deadline_s=5.0, silo_timeout_s=10.0))
    report.pop("history", None)
    (home / "coordinator-report.json").write_text(json.dumps(report))


async def churning_silos(home: Path, n: int, churn_every_s: float, counts: dict[str, int], seed: int = 0) -> None:
    """`n` simulated silos against the coordinator under `home`; every `churn_every_s` one leaves (BYE) and the one
    that left before it comes back on a new connection. Runs until the coordinator says the run is over (or this
    process is stopped); `counts` gets the leaves, rejoins and rounds trained as they happen."""
    from fedllm.core.settings import load_settings
    from fedllm.federation.wire.keys import enroll_silos
    from fedllm.federation.runtime.silo import SiloClient
    from fedllm.federation.demo.simulate import COORDINATOR_FILE, SimTrainer, make_keypairs, wait_for_file

    info = await wait_for_file(home / COORDINATOR_FILE, timeout_s=300)
    keypairs = make_keypairs(n)
    enroll_silos(Path(info["keys_dir"]), {name: kp.public for name, kp in keypairs.items()})
    settings = load_settings(overrides={"home": str(home / "silos")})

    def client(i: int, name: str) -> SiloClient:
        fed = settings.federation.model_copy(update={"coordinator": info["address"], "coordinator_key": info["public_key"],
                                                     "silo_id": name, "plaintext": False})
        return SiloClient(settings.model_copy(update={"federation": fed}), SimTrainer(i), keypair=keypairs[name])

    names = sorted(keypairs)
    active = {name: client(i, name) for i, name in enumerate(names)}
    away: list[str] = []
    counts.update(leaves=0, rejoins=0, rounds_trained=0)
    rng = random.Random(seed)
    for silo in active.values():
        await silo.start()
    try:
        while not any(s.finished.is_set() for s in active.values()):
            await asyncio.sleep(churn_every_s)
            if away:  # the one that left last time comes back
                name = away.pop(0)
                active[name] = client(names.index(name), name)
                await active[name].start()
                counts["rejoins"] += 1
            name = rng.choice(sorted(active))
            leaving = active.pop(name)
            counts["rounds_trained"] += len(leaving.rounds_done)
            await leaving.stop(say_bye=True)
            away.append(name)
            counts["leaves"] += 1
    finally:
        for silo in active.values():
            counts["rounds_trained"] += len(silo.rounds_done)
            await silo.stop(say_bye=False)


def silos_main(home: Path, silos: int, churn_every_s: float) -> None:
    """The silos process; its counts are written when the run ends or when it is stopped (SIGTERM)."""
    import signal

    logging.basicConfig(level=logging.WARNING)
    counts: dict[str, int] = {}

    async def run() -> None:
        task = asyncio.current_task()
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
        with contextlib.suppress(asyncio.CancelledError):
            await churning_silos(home, silos, churn_every_s, counts)

    asyncio.run(run())
    (home / "silos-report.json").write_text(json.dumps(counts))


# ---------------------------------------------------------------- sampling

def _bytes(root: Path) -> int:
    total = 0
    for path in root.rglob("*") if root.is_dir() else ():
        with contextlib.suppress(FileNotFoundError):  # a checkpoint pruned, a spool file removed, while we walk
            if path.is_file():
                total += path.stat().st_size
    return total


def folder_sample(run_dir: Path) -> dict[str, int]:
    """The run folder: checkpoints kept and their bytes, the newest checkpoint's state.json, the append-only logs
    (round log and TensorBoard events), the rest (the round's update spool, staging), and rounds completed."""
    rounds_dir, log = run_dir / "rounds", run_dir / "rounds.jsonl"
    kept = sorted(p for p in rounds_dir.iterdir() if p.is_dir()) if rounds_dir.is_dir() else []
    state_bytes = 0
    with contextlib.suppress(FileNotFoundError, IndexError):
        state_bytes = (kept[-1] / "state.json").stat().st_size
    logs = (log.stat().st_size if log.is_file() else 0) + _bytes(run_dir / "tb")
    checkpoint_bytes = _bytes(rounds_dir)
    return {"checkpoints": len(kept), "checkpoint_bytes": checkpoint_bytes, "state_bytes": state_bytes, "log_bytes": logs,
            "other_bytes": max(0, _bytes(run_dir) - checkpoint_bytes - logs),
            "rounds": sum(1 for _ in log.open("rb")) if log.is_file() else 0}


def verdict(samples: list[dict], keep_checkpoints: int, warmup_fraction: float = 1 / 3) -> dict:
    """Warm-up and end figures, and whether each is flat (within FLAT) or bounded."""
    n = len(samples)
    warm, end, checks = flat_checks(samples, ("rss_kb", "fds", "threads"), warmup_fraction)
    cut = int(n * warmup_fraction)
    out: dict = {"start": samples[0], "warm": warm, "end": end}
    # How many checkpoints are on disk swings within a round (a new one is staged before the oldest is pruned), so
    # their bytes are compared per checkpoint; state.json swings with a record's lists. Bounded: the most either
    # reaches after warm-up is no more than what it reached in it.
    early, late = samples[n // 6:cut + 1], samples[cut + 1:] or samples[-1:]
    for key, slack in (("checkpoint_bytes", 0), ("state_bytes", 512)):
        size = (lambda s: s[key] / max(s["checkpoints"], 1)) if key == "checkpoint_bytes" else (lambda s: s[key])
        before, after = max(map(size, early)), max(map(size, late))
        checks[key] = {"growth": round(after / max(before, 1) - 1, 4), "flat": after <= (1 + FLAT) * before + slack}
    most = max(s["checkpoints"] for s in samples)
    checks["checkpoints"] = {"growth": most, "flat": most <= keep_checkpoints + 1}  # +1: the new one before pruning
    out["checks"] = checks
    out["ok"] = all(c["flat"] for c in checks.values())
    return out


def soak(minutes: float, rounds: int, silos: int, churn_every_s: float, sample_s: float) -> dict:
    """Run the soak in a fresh folder; the samples, the two parts' reports and the verdict."""
    with tempfile.TemporaryDirectory(prefix="soak-fed-") as tmp:
        home = Path(tmp)
        me = str(Path(__file__).resolve())
        env = {**os.environ, "PYTHONPATH": str(HERE)}
        limit_s = minutes * 60
        coord = subprocess.Popen([sys.executable, me, "--part", "coordinator", "--home", str(home), "--silos", str(silos),
                                  "--rounds", str(rounds), "--timeout-s", str(limit_s + 120)], env=env,
                                 stderr=open(home / "coordinator.log", "w"))
        silo_proc = subprocess.Popen([sys.executable, me, "--part", "silos", "--home", str(home), "--silos", str(silos),
                                      "--churn-every-s", str(churn_every_s)], env=env, stderr=open(home / "silos.log", "w"))
        run_dir = home / "coordinator" / "federation" / "sim"
        samples: list[dict] = []
        started = time.monotonic()
        try:
            while coord.poll() is None and time.monotonic() - started < limit_s:
                sample = {"t": round(time.monotonic() - started, 1), **proc_sample(coord.pid), **folder_sample(run_dir)}
                samples.append(sample)
                if sample["rounds"] >= rounds:
                    break
                time.sleep(sample_s)
        finally:
            for proc in (silo_proc, coord):
                if proc.poll() is None:
                    proc.terminate()
                    try:
                        proc.wait(timeout=30)
                    except subprocess.TimeoutExpired:
                        proc.kill()
                        proc.wait()
        records = [json.loads(line) for line in (run_dir / "rounds.jsonl").read_text().splitlines()] if (run_dir / "rounds.jsonl").is_file() else []
        failed = [r for r in records if "failed" in r]
        result = {"minutes": round((time.monotonic() - started) / 60, 2), "silos": silos, "churn_every_s": churn_every_s,
                  "rounds_completed": len(records) - len(failed), "rounds_failed": len(failed),
                  "failure_reasons": sorted({str(r["failed"])[:120] for r in failed}),
                  "samples": samples}
        for name in ("coordinator-report.json", "silos-report.json"):
            if (home / name).is_file():
                result[name.split("-")[0] + "_report"] = json.loads((home / name).read_text())
        if not records:
            tail = (home / "coordinator.log").read_text()[-2000:] + (home / "silos.log").read_text()[-2000:]
            raise RuntimeError(f"no round completed; logs end with:\n{tail}")
        from fedllm.core.sections.federation import FederationSettings

        result["verdict"] = verdict(samples, FederationSettings().keep_checkpoints)
        return result


def table(result: dict) -> str:
    return figures_table(result["verdict"], (
        ("rss_kb", "RSS MB", 1024), ("fds", "open fds", 1), ("threads", "threads", 1), ("checkpoints", "checkpoints kept", 1),
        ("checkpoint_bytes", "checkpoints MB", 1 << 20), ("state_bytes", "state.json KB", 1024),
        ("other_bytes", "update spool MB", 1 << 20), ("log_bytes", "round log + events KB", 1024), ("rounds", "rounds", 1)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=30.0, help="Stop after this long (default 30).")
    parser.add_argument("--rounds", type=int, default=300, help="Stop after this many rounds (default 300).")
    parser.add_argument("--silos", type=int, default=10, help="Simulated silos (default 10).")
    parser.add_argument("--churn-every-s", type=float, default=2.0, help="Seconds between a silo leaving and one coming back.")
    parser.add_argument("--sample-s", type=float, default=1.0, help="Seconds between samples of the coordinator.")
    parser.add_argument("--lock", default=None, help="Hold this flock for the whole run (a shared machine).")
    parser.add_argument("--out", type=Path, default=None, help="Also write the result (with every sample) as JSON here.")
    parser.add_argument("--part", choices=("coordinator", "silos"), help=argparse.SUPPRESS)
    parser.add_argument("--home", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--timeout-s", type=float, default=3600.0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.part == "coordinator":
        return coordinator_main(args.home, args.silos, args.rounds, args.timeout_s)
    if args.part == "silos":
        return silos_main(args.home, args.silos, args.churn_every_s)
    with locked(args.lock):
        result = soak(args.minutes, args.rounds, args.silos, args.churn_every_s, args.sample_s)
    if args.out:
        args.out.write_text(json.dumps(result, indent=1))
    print(f"coordinator soak: {result['silos']} silos, a leave and a rejoin every {result['churn_every_s']:g} s, "
          f"{result['minutes']:.1f} min: {result['rounds_completed']} rounds completed, {result['rounds_failed']} failed "
          f"{result['failure_reasons'] or ''}; silos: {result.get('silos_report', {})}")
    print(table(result))
    print("verdict:", "flat" if result["verdict"]["ok"] else "GROWS: " + ", ".join(
        k for k, c in result["verdict"]["checks"].items() if not c["flat"]))
    sys.exit(0 if result["verdict"]["ok"] else 1)


if __name__ == "__main__":
    main()
