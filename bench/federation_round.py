"""One federation round, measured: bytes on the wire per silo vs the full model, and the non-training share of a
round's wall time; plus aggregation time / peak memory from bench/aggregation.py.

    .venv/bin/python bench/federation_round.py                       # everything, ~1 min
    .venv/bin/python bench/federation_round.py --skip-aggregation --train-s 5 --rounds 3
    .venv/bin/python bench/federation_round.py --silo-ranks --rounds 3   # time outside training: 1-rank vs 2-rank silo

Bytes: a real TRAIN (global adapter) and UPDATE (delta) message for SmolLM2-135M's LoRA r=8 on q/k/v/o
(240 tensors, 921,600 parameters) encoded by `fedllm.federation.wire` with each compression method, against the full
model's fp32 weights (134.5 M parameters x 4 bytes), i.e. what a round would cost if silos shipped whole models.
Downlink (TRAIN) is fp32 or bf16 (`fedllm.federation.wire.payload.downlink_method`); uplink uses the method named.

Non-training share: a real coordinator and 3 silos over CURVE on 127.0.0.1 run `--rounds` rounds of FedAvg on
SmolLM2-sized adapters; each silo's `fit` sleeps `--train-s` seconds (standing in for local training, which this
bench does not measure: see bench/train_throughput.py). Share = (round wall - longest silo training) / round wall:
encoding, transfer, validation, aggregation, atomic checkpoint and registry export.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench.aggregation import lora_shapes, measure_isolated  # noqa: E402

FULL_MODEL_PARAMS = 134_515_008  # SmolLM2-135M (tied embeddings), as loaded by transformers


def message_bytes(shapes: dict[str, tuple[int, int]], method: str) -> tuple[int, int]:
    """(TRAIN bytes, UPDATE bytes) of real encoded messages for adapters of `shapes`."""
    import torch

    from fedllm.federation.wire.payload import downlink_method, encode_payload
    from fedllm.federation.wire.protocol import MsgType, TrainTask, UpdateResult, make_header

    gen = torch.Generator().manual_seed(0)
    global_state = {k: torch.randn(*s, generator=gen) * 0.02 for k, s in shapes.items()}
    delta = {k: torch.randn(*s, generator=gen) * 1e-3 for k, s in shapes.items()}
    down = encode_payload(global_state, downlink_method(method))
    train = down.frames(make_header(MsgType.TRAIN, TrainTask(local_steps=50, encoding=down.meta, compression=method), round_id=1))
    up = encode_payload(delta, method, residual={})
    update = up.frames(make_header(MsgType.UPDATE, UpdateResult(num_examples=100, encoding=up.meta), round_id=1))
    return sum(map(len, train)), sum(map(len, update))


class SleepTrainer:
    """A SiloTrainer whose training is `train_s` seconds of sleep and a small random step."""

    lora_r = lora_alpha = None  # the global adapter's LoRA shape

    def __init__(self, train_s: float, seed: int) -> None:
        self.train_s, self.seed, self.state = train_s, seed, {}

    def get_state(self):
        return self.state

    def set_state(self, state):
        self.state = state

    def fit(self, steps, config):
        import torch

        time.sleep(self.train_s)
        gen = torch.Generator().manual_seed(self.seed)
        self.state = {k: v + 1e-3 * torch.randn(v.shape, generator=gen) for k, v in self.state.items()}
        return 100, {"train_loss": 1.0}

    def evaluate(self):
        return {}


async def round_overhead(shapes, rounds: int, train_s: float, compression: str) -> list[dict]:
    """Round records of a CURVE federation of 3 sleeping silos on SmolLM2-sized adapters."""
    import torch

    from fedllm.core.settings import load_settings
    from fedllm.federation.runtime.coordinator import Coordinator
    from fedllm.federation.wire.keys import enroll_silo, ensure_keypair
    from fedllm.federation.runtime.silo import SiloClient
    from fedllm.federation.aggregation.strategies import make_strategy
    from fedllm.testing.exporters import write_exporter

    home = Path(tempfile.mkdtemp(prefix="fed-bench-"))
    fed = {"port": 0, "status_port": 0, "rounds": rounds, "min_silos": 3, "compression": compression,
           "heartbeat_interval_s": 1.0, "silo_timeout_s": 30.0, "run_name": "bench"}
    cs = load_settings(overrides={"home": str(home / "c"), "federation": fed})
    ckey = ensure_keypair(cs.keys_dir, "coordinator")
    gen = torch.Generator().manual_seed(0)
    coord = Coordinator(cs, make_strategy("fedavg"), exporter=write_exporter,
                        initial_state={k: torch.randn(*s, generator=gen) * 0.02 for k, s in shapes.items()})
    address = await coord.start()
    silos = []
    for i in range(3):
        ss = load_settings(overrides={"home": str(home / f"s{i}"), "federation": {
            "coordinator": address, "coordinator_key": ckey.public, "silo_id": f"s{i}", "heartbeat_interval_s": 1.0}})
        enroll_silo(cs.keys_dir, f"s{i}", ensure_keypair(ss.keys_dir, "silo").public)
        silos.append(SiloClient(ss, SleepTrainer(train_s, i)))
    try:
        for s in silos:
            await s.start()
        await coord.wait_done(rounds * (train_s + 60))
    finally:
        for s in silos:
            await s.stop()
        await coord.stop()
    return coord.history


def silo_rank_overhead(rounds: int, steps: int) -> list[tuple[str, int, float, float]]:
    """Per round, a 1-rank silo's trainer vs a 2-rank one (`RankGroupTrainer`) on the embedded model, `steps` local
    steps each: (silo, round, fit wall s, engine training-loop s). Wall minus loop is the time outside training
    (model build, DeepSpeed init, the adapter's broadcast and return; round 1 of the 2-rank silo also starts its group).
    """
    from fedllm.core.sections.train import TrainSettings
    from bench.train_throughput import mixed_chat_records, resolve
    from fedllm.federation.runtime.rank_group import RankGroupTrainer
    from fedllm.federation.runtime.silo import EngineTrainer

    model_dir, records = resolve(None), mixed_chat_records(32)
    cfg = TrainSettings(batch_size=2, max_seq_len=256, warmup_steps=0, zero_stage=2)
    out = []
    for name, trainer in (("1 rank", EngineTrainer(cfg, model_dir, records)),
                          ("2 ranks", RankGroupTrainer(cfg.model_copy(update={"threads": 1}), model_dir, records, ranks=2))):
        try:
            for r in range(1, rounds + 1):
                t0 = time.perf_counter()
                _, metrics = trainer.fit(steps, {})
                out.append((name, r, time.perf_counter() - t0, float(metrics["elapsed_s"])))
        finally:
            if hasattr(trainer, "close"):
                trainer.close()
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--train-s", type=float, default=10.0, help="simulated local training per round (s)")
    p.add_argument("--skip-aggregation", action="store_true")
    p.add_argument("--silo-ranks", action="store_true", help="only: time outside training per round, 1-rank vs 2-rank silo")
    a = p.parse_args()
    if a.silo_ranks:
        print(f"{'silo':<9}{'round':>6}{'fit wall s':>12}{'training s':>12}{'outside s':>11}")
        for name, r, wall, loop in silo_rank_overhead(a.rounds, 2):
            print(f"{name:<9}{r:>6}{wall:>12.2f}{loop:>12.2f}{wall - loop:>11.2f}")
        return
    shapes = lora_shapes()
    params = sum(x * y for x, y in shapes.values())
    full = FULL_MODEL_PARAMS * 4
    print(f"adapter: {len(shapes)} tensors, {params:,} params; full model fp32: {full / 2**20:.1f} MiB")
    print(f"{'method':<7}{'TRAIN bytes':>14}{'UPDATE bytes':>14}{'round/silo':>14}{'vs full model':>15}")
    for method in ("fp32", "bf16", "int8", "topk"):
        down, up = message_bytes(shapes, method)
        print(f"{method:<7}{down:>14,}{up:>14,}{down + up:>14,}{(down + up) / (2 * full):>14.4%}")
    print("(vs full model = (TRAIN + UPDATE) / (2 x full fp32 model): the share of shipping the whole model both ways)")

    history = asyncio.run(round_overhead(shapes, a.rounds, a.train_s, "bf16"))
    print(f"\nround wall time, 3 CURVE silos, bf16, simulated training {a.train_s:.1f} s per silo:")
    print(f"{'round':<7}{'wall s':>9}{'train s':>9}{'other s':>9}{'non-training share':>20}{'bytes in':>12}{'bytes out':>12}")
    for r in history:
        other = r["duration_s"] - r["train_s_max"]
        print(f"{r['round']:<7}{r['duration_s']:>9.3f}{r['train_s_max']:>9.3f}{other:>9.3f}{r['non_training_share']:>20.2%}"
              f"{r['bytes_in']:>12,}{r['bytes_out']:>12,}")

    if not a.skip_aggregation:
        print("\naggregation (bench/aggregation.py, fresh process per point, 1 torch thread):")
        print(f"{'strategy':<10}{'silos':>6}{'agg s':>9}{'peak MiB':>10}")
        for name in ("fedavg", "median"):
            for n in (2, 8, 32):
                row = measure_isolated(name, n)
                print(f"{name:<10}{n:>6}{row['agg_s']:>9.3f}{row['peak_mib']:>10.1f}")


if __name__ == "__main__":
    main()
