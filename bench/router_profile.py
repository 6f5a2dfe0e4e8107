"""Where our router's CPU goes per request: py-spy samples of the router process under `bench/router_load.py`'s load.

The backend, the router (fully configured: a metered API key, metrics on) and the load generator are started exactly
as `router_load.py` starts them; for each cell (streamed or not, at `--concurrency`) py-spy records the router
process without pausing it (`--nonblocking`, idle samples left out), and each sample is put in the first category that
matches its stack from the leaf up (see `CATEGORIES`). The table gives each category's share of the samples and its
CPU microseconds per request (share times the router's CPU per request, read from /proc over the same cell).

    .venv/bin/python bench/router_profile.py [--concurrency 64] [--duration-s 6] [--workers 1] [--keep DIR]

py-spy runs from its own virtualenv (`PY_SPY_BIN`, default /tmp/pyspy-venv/bin/py-spy: `python3 -m venv
/tmp/pyspy-venv && /tmp/pyspy-venv/bin/pip install py-spy`); it is never a dependency of the project. `--workers 2`
puts two fake backends behind the router, so that the policy ranks them (with one, `choose` skips the policy).
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import router_load as rl

PY_SPY = Path(os.environ.get("PY_SPY_BIN", "/tmp/pyspy-venv/bin/py-spy"))

# (category, substrings of a frame "function (file:line)"): the first rule matching a frame, from the leaf up, wins.
CATEGORIES: list[tuple[str, tuple[str, ...]]] = [
    ("logging", ("logging/__init__.py",)),
    ("metrics (prometheus_client, label series)", ("prometheus_client/", "serve/metrics.py", "_observe (", "_client_abort (")),
    ("usage settlement (SSE event split, usage parse, bucket settle)",
     ("_take_usage (", "_settle (", "_complete_events (", "_usage_total (", "_with_usage_asked (", "_rewritten (")),
    ("key lookup and rate limits", ("serve/keys.py", "serve/limits.py", "authenticate (", "admit (")),
    ("policy and worker table (choose, resolve, begin/end, ttft)",
     ("serve/policy.py", "serve/registry.py", "serve/placement.py", "choose (", "serve/hedging.py")),
    ("request parse (headers, body read, JSON, fields)",
     ("read_request (", "read_fields (", "request_headers (", "serve/protocol.py")),
    ("client disconnect watch", ("ClientWatch", "_until_disconnect (", "gone (", "disarm (")),
    ("upstream HTTP client (aiohttp, yarl, multidict)", ("aiohttp/", "yarl/", "multidict/")),
    ("our relay and forward glue (forwarding.py)", ("serve/forwarding.py", "serve/app.py")),
    ("HTTP server (uvicorn + httptools)", ("uvicorn/", "httptools/", "starlette/")),
    ("event loop (uvloop/asyncio: scheduling, sockets, timers)", ("",)),
]


LOOP_FRAME = "Runner.run (asyncio/runners.py"  # the event loop: frames below it are the callbacks it runs


def categorize(stack: str) -> tuple[str, str]:
    """The category of one sampled stack and the function (without its line) that decided it.

    Only the frames the event loop called count (those after `asyncio.Runner.run`): a sample whose leaf is the loop
    itself is the loop's own C code (uvloop: polling, socket reads and writes, timers, dispatch)."""
    frames = stack.split(";")
    cut = max((i for i, f in enumerate(frames) if LOOP_FRAME in f), default=-1)
    for frame in reversed(frames[cut + 1:]):
        for name, needles in CATEGORIES[:-1]:
            if any(n in frame for n in needles):
                return name, frame.split(":")[0].strip() + ")"
    return CATEGORIES[-1][0], (frames[-1].split(":")[0].strip() + ")") if frames else "?"


def read_collapsed(path: Path) -> tuple[collections.Counter[str], collections.Counter[tuple[str, str]], int]:
    """Samples per category and per (category, deciding function), and the total, from py-spy's raw (collapsed) output."""
    by_cat: collections.Counter[str] = collections.Counter()
    by_fn: collections.Counter[tuple[str, str]] = collections.Counter()
    total = 0
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        n = int(count)
        total += n
        cat, fn = categorize(stack)
        by_cat[cat] += n
        by_fn[(cat, fn)] += n
    return by_cat, by_fn, total


def cpu_user_sys_s(pid: int) -> tuple[float, float]:
    """User and system (kernel: socket syscalls, polling) CPU seconds of process `pid` so far, all its threads."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    tick = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / tick, int(fields[12]) / tick


def profile_cell(router: rl.Server, stream: bool, concurrency: int, duration_s: float, out: Path, rate: int) -> dict:
    """One cell of load on `router` while py-spy records it; returns the load result with the profile's counts."""
    warmup = 0.5
    spy = subprocess.Popen([str(PY_SPY), "record", "--pid", str(router.proc.pid), "--rate", str(rate), "--nonblocking",
                            "--format", "raw", "--duration", str(int(duration_s + warmup + 1)), "--output", str(out)],
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    time.sleep(0.5)  # py-spy attached before the load starts
    user0, sys0 = cpu_user_sys_s(router.proc.pid)
    result = rl.run_load(router.url, router.headers, concurrency, stream, duration_s, warmup_s=warmup)
    user1, sys1 = cpu_user_sys_s(router.proc.pid)
    per = 1e6 / max(1, result["total"])
    result["cpu_us"], result["sys_us"] = ((user1 - user0) + (sys1 - sys0)) * per, (sys1 - sys0) * per
    _, err = spy.communicate(timeout=60)
    if not out.exists():
        raise RuntimeError(f"py-spy wrote no profile: {err.decode(errors='replace')[-400:]}")
    result["by_cat"], result["by_fn"], result["samples"] = read_collapsed(out)
    out.with_suffix(".json").write_text(json.dumps({k: result[k] for k in ("rps", "cpu_us", "sys_us", "p50_ms", "errors", "total")}))
    return result


def print_profile(rows: list[tuple[bool, dict]], concurrency: int, workers: int, top: int = 25) -> None:
    print(f"\nrouter_profile: our router, {workers} fake backend(s), concurrency {concurrency}, py-spy --nonblocking, "
          f"{os.cpu_count()} cores; us/req = share of samples x the router's /proc CPU per request")
    cats = [name for name, _ in CATEGORIES]
    header = f"{'category':<62}" + "".join(f" {'stream' if s else 'non-stream':>12} {'us/req':>7}" for s, _ in rows)
    print(header)
    for cat in cats:
        cells = ""
        for _, r in rows:
            share = r["by_cat"].get(cat, 0) / max(1, r["samples"])
            cells += f" {share:>12.1%} {share * r['cpu_us']:>7.0f}"
        print(f"{cat:<62}{cells}")
    print(f"{'total (router CPU per request, /proc)':<62}" + "".join(f" {'100%':>12} {r['cpu_us']:>7.0f}" for _, r in rows))
    print(f"{'  of which in the kernel (system time, /proc)':<62}"
          + "".join(f" {r.get('sys_us', 0) / max(1, r['cpu_us']):>12.0%} {r.get('sys_us', 0):>7.0f}" for _, r in rows))
    for s, r in rows:
        print(f"{'streamed' if s else 'non-streamed'}: {r['rps']:.0f} req/s, {r['samples']} samples, p50 {r['p50_ms']:.2f} ms, "
              f"errors {r['errors']}; the functions that decided the category, most samples first:")
        for (cat, fn), n in r["by_fn"].most_common(top):
            print(f"  {n / max(1, r['samples']):6.1%} {n / max(1, r['samples']) * r['cpu_us']:5.0f} us  {fn[:90]:<90} [{cat.split(' (')[0]}]")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--duration-s", type=float, default=6.0)
    parser.add_argument("--workers", type=int, default=1, help="Fake backends behind the router (2 exercises the policy).")
    parser.add_argument("--rate", type=int, default=200, help="py-spy samples per second.")
    parser.add_argument("--keep", type=Path, help="Keep py-spy's collapsed stacks (and each cell's figures) in this folder.")
    parser.add_argument("--analyze", type=Path, help="Only print the table again from a --keep folder of an earlier run.")
    args = parser.parse_args()
    if args.analyze:
        rows = []
        for stack_file in sorted(args.analyze.glob(f"router-c{args.concurrency}-w{args.workers}-*.txt"), reverse=True):
            result = json.loads(stack_file.with_suffix(".json").read_text())
            result["by_cat"], result["by_fn"], result["samples"] = read_collapsed(stack_file)
            rows.append((stack_file.stem.endswith("-stream"), result))
        print_profile(rows, args.concurrency, args.workers)
        return
    if not PY_SPY.exists():
        sys.exit(f"{PY_SPY} not found: python3 -m venv /tmp/pyspy-venv && /tmp/pyspy-venv/bin/pip install py-spy "
                 "(or set PY_SPY_BIN)")
    servers: list[rl.Server] = []
    rows: list[tuple[bool, dict]] = []
    with tempfile.TemporaryDirectory(prefix="router-profile-") as tmp:
        out_dir = args.keep or Path(tmp)
        out_dir.mkdir(parents=True, exist_ok=True)
        try:
            backends = [rl.start_backend() for _ in range(args.workers)]
            servers += backends
            router = rl.start_router(",".join(b.url for b in backends), Path(tmp) / "router")
            servers.append(router)
            for stream in (False, True):
                out = out_dir / f"router-c{args.concurrency}-w{args.workers}-{'stream' if stream else 'nonstream'}.txt"
                rows.append((stream, profile_cell(router, stream, args.concurrency, args.duration_s, out, args.rate)))
                print(f"  profiled stream={stream}: {rows[-1][1]['rps']:.0f} req/s", file=sys.stderr, flush=True)
        finally:
            for s in reversed(servers):
                s.stop()
    print_profile(rows, args.concurrency, args.workers)


if __name__ == "__main__":
    main()
