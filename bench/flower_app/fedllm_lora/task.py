"""The model, the data and the local training loop of the ClientApp (plain torch + transformers + peft).

Training matches the appliance's engine for the bench: the chat template renders each conversation, the loss is on
the answer tokens only, rows are not packed (padded per batch), AdamW at a constant rate with gradient clipping.
"""

from __future__ import annotations

import json
import os
import random
import time
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
from transformers import AutoModelForCausalLM, AutoTokenizer

IGNORE_INDEX = -100


def size_threads() -> int:
    """One torch thread per core this process may use (the SuperNode is pinned to its share of the machine)."""
    n = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    torch.set_num_threads(n)
    return n


def load_model(model_dir: str, cfg: dict):
    """The base model with a LoRA adapter (weights are set from the server's message before training)."""
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    lora = LoraConfig(r=int(cfg["lora-r"]), lora_alpha=int(cfg["lora-alpha"]), lora_dropout=0.0,
                      target_modules=str(cfg["target-modules"]).split(","), task_type="CAUSAL_LM")
    return get_peft_model(base, lora)


def tokenize(tokenizer, path: str, max_seq_len: int) -> list[tuple[list[int], list[int]]]:
    """(input_ids, labels) per chat row of a JSONL file; labels only on the assistant's answer."""
    rows = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        messages = json.loads(line)["messages"]
        prompt = tokenizer.apply_chat_template(messages[:-1], tokenize=False, add_generation_prompt=True)
        full = tokenizer.apply_chat_template(messages, tokenize=False)
        prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        ids = tokenizer(full, add_special_tokens=False)["input_ids"][:max_seq_len]
        labels = [IGNORE_INDEX] * min(len(prompt_ids), len(ids)) + ids[len(prompt_ids):]
        rows.append((ids, labels))
    return rows


def collate(batch, pad_id: int) -> dict[str, torch.Tensor]:
    width = max(len(ids) for ids, _ in batch)
    out = {"input_ids": torch.full((len(batch), width), pad_id), "labels": torch.full((len(batch), width), IGNORE_INDEX),
           "attention_mask": torch.zeros((len(batch), width), dtype=torch.long)}
    for i, (ids, labels) in enumerate(batch):
        out["input_ids"][i, :len(ids)] = torch.tensor(ids)
        out["labels"][i, :len(labels)] = torch.tensor(labels)
        out["attention_mask"][i, :len(ids)] = 1
    return out


def train(model, tokenizer, rows, cfg: dict, seed: int, batches=None) -> dict[str, float]:
    """`local-steps` AdamW steps on shuffled batches; returns the mean loss and the loop's wall time.

    `batches`: the row indices of each step instead (a test feeds the engine's batches to compare the two loops).
    """
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=float(cfg["lr"]), weight_decay=float(cfg["weight-decay"]))
    batches = list(batches) if batches is not None else shuffled_batches(len(rows), int(cfg["batch-size"]),
                                                                         int(cfg["local-steps"]), seed)
    model.train()
    losses, t0 = [], time.perf_counter()
    for indices in batches:
        batch = collate([rows[i] for i in indices], tokenizer.pad_token_id)
        loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, float(cfg["max-grad-norm"]))
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss))
    return {"train-loss": sum(losses) / len(losses), "train-loop-s": time.perf_counter() - t0}


def shuffled_batches(num_rows: int, batch_size: int, steps: int, seed: int) -> list[list[int]]:
    """`steps` batches of row indices from shuffled epochs (what a DataLoader with shuffle=True gives)."""
    rng, order, out = random.Random(seed), [], []
    for _ in range(steps):
        if len(order) < batch_size:  # a fresh shuffled epoch
            order = list(range(num_rows))
            rng.shuffle(order)
        out.append([order.pop() for _ in range(batch_size)])
    return out


def get_state(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().float().contiguous() for k, v in get_peft_model_state_dict(model).items()}


def set_state(model, state: dict[str, torch.Tensor]) -> None:
    result = set_peft_model_state_dict(model, state)
    if getattr(result, "unexpected_keys", None):
        raise ValueError(f"adapter keys the model does not have: {result.unexpected_keys[:3]}")


def load_tokenizer(model_dir: str):
    tok = AutoTokenizer.from_pretrained(model_dir)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok
