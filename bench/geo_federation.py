"""Federation rounds across the WAN test bed: a round's wall time by update compression on 10 Mbit/s links, and the
share of the round that is not local training.

    .venv/bin/python bench/geo_federation.py                 # ~4 min; root for namespaces, else loopback links
    .venv/bin/python bench/geo_federation.py --methods bf16,topk --rounds 3

The bed (testbed.Bed): the coordinator in `hq` (CURVE on); two silos behind 10 Mbit/s links, 50 and 150 ms one way,
each brought in as the README says (`appliance silo keygen`, `federation enroll`, `silo join`). The model is a small
random Llama (4 layers, hidden 576, SmolLM2's tokenizer) with LoRA r=64 on q/k/v/o: 917,504 adapter parameters, the
size of SmolLM2-135M's r=8 adapter (921,600), so each message weighs what it would on the real model (3.7 MB in fp32)
while a local step takes well under a second. Each method gets a fresh coordinator and runs `--rounds` rounds; the
table shows the last round (the first one pays the silos' start-up). Non-training share = (round wall - longest
silo's local training) / round wall: download, upload, checks, aggregation and checkpoint. `down s` / `up s`: the
slowest silo's download and upload of that round (the round record's per-silo timings).
"""

from __future__ import annotations

import argparse
import signal
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from fedllm.federation.demo import data as demo_data  # noqa: E402
from fedllm.testbed import Bed, LinkSpec  # noqa: E402
from fedllm.testbed.federation import GeoFederation  # noqa: E402
from fedllm.testing.factories import TEST_CACHE, make_tiny_llama  # noqa: E402

METHODS = ("fp32", "bf16", "int8", "topk")
REGIONS = {"hq": LinkSpec(0), "a": LinkSpec.parse("50ms/10mbit"), "c": LinkSpec.parse("150ms/10mbit")}
SILOS = {"northbridge": "a", "redwood": "c"}
TRAIN_ENV = {"APPLIANCE_TRAIN__MAX_SEQ_LEN": "128", "APPLIANCE_TRAIN__BATCH_SIZE": "1", "APPLIANCE_TRAIN__WARMUP_STEPS": "0",
             "APPLIANCE_TRAIN__ZERO_STAGE": "0", "APPLIANCE_TRAIN__LORA_R": "64", "APPLIANCE_TRAIN__LORA_ALPHA": "128",
             "APPLIANCE_FEDERATION__HEARTBEAT_INTERVAL_S": "2", "APPLIANCE_FEDERATION__SILO_TIMEOUT_S": "30"}


def run_method(bed: Bed, work: Path, model_dir: Path, data: dict, method: str, rounds: int) -> dict:
    """One federation of `rounds` rounds with `--compression method`; returns its last round record."""
    fed = GeoFederation(bed, "hq", work / method, model_dir, env=TRAIN_ENV)
    fed.init()
    for name, region in SILOS.items():
        fed.enroll(name, region)
    fed.start_coordinator("--rounds", str(rounds), "--min-silos", str(len(SILOS)), "--round-deadline", "600",
                          "--local-steps", "1", "--compression", method)
    for name in SILOS:
        fed.start_silo(name, data[name]["train"])
    try:
        record = fed.wait_round(rounds, timeout_s=900)
    finally:
        for name in [n for n in bed.processes]:
            bed.stop_process(name)
    print(f"  {method}: {record['duration_s']:.1f} s, {record['bytes_in'] / len(SILOS):,.0f} B up per silo", file=sys.stderr, flush=True)
    return record


def _slowest(record: dict, key: str) -> float:
    """The round's slowest silo's `key` of its timings (download_s, upload_s); NaN when none was measured."""
    values = [t[key] for t in (record.get("timings") or {}).values() if isinstance(t.get(key), (int, float))]
    return max(values) if values else float("nan")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--rounds", type=int, default=2)
    args = p.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # SIGTERM unwinds too: the bed's namespaces are removed
    with tempfile.TemporaryDirectory(prefix="geo-fed-") as tmp:
        work = Path(tmp)
        model_dir = make_tiny_llama(work / "model", TEST_CACHE / "test-home" / "models" / "smollm2-135m-instruct",
                                    layers=4, hidden=576)
        data = demo_data.write(work / "data")
        with Bed(REGIONS, work / "bed") as bed:
            mode = "network namespaces" if bed.use_netns else f"loopback links ({bed.netns_skip_reason})"
            records = {m: run_method(bed, work, model_dir, data, m, args.rounds) for m in args.methods.split(",")}
    print(f"bed: {mode}; coordinator in hq (CURVE); silos behind 10 Mbit/s links, 50 and 150 ms one way; "
          f"adapter 917,504 params; round {args.rounds} of {args.rounds}")
    print(f"{'method':<7}{'round s':>9}{'train s':>9}{'other s':>9}{'non-training':>14}{'up B/silo':>12}{'down B/silo':>13}"
          f"{'down s':>8}{'up s':>8}{'vs fp32':>9}")
    base = records.get("fp32")
    for method, r in records.items():
        other = r["duration_s"] - r["train_s_max"]
        ratio = f"{r['duration_s'] / base['duration_s']:.2f}x" if base else "-"
        print(f"{method:<7}{r['duration_s']:>9.2f}{r['train_s_max']:>9.2f}{other:>9.2f}{r['non_training_share']:>14.1%}"
              f"{r['bytes_in'] / len(SILOS):>12,.0f}{r['bytes_out'] / len(SILOS):>13,.0f}"
              f"{_slowest(r, 'download_s'):>8.2f}{_slowest(r, 'upload_s'):>8.2f}{ratio:>9}")


if __name__ == "__main__":
    main()
