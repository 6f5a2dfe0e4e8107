"""The worker gate's cost: the fake worker reached directly vs through `fedllm.serve.worker_gate` (as a worker runs it).

    .venv/bin/python bench/worker_gate.py [--duration-s 4] [--concurrency 1 64] [--delay-s 0 0.02] [--repeats 2]

Two identical fake workers (`fedllm.testing.fake_vllm`, 8 chunks): one on a loopback port (direct), one on a Unix socket
behind a gate process on a loopback port, with an API key as the appliance gives its workers. Each cell is a closed
loop of `concurrency` clients (bench/router_load.py's load generator, its own process), streaming or not; direct and
gate cells alternate, `--repeats` times, and the best of each is kept (the machine is shared: the best is the least
disturbed). `--delay-s` is the fake's time per request: 0 makes the backend CPU-bound (the gate then competes with it
for the same cores, a worst case), a few tens of ms is closer to a real generation. Prints one table: req/s, p50,
the gate's added p50 and its throughput as a share of direct's.
"""

from __future__ import annotations

import argparse
import os
import secrets
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import router_load as rl  # noqa: E402  (the load generator and process helpers)


def start_fakes(tmp: Path, key: str, delay_s: float) -> tuple[rl.Server, rl.Server, list[rl.Server]]:
    """The direct fake, the gate in front of the socket fake, and every process to stop."""
    env = {"VLLM_API_KEY": key}
    fake = [rl.PYTHON, "-m", "fedllm.testing.fake_vllm", "--model", rl.MODEL, "--chunks", "8", "--delay-s", str(delay_s)]
    port = rl.free_port()
    direct_proc = rl.spawn([*fake, "--port", str(port)], env=env)
    sock = tmp / "vllm.sock"
    behind_proc = rl.spawn([*fake, "--uds", str(sock)], env=env)
    gate_port = rl.free_port()
    gate_proc = rl.spawn([rl.PYTHON, "-m", "fedllm.serve.worker_gate", "--listen", f"127.0.0.1:{gate_port}", "--upstream", f"unix:{sock}"],
                         env={"WORKER_GATE_API_KEY": key}, log=tmp / "gate.log")
    headers = {"Authorization": f"Bearer {key}"}
    direct = rl.Server("direct", f"http://127.0.0.1:{port}", direct_proc, headers)
    gate = rl.Server("gate", f"http://127.0.0.1:{gate_port}", gate_proc, headers)
    behind = rl.Server("behind", "", behind_proc, headers)
    for server in (direct, gate):
        rl.wait_ready(server.url + "/v1/chat/completions", server.proc, headers=headers)
    return direct, gate, [gate, behind, direct]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration-s", type=float, default=4.0)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 64])
    parser.add_argument("--delay-s", type=float, nargs="+", default=[0.0, 0.02])
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    key = secrets.token_urlsafe(32)
    rows = []
    for delay in args.delay_s:
        with tempfile.TemporaryDirectory(prefix="gate-bench-") as tmp:
            direct, gate, servers = start_fakes(Path(tmp), key, delay)
            try:
                for stream in (False, True):
                    for c in args.concurrency:
                        best: dict[str, dict] = {}
                        for _ in range(args.repeats):
                            for server in (direct, gate):
                                r = rl.run_load(server.url, server.headers, c, stream, args.duration_s)
                                if r["errors"]:
                                    print(f"  {server.name} c={c} stream={stream}: {r['errors']} errors {r['error_kinds']}", file=sys.stderr)
                                if server.name not in best or r["rps"] > best[server.name]["rps"]:
                                    best[server.name] = r
                        rows.append((delay, stream, c, best["direct"], best["gate"]))
                        print(f"  measured delay={delay} stream={stream} c={c}", file=sys.stderr, flush=True)
            finally:
                for s in servers:
                    s.stop()
    print(f"\nworker_gate: fake worker (8 chunks) direct vs behind the gate, {args.duration_s:.0f} s per cell, best of "
          f"{args.repeats}, {os.cpu_count()} cores, {time.strftime('%Y-%m-%d %H:%M')}")
    print(f"{'delay s':>7} {'stream':<6} {'conc':>4} {'direct r/s':>10} {'gate r/s':>9} {'gate/direct':>11} {'direct p50':>10} {'gate p50':>9} {'+p50 ms':>8}")
    for delay, stream, c, d, g in rows:
        print(f"{delay:>7.3f} {'yes' if stream else 'no':<6} {c:>4} {d['rps']:>10.1f} {g['rps']:>9.1f} {g['rps'] / d['rps']:>11.1%} "
              f"{d['p50_ms']:>10.3f} {g['p50_ms']:>9.3f} {g['p50_ms'] - d['p50_ms']:>+8.3f}")


if __name__ == "__main__":
    main()
