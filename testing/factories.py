"""Factories shared by the tests and the benches: settings in a temp home, free ports, polling until a condition
holds, a tiny random Llama model."""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Any

from fedllm.testing.waiting import wait_until, wait_until_async  # noqa: F401 (the tests import them from here too)

REPO = Path(__file__).resolve().parents[1]
TEST_CACHE = REPO / ".cache"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_settings(home: Path, **overrides: Any):
    """ApplianceSettings rooted at `home`, with `overrides` as nested dicts (highest priority)."""
    from fedllm.core.settings import load_settings

    return load_settings(overrides={"home": str(home), **overrides})


def make_tiny_llama(out_dir: Path, tokenizer_dir: Path, *, seed: int = 0, layers: int = 2, hidden: int = 128) -> Path:
    """Save a randomly initialised Llama (2 layers, hidden 128, head_dim 64) with the tokenizer of `tokenizer_dir`.

    Same architecture as SmolLM2, so LoRA targets, chat templates and vLLM loading all behave as on the real model,
    but training a step takes milliseconds.
    """
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=hidden // 64,
        num_key_value_heads=1,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def write_format(path: Path, rows: list[dict[str, Any]]) -> Path:
    """Write rows as the file (or folder) kind that `path`'s suffix names, with pandas / datasets."""
    import json

    import datasets
    import pandas as pd

    if path.suffix == ".csv":
        pd.DataFrame(rows).to_csv(path, index=False)
    elif path.suffix == ".parquet":
        pd.DataFrame(rows).to_parquet(path)
    elif path.suffix == ".json":
        path.write_text(json.dumps(rows), encoding="utf-8")  # one JSON array
    else:
        datasets.Dataset.from_pandas(pd.DataFrame(rows)).save_to_disk(str(path))  # from_list keeps only row 1's keys
    return path
