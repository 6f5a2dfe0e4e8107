"""Fixtures of the training-engine tests: tiny records and settings sized for a few fast CPU steps."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest


def arithmetic_records(n: int = 24) -> list[dict[str, Any]]:
    """Short chat examples with a learnable pattern (the answer repeats the question's numbers)."""
    return [
        {"messages": [{"role": "user", "content": f"What is {i} plus {i}?"}, {"role": "assistant", "content": f"{i} plus {i} is {2 * i}."}]}
        for i in range(n)
    ]


def write_jsonl(path: Path, records: list[Any]) -> Path:
    """Write records one per line (strings are written as they are, for malformed lines)."""
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records), encoding="utf-8")
    return path


def small_cfg(**overrides: Any):
    """TrainSettings for the tiny model: short rows, a high learning rate, no warmup, no dropout."""
    from fedllm.core.sections.train import TrainSettings

    base = dict(max_seq_len=128, batch_size=4, lr=1e-2, warmup_steps=0, lora_dropout=0.0, zero_stage=0, seed=0)
    return TrainSettings(**{**base, **overrides})


@pytest.fixture
def records() -> list[dict[str, Any]]:
    return arithmetic_records()


@pytest.fixture(scope="session")
def tokenizer(tiny_model_dir: Path):
    from fedllm.train.lora import load_tokenizer

    return load_tokenizer(tiny_model_dir)
