"""Aggregation time and peak memory for SmolLM2-sized LoRA updates, per strategy and silo count.

    .venv/bin/python bench/aggregation.py                      # all strategies x 2, 8, 32 silos: a table
    .venv/bin/python bench/aggregation.py --silos 2 8 --strategies fedavg median --json

Shapes: LoRA r=8 on q/k/v/o of every layer, derived from the prepared model's config.json if present
(.cache/test-home/models/smollm2-135m-instruct/config.json), else SmolLM2-135M's numbers (30 layers, hidden 576,
9 heads, 3 KV heads, head_dim 64): 240 tensors, 921,600 parameters.

Each (strategy, silos) point runs in a fresh Python process, so its peak memory is not polluted by earlier
points: "peak MiB" is the growth of the process's maximum RSS during the round (all `add` calls + `finish_round`)
over its RSS just before, and "agg s" the time inside `add` + `finish_round` (creating the updates is excluded).
Updates are generated one at a time and dropped after `add`, as the coordinator does. Streaming strategies should
stay flat in silos; robust ones (median, trimmed mean, Krum) keep every update and grow linearly.

`measure(...)`, `measure_isolated(...)` and `lora_shapes(...)` are importable (bench/federation_round.py uses them).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

CONFIG = REPO / ".cache" / "test-home" / "models" / "smollm2-135m-instruct" / "config.json"
SMOLLM2 = {"num_hidden_layers": 30, "hidden_size": 576, "num_attention_heads": 9, "num_key_value_heads": 3,
           "head_dim": 64}


def lora_shapes(config_path: Path = CONFIG, r: int = 8) -> dict[str, tuple[int, int]]:
    """PEFT-style LoRA keys and shapes for q/k/v/o of every layer of a Llama config (SmolLM2's if absent)."""
    cfg = json.loads(config_path.read_text()) if config_path.exists() else SMOLLM2
    hidden = cfg["hidden_size"]
    head_dim = cfg.get("head_dim") or hidden // cfg["num_attention_heads"]
    q_out = cfg["num_attention_heads"] * head_dim
    kv_out = cfg["num_key_value_heads"] * head_dim
    dims = {"q_proj": (hidden, q_out), "k_proj": (hidden, kv_out), "v_proj": (hidden, kv_out),
            "o_proj": (q_out, hidden)}
    shapes: dict[str, tuple[int, int]] = {}
    for layer in range(cfg["num_hidden_layers"]):
        for proj, (d_in, d_out) in dims.items():
            prefix = f"base_model.model.model.layers.{layer}.self_attn.{proj}"
            shapes[f"{prefix}.lora_A.weight"] = (r, d_in)
            shapes[f"{prefix}.lora_B.weight"] = (d_out, r)
    return shapes


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def _max_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux


def measure(strategy_name: str, num_silos: int, shapes: dict[str, tuple[int, int]] | None = None,
            seed: int = 0) -> dict:
    """Run one round in this process; returns `{"strategy", "silos", "agg_s", "peak_mib", "params", "tensors"}`.

    `peak_mib` is only meaningful in a fresh process (see `measure_isolated`).
    """
    import torch

    from fedllm.federation.aggregation.strategies import make_strategy

    torch.set_num_threads(1)
    shapes = shapes or lora_shapes()
    gen = torch.Generator().manual_seed(seed)
    global_state = {k: torch.randn(*s, generator=gen) * 0.02 for k, s in shapes.items()}
    params = {"num_byzantine": 1} if "krum" in strategy_name else {}
    strategy = make_strategy(strategy_name, **params)
    # Warm the allocator and kernels with one throw-away round so the measured round starts from a steady RSS.
    warm = make_strategy("fedavg")
    acc = warm.start_round(0, global_state)
    acc.add("warm", {k: torch.zeros_like(v) for k, v in global_state.items()}, 1)
    warm.finish_round(0, global_state, acc, [])
    del acc
    base_rss = max(_rss_mib(), _max_rss_mib())
    agg_s = 0.0
    start = time.perf_counter()
    acc = strategy.start_round(1, global_state)
    agg_s += time.perf_counter() - start
    for i in range(num_silos):
        update = {k: torch.randn(*s, generator=gen) * 1e-3 for k, s in shapes.items()}
        start = time.perf_counter()
        acc.add(f"silo{i}", update, 100 + i)
        agg_s += time.perf_counter() - start
        del update
    start = time.perf_counter()
    new_state = strategy.finish_round(1, global_state, acc, [])
    agg_s += time.perf_counter() - start
    assert new_state is not None
    peak = max(_max_rss_mib(), _rss_mib()) - base_rss
    return {"strategy": strategy_name, "silos": num_silos, "agg_s": agg_s, "peak_mib": max(peak, 0.0),
            "params": sum(v.numel() for v in global_state.values()), "tensors": len(global_state)}


def measure_isolated(strategy_name: str, num_silos: int) -> dict:
    """`measure` in a fresh Python process (clean peak RSS); returns its dict."""
    out = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--one", strategy_name, str(num_silos)],
                         check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--silos", type=int, nargs="+", default=[2, 8, 32])
    from fedllm.federation.aggregation.strategies import STRATEGY_NAMES

    parser.add_argument("--strategies", nargs="+", default=list(STRATEGY_NAMES))
    parser.add_argument("--json", action="store_true", help="print one JSON object per point instead of a table")
    parser.add_argument("--one", nargs=2, metavar=("STRATEGY", "SILOS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(args.one[0], int(args.one[1]))))
        return
    shapes = lora_shapes()
    params = sum(a * b for a, b in shapes.values())
    print(f"LoRA r=8 q/k/v/o: {len(shapes)} tensors, {params:,} params, {params * 4 / 2**20:.2f} MiB fp32 per update "
          f"(shapes from {'config.json' if CONFIG.exists() else 'built-in SmolLM2 numbers'}); 1 torch thread")
    rows = []
    for name in args.strategies:
        for n in args.silos:
            row = measure_isolated(name, n)
            rows.append(row)
            if args.json:
                print(json.dumps(row), flush=True)
    if args.json:
        return
    print(f"{'strategy':<13} " + " ".join(f"{f'{n} silos: s':>12} {'MiB':>7}" for n in args.silos))
    for name in args.strategies:
        cells = [r for r in rows if r["strategy"] == name]
        print(f"{name:<13} " + " ".join(f"{r['agg_s']:>12.3f} {r['peak_mib']:>7.1f}" for r in cells))


if __name__ == "__main__":
    main()
