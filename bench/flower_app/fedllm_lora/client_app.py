"""The ClientApp: one silo's local LoRA training per round, on the data its SuperNode was started with."""

from __future__ import annotations

import time

from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedllm_lora import task

app = ClientApp()


@app.train()
def train(msg: Message, context: Context) -> Message:
    started = time.perf_counter()
    cfg = context.run_config
    threads = task.size_threads()
    tokenizer = task.load_tokenizer(str(cfg["model-dir"]))
    model = task.load_model(str(cfg["model-dir"]), cfg)
    task.set_state(model, msg.content["arrays"].to_torch_state_dict())
    rows = task.tokenize(tokenizer, str(context.node_config["data-path"]), int(cfg["max-seq-len"]))
    server_round = int(msg.content["config"]["server-round"])
    seed = int(cfg["seed"]) * 1_000_003 + server_round * 1009 + int(context.node_config["partition-id"])
    metrics = task.train(model, tokenizer, rows, cfg, seed)
    metrics["num-examples"] = len(rows)
    metrics["threads"] = threads
    metrics["fit-s"] = time.perf_counter() - started  # the whole call: model load, tokenization, training
    reply = RecordDict({"arrays": ArrayRecord(task.get_state(model)), "metrics": MetricRecord(metrics)})
    return Message(content=reply, reply_to=msg)
