"""The same federated LoRA job on the appliance's federation and on Flower, side by side: one table, one run.

    .venv/bin/python bench/federation_vs_flower.py                  # embedded SmolLM2-135M, 2 silos, 4 rounds x 8 steps
    .venv/bin/python bench/federation_vs_flower.py --tiny           # a tiny random Llama: a smoke run (~3 min)
    .venv/bin/python bench/federation_vs_flower.py --silos 3 --rounds 3 --local-steps 4 --json out.json
    .venv/bin/python bench/federation_vs_flower.py --systems ours,ours:fedavg:fresh,flower   # also ours with Flower's
                                                                       # per-round fresh optimizer
    .venv/bin/python bench/federation_vs_flower.py --seeds 0,1,2        # the whole job per seed, then the means

The job: the bundled data of `fedllm.federation.demo.data` (`--set`; the first `--silos` organisations), the same base model,
the same LoRA initialisation (`train.initial_adapter_state` at the run's seed; r/alpha/targets from the train settings), the
same rounds, local steps, batch, learning rate (constant: no warmup, no decay), gradient clipping and sequence
length, no packing, plain example-weighted FedAvg of the LoRA factors.

- Ours: the product's own commands as a silo operator runs them, each a separate process: `appliance federation
  init`, `silo keygen`, `federation enroll`, `coordinator start --strategy fedavg` and `silo join` (CURVE on), with
  `federation.lr_schedule: constant`, the product's default update compression (`--compression`, bf16) and its default
  `federation.local_optimizer: keep` (each silo carries its AdamW moments from round to round; `ours:fedavg:fresh`
  starts a fresh AdamW every round, as Flower's ClientApp does).
- Flower (`flwr==1.42.0`, built once into `.cache/venvs/flower`, never a dependency of the appliance): its deployment
  runtime on loopback: `flower-superlink --insecure`, one `flower-supernode --insecure` per silo (its data path in
  `--node-config`), and `flwr run bench/flower_app` (a ServerApp with Flower's own `FedAvg`, a ClientApp that trains
  the same peft LoRA with plain torch: see bench/flower_app/fedllm_lora/).

Both run on `testbed.Bed` on loopback (no namespaces, zero delay): every silo reaches its server through a TCP relay
of its own that counts the bytes each way. Every silo process (our `silo join`, Flower's SuperNode and the ClientApp
processes it starts) is pinned to its own share of the cores (`fedllm.core.cores.divide_cores`), with torch and
OpenMP threads sized to it; the coordinator, SuperLink and ServerApp are not pinned.

Measured, per system:
- wall s: from starting the first server process to the final global adapter on disk (process start-ups, model loads,
  every round).
- round s: mean wall time of a round at the server (sending the global adapter .. aggregate done).
- other s/round: mean of (round s - the longest silo's training loop) per round: everything that is not optimizer
  steps (ours: model build and DeepSpeed init per round, transfer, checks, aggregation, checkpoint; Flower: a fresh
  ClientApp process per silo per round that imports torch and loads the model, SuperNode polling, transfer).
- TCP B/round: bytes both ways through the silos' relays over the whole run, divided by the rounds (everything the
  protocols send: messages, heartbeats, polling, Flower's app bundle).
- msg B/round: the messages' own size: ours the round records' bytes_in + bytes_out (the ZeroMQ frames: header and
  safetensors payload); Flower the protobuf size of each Message's RecordDict as its Fleet API carries it (measured
  in the ServerApp with `recorddict_to_proto(...).ByteSize()`).
- the final global adapter's held-out loss on every silo's eval set, both evaluated here by `train.evaluate_adapters`.

Progress goes to stderr, the table to stdout; `--json PATH` also writes every number and round record.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from fedllm.core.cores import CoreShare, divide_cores  # noqa: E402
from fedllm.testbed import Bed, LinkSpec  # noqa: E402

FLOWER_REQUIREMENTS = ("flwr==1.42.0", "torch==2.13.0", "transformers==5.19.0", "peft==0.21.2", "safetensors")
FLOWER_APP = REPO / "bench" / "flower_app"
SERVER = "server"


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


@dataclass
class Job:
    """What both systems run."""

    model_dir: Path
    cfg: Any  # TrainSettings
    paths: dict[str, dict[str, Path]]  # org -> {"train", "eval"}
    rounds: int
    local_steps: int
    shares: list[CoreShare]
    init_adapter: Path  # the round-0 global adapter (safetensors)

    @property
    def orgs(self) -> list[str]:
        return list(self.paths)


def prepare(args: argparse.Namespace, work: Path, seed: int = 0) -> Job:
    """Data, model, train settings (at `seed`: LoRA init and batch order) and the shared LoRA initialisation."""
    from fedllm import train
    from safetensors.torch import save_file

    from fedllm.core.settings import load_settings
    from bench.federated_learning import model_folder
    from fedllm.federation.demo import demo, data as demo_data

    cfg = demo.demo_train_settings(load_settings(overrides={"home": str(work / "appliance")}))
    cfg = cfg.model_copy(update={"packing": False, "lr_scheduler": "constant", "seed": seed, **({"lr": args.lr} if args.lr else {})})
    paths = demo_data.write(work / "data", dataset=args.set)
    if not 2 <= args.silos <= len(paths):
        raise SystemExit(f"--silos must be 2..{len(paths)} for set {args.set}")
    paths = dict(list(paths.items())[: args.silos])
    model_dir = model_folder(args, work)
    init = work / "init_adapter.safetensors"
    save_file(train.initial_adapter_state(cfg, model_dir), str(init))
    return Job(model_dir, cfg, paths, args.rounds, args.local_steps, divide_cores(args.silos), init)


def make_bed(job: Job, work: Path) -> Bed:
    """A loopback bed: the server's region and one per silo, so each silo's traffic crosses a counting relay."""
    return Bed({SERVER: LinkSpec(0), **{f"r-{i}": LinkSpec(0) for i in range(len(job.orgs))}}, work, use_netns=False)


def relay_bytes(bed: Bed) -> int:
    return sum(s["up"] + s["down"] for s in bed.stats())


# ------------------------------------------------------------------------------------------------------------ ours
def run_ours(job: Job, work: Path, compression: str, timeout_s: float, strategy: str = "fedavg",
             local_optimizer: str = "keep") -> dict[str, Any]:
    """Our coordinator and silos as separate CLI processes (CURVE on), through `fedllm.testbed.federation.GeoFederation`."""
    from fedllm.federation.runtime.checkpoint import load_latest
    from fedllm.testbed.federation import GeoFederation

    c = job.cfg
    env = {"APPLIANCE_TRAIN__MAX_SEQ_LEN": str(c.max_seq_len), "APPLIANCE_TRAIN__BATCH_SIZE": str(c.batch_size),
           "APPLIANCE_TRAIN__GRAD_ACCUM": "1", "APPLIANCE_TRAIN__LR": str(c.lr), "APPLIANCE_TRAIN__WARMUP_STEPS": "0",
           "APPLIANCE_TRAIN__LORA_DROPOUT": "0", "APPLIANCE_TRAIN__LORA_R": str(c.lora_r),
           "APPLIANCE_TRAIN__LORA_ALPHA": str(c.lora_alpha), "APPLIANCE_TRAIN__ZERO_STAGE": str(c.zero_stage),
           "APPLIANCE_TRAIN__PACKING": "false", "APPLIANCE_TRAIN__MAX_GRAD_NORM": str(c.max_grad_norm),
           "APPLIANCE_TRAIN__WEIGHT_DECAY": str(c.weight_decay), "APPLIANCE_TRAIN__SEED": str(c.seed),
           "APPLIANCE_TRAIN__CHECKPOINT_EVERY_STEPS": "100000", "APPLIANCE_FEDERATION__LR_SCHEDULE": "constant",
           "APPLIANCE_FEDERATION__HEARTBEAT_INTERVAL_S": "2", "APPLIANCE_FEDERATION__SILO_TIMEOUT_S": "120",
           "APPLIANCE_FEDERATION__LOCAL_OPTIMIZER": local_optimizer}
    with make_bed(job, work / "bed") as bed:
        fed = GeoFederation(bed, SERVER, work, job.model_dir, env=env)
        fed.init()
        for i, org in enumerate(job.orgs):
            fed.enroll(org, f"r-{i}")
        t0 = time.time()
        fed.start_coordinator("--rounds", str(job.rounds), "--min-silos", str(len(job.orgs)), "--local-steps",
                              str(job.local_steps), "--strategy", strategy, "--round-deadline", str(timeout_s),
                              "--compression", compression)
        for org in job.orgs:  # GeoFederation pins each silo to its share of the cores (divide_cores over the silos)
            fed.start_silo(org, job.paths[org]["train"])
        fed.wait_round(job.rounds, timeout_s=timeout_s)
        records = [r for r in fed.rounds() if "participants" in r]
        tcp = relay_bytes(bed)
    failed = [r for r in records if r.get("failed")]
    if failed or len(records) != job.rounds:
        raise RuntimeError(f"our federation did not complete {job.rounds} rounds cleanly: {failed or records}")
    ckpt = load_latest(work / "coordinator" / "federation" / fed.run_name)
    rounds = [{"round": r["round"], "duration_s": r["duration_s"], "bytes": r["bytes_in"] + r["bytes_out"],
               "train_loop_s": max(m["elapsed_s"] for m in r["per_silo"].values())} for r in records]
    return {"system": f"ours ({strategy}, {compression}, {local_optimizer} opt)", "wall_s": records[-1]["time"] - t0, "rounds": rounds,
            "tcp_bytes": tcp, "state": ckpt.global_state, "raw": records}


# ---------------------------------------------------------------------------------------------------------- flower
def flower_venv() -> Path:
    from fedllm.testing.tool_venvs import build_tool_venv

    log("Flower virtualenv: .cache/venvs/flower (built on first use, several minutes)")
    return build_tool_venv("flower", *FLOWER_REQUIREMENTS)


def run_flower(job: Job, work: Path, venv: Path, timeout_s: float) -> dict[str, Any]:
    """SuperLink + one SuperNode per silo (each pinned to its share) + `flwr run` of bench/flower_app."""
    flwr_home = work / "flwr-home"
    out_dir = work / "out"
    flwr_home.mkdir(parents=True)
    env = {"PATH": f"{venv / 'bin'}:{os.environ.get('PATH', '')}", "FLWR_HOME": str(flwr_home), "PYTHONPATH": "",
           "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    bin_ = venv / "bin"
    c = job.cfg
    run_config = {"num-server-rounds": job.rounds, "local-steps": job.local_steps, "min-nodes": len(job.orgs),
                  "lr": float(c.lr), "weight-decay": float(c.weight_decay), "max-grad-norm": float(c.max_grad_norm),
                  "batch-size": c.batch_size, "max-seq-len": c.max_seq_len, "seed": c.seed, "lora-r": c.lora_r,
                  "lora-alpha": c.lora_alpha, "target-modules": ",".join(target_modules(job)),
                  "model-dir": str(job.model_dir), "init-adapter": str(job.init_adapter), "out-dir": str(out_dir)}
    with make_bed(job, work / "bed") as bed:
        port = bed.free_port(SERVER)
        (flwr_home / "config.toml").write_text(
            f'[superlink]\ndefault = "bench"\n\n[superlink.bench]\naddress = "127.0.0.1:{port}"\ninsecure = true\n')
        t0 = time.time()
        bed.spawn(SERVER, "superlink", [str(bin_ / "flower-superlink"), "--insecure", "--host", "127.0.0.1", "--port",
                                        str(port), "--disable-runtime-dependency-installation"], env=env)
        wait_port(bed, "superlink", port, timeout_s=120)
        for i, (org, share) in enumerate(zip(job.orgs, job.shares)):
            host, lport = bed.link(f"r-{i}", SERVER, port)
            node_config = f'data-path="{job.paths[org]["train"]}" partition-id={i}'
            bed.spawn(f"r-{i}", f"supernode-{org}", share.argv([
                str(bin_ / "flower-supernode"), "--insecure", "--superlink", f"{host}:{lport}",
                "--port", str(bed.free_port(f"r-{i}")), "--node-config", node_config]), env={**env, **share.env()})
        config_arg = " ".join(f"{k}={json.dumps(v)}" for k, v in run_config.items())
        bed.spawn(SERVER, "flwr-run", [str(bin_ / "flwr"), "run", str(FLOWER_APP), "bench", "--run-config", config_arg,
                                       "--stream"], env=env, cwd=work)
        done = out_dir / "done.json"
        deadline = time.monotonic() + timeout_s
        while not done.exists():
            crashed = [n for n, p in bed.processes.items() if p.poll() is not None and n != "flwr-run"]
            if crashed or time.monotonic() > deadline:
                tails = "\n".join(f"--- {n}\n{bed.log(n)[-3000:]}" for n in bed.processes)
                raise RuntimeError(f"Flower run {'failed: ' + str(crashed) if crashed else 'timed out'}\n{tails}")
            time.sleep(0.5)
        wall = json.loads(done.read_text())["time"] - t0
        tcp = relay_bytes(bed)
    from safetensors.torch import load_file

    records = [json.loads(line) for line in (out_dir / "rounds.jsonl").read_text().splitlines() if line.strip()]
    bad = [r for r in records if r["errors"] or r["participants"] != len(job.orgs)]
    if bad or len(records) != job.rounds:
        raise RuntimeError(f"Flower did not complete {job.rounds} rounds with every silo: {bad or records}")
    threads = sorted(int(m["threads"]) for r in records for m in r["silos"].values())
    if set(threads) != {s.threads for s in job.shares}:  # the ClientApp processes inherit their SuperNode's share
        raise RuntimeError(f"Flower's ClientApps ran {threads} torch threads; their shares have {[s.threads for s in job.shares]}")
    rounds = [{"round": r["round"], "duration_s": r["duration_s"], "bytes": r["bytes_in"] + r["bytes_out"],
               "train_loop_s": max(m["train-loop-s"] for m in r["silos"].values())} for r in records]
    return {"system": "Flower 1.42 (FedAvg)", "wall_s": wall, "rounds": rounds, "tcp_bytes": tcp,
            "state": load_file(str(out_dir / "global.safetensors")), "raw": records}


def target_modules(job: Job) -> list[str]:
    """The LoRA targets the appliance resolves for this model (so Flower adapts the same layers)."""
    from fedllm.train import lora

    return list(lora.count_parameters(job.cfg, job.model_dir).target_modules)


def wait_port(bed: Bed, name: str, port: int, timeout_s: float) -> None:
    import socket

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if bed.processes[name].poll() is not None:
            raise RuntimeError(f"{name} exited: {bed.log(name)[-3000:]}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.3)
    raise TimeoutError(f"{name} did not listen on {port} within {timeout_s:.0f} s: {bed.log(name)[-3000:]}")


# ----------------------------------------------------------------------------------------------------------- table
def summary(result: dict[str, Any], rounds: int) -> dict[str, float]:
    rs = result["rounds"]
    return {"wall_s": result["wall_s"], "round_s": sum(r["duration_s"] for r in rs) / len(rs),
            "train_s": sum(r["train_loop_s"] for r in rs) / len(rs),
            "other_s": sum(r["duration_s"] - r["train_loop_s"] for r in rs) / len(rs),
            "tcp_per_round": result["tcp_bytes"] / rounds, "msg_per_round": sum(r["bytes"] for r in rs) / len(rs)}


def table(results: list[dict[str, Any]], losses: dict[str, dict[str, float]], job: Job) -> str:
    orgs = job.orgs
    head = (f"{'system':<30}{'wall s':>8}{'round s':>9}{'train s':>9}{'other s':>9}{'TCP B/round':>14}{'msg B/round':>14}"
            + "".join(f"{'loss:' + o[:9]:>16}" for o in orgs) + f"{'mean':>8}")
    out = [head, "-" * len(head)]
    base = [losses["base"][o] for o in orgs]
    out.append(f"{'base model':<30}{'':>8}{'':>9}{'':>9}{'':>9}{'':>14}{'':>14}" + "".join(f"{v:>16.4f}" for v in base)
               + f"{sum(base) / len(base):>8.4f}")
    for r in results:
        s = summary(r, job.rounds)
        vals = [losses[r["system"]][o] for o in orgs]
        out.append(f"{r['system']:<30}{s['wall_s']:>8.1f}{s['round_s']:>9.1f}{s['train_s']:>9.1f}{s['other_s']:>9.1f}"
                   f"{s['tcp_per_round']:>14,.0f}{s['msg_per_round']:>14,.0f}" + "".join(f"{v:>16.4f}" for v in vals)
                   + f"{sum(vals) / len(vals):>8.4f}")
    c = job.cfg
    shares = ", ".join(f"{o}: cores {','.join(map(str, s.cores))}" for o, s in zip(orgs, job.shares))
    out += [f"({len(orgs)} silos, {job.rounds} rounds x {job.local_steps} local steps, batch {c.batch_size}, lr {c.lr:g} "
            f"constant, LoRA r={c.lora_r} alpha={c.lora_alpha}, max_seq_len {c.max_seq_len}, no packing; {shares})",
            "round s / train s / other s: means per round (train = the longest silo's optimizer loop); "
            "loss: held-out loss of the final global adapter"]
    return "\n".join(out) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="a tiny random Llama instead of the embedded model (smoke run)")
    p.add_argument("--set", default="hospitals", help="bundled data set (fedllm.federation.demo.data.DATASETS)")
    p.add_argument("--silos", type=int, default=2)
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--local-steps", type=int, default=8)
    p.add_argument("--lr", type=float, default=None, help="silo learning rate (default: the demo's)")
    p.add_argument("--compression", default="bf16", help="our update compression (the product's default: bf16)")
    p.add_argument("--systems", default="ours,flower",
                   help="which to run, in order: ours (FedAvg, the product's defaults), ours:STRATEGY[:LOCAL_OPTIMIZER] "
                        "(e.g. ours:ffa, ours:fedavg:fresh), flower")
    p.add_argument("--seeds", default="0", help="comma-separated seeds (LoRA init and batch order); the job runs once "
                                                "per seed, then a table of the means")
    p.add_argument("--timeout-s", type=float, default=3600)
    p.add_argument("--home", default="", help="working folder (default: a temp folder)")
    p.add_argument("--json", default="", help="also write every number here (after each seed)")
    args = p.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # unwind: the beds stop every process they started
    work = Path(args.home or tempfile.mkdtemp(prefix="fed-vs-flower-"))
    t0 = time.monotonic()
    systems = args.systems.split(",")
    venv = flower_venv() if "flower" in systems else None
    runs: list[dict[str, Any]] = []
    for seed in (int(v) for v in args.seeds.split(",")):
        job = prepare(args, work / f"seed-{seed}", seed)
        log(f"seed {seed}: work {work}; model {job.model_dir}; silos {job.orgs}; cores {[s.cores for s in job.shares]}")
        results = [run_system(system, job, work / f"seed-{seed}", args, venv) for system in systems]
        from fedllm.federation.demo import demo

        losses = demo.evaluate_all(job.cfg, job.model_dir, {"base": None, **{r["system"]: r["state"] for r in results}}, job.paths)
        print(f"seed {seed}\n" + table(results, losses, job), flush=True)
        runs.append({"seed": seed, "losses": losses,
                     "systems": [{k: v for k, v in r.items() if k != "state"} | {"summary": summary(r, job.rounds)} for r in results]})
        if args.json:
            Path(args.json).write_text(json.dumps({"command": " ".join(map(shlex.quote, sys.argv)), "runs": runs},
                                                  indent=1, default=str))
    if len(runs) > 1:
        print(mean_table(runs, job.orgs), flush=True)
    log(f"done in {time.monotonic() - t0:.0f} s")


def run_system(system: str, job: Job, work: Path, args: argparse.Namespace, venv: Path | None) -> dict[str, Any]:
    log(f"{system}: running")
    name, _, rest = system.partition(":")
    if name == "ours":
        strategy, _, local_optimizer = rest.partition(":")
        result = run_ours(job, work / system.replace(":", "-"), args.compression, args.timeout_s, strategy or "fedavg",
                          local_optimizer or "keep")
    elif system == "flower":
        result = run_flower(job, work / "flower", venv, args.timeout_s)
    else:
        raise SystemExit(f"unknown system {system!r}; use ours, ours:STRATEGY[:LOCAL_OPTIMIZER], flower")
    log(f"{system}: " + ", ".join(f"{k} {v:,.1f}" for k, v in summary(result, job.rounds).items()))
    return result


def mean_table(runs: list[dict[str, Any]], orgs: list[str]) -> str:
    """Per system, over the seeds: mean wall s, other s/round and held-out loss per silo (and the spread of the mean)."""
    head = f"{'mean over seeds ' + ','.join(str(r['seed']) for r in runs):<40}{'wall s':>8}{'other s':>9}" + "".join(
        f"{'loss:' + o[:9]:>16}" for o in orgs) + f"{'mean':>8}{'min..max of mean':>20}"
    out = [head, "-" * len(head)]
    for i, first in enumerate(runs[0]["systems"]):
        name = first["system"]
        per = [r["systems"][i] for r in runs]
        losses = [[r["losses"][name][o] for o in orgs] for r in runs]
        means = [sum(v) / len(v) for v in losses]
        cols = [sum(v[j] for v in losses) / len(losses) for j in range(len(orgs))]
        out.append(f"{name:<40}{sum(p['summary']['wall_s'] for p in per) / len(per):>8.1f}"
                   f"{sum(p['summary']['other_s'] for p in per) / len(per):>9.1f}" + "".join(f"{v:>16.4f}" for v in cols)
                   + f"{sum(means) / len(means):>8.4f}{f'{min(means):.4f}..{max(means):.4f}':>20}")
    return "\n".join(out) + "\n"

if __name__ == "__main__":
    main()
