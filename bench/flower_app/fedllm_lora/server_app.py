"""The ServerApp: Flower's own FedAvg (weighted by examples) over the LoRA adapter, timed and measured per round.

Per round it records the wall time from sending TRAIN to the aggregate, each silo's training-loop time and the
protobuf size of every message's content (what the Fleet API carries), into OUT_DIR/rounds.jsonl, and it writes the
final global adapter to OUT_DIR/global.safetensors.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from flwr.app import ArrayRecord, ConfigRecord, Context
from flwr.common.serde import recorddict_to_proto
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg
from safetensors.torch import load_file, save_file

app = ServerApp()


def content_bytes(msg) -> int:
    return recorddict_to_proto(msg.content).ByteSize()


class MeasuredFedAvg(FedAvg):
    """FedAvg unchanged, plus a record per round (wall time, silos' training time, message bytes)."""

    def __init__(self, log_path: Path, **kwargs) -> None:
        super().__init__(**kwargs)
        self.log_path = log_path
        self.started, self.down = 0.0, 0

    def configure_train(self, server_round, arrays, config, grid):
        self.started = time.time()
        messages = list(super().configure_train(server_round, arrays, config, grid))
        self.down = sum(content_bytes(m) for m in messages)
        return messages

    def aggregate_train(self, server_round, replies):
        replies = list(replies)
        out = super().aggregate_train(server_round, replies)
        ok = [m for m in replies if not m.has_error()]
        record = {"round": server_round, "start": self.started, "end": time.time(), "participants": len(ok),
                  "errors": [m.error.reason for m in replies if m.has_error()],
                  "bytes_out": self.down, "bytes_in": sum(content_bytes(m) for m in ok),
                  "silos": {str(m.metadata.src_node_id): dict(m.content["metrics"]) for m in ok}}
        record["duration_s"] = record["end"] - record["start"]
        with open(self.log_path, "a") as f:
            f.write(json.dumps(record) + "\n")
        return out


@app.main()
def main(grid: Grid, context: Context) -> None:
    cfg = context.run_config
    out_dir = Path(str(cfg["out-dir"]))
    out_dir.mkdir(parents=True, exist_ok=True)
    n = int(cfg["min-nodes"])
    strategy = MeasuredFedAvg(out_dir / "rounds.jsonl", fraction_train=1.0, fraction_evaluate=0.0, min_train_nodes=n,
                              min_available_nodes=n)
    initial = ArrayRecord(load_file(str(cfg["init-adapter"])))
    result = strategy.start(grid=grid, initial_arrays=initial, num_rounds=int(cfg["num-server-rounds"]),
                            train_config=ConfigRecord({}))
    save_file(result.arrays.to_torch_state_dict(), str(out_dir / "global.safetensors"))
    (out_dir / "done.json").write_text(json.dumps({"time": time.time()}))
