"""Training data: loading and validation, chat-template tokenisation, answer-only loss masks, packing.

Files: JSONL, or JSON, CSV, Parquet and folders saved by Hugging Face `datasets` (read by `datasets`).
The record formats, the file reader and their validation live in `core/contracts/records.py` (the console checks
uploads with them); ``load_file``, ``load_jsonl`` and ``validate_records`` are re-exported here for the engine.

Packing puts several short examples into one ``max_seq_len`` row. Attention never crosses an example
boundary: each packed row carries ``position_ids`` that restart at 0 for every example and no 2D attention
mask, which makes transformers (``masking_utils.find_packed_sequence_indices``) build a block-diagonal causal
mask for the sdpa and eager kernels (flash-attention uses the same position_ids as varlen boundaries).
The first token of every example gets label -100, so the loss never predicts it from the previous example.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedllm.core.contracts.records import load_file, record_format, validate_records
from fedllm.core.contracts.records import load_jsonl as load_jsonl  # re-exported (the docstring; tests use it)
from fedllm.core.errors import DataError

log = logging.getLogger(__name__)

IGNORE_INDEX = -100


@dataclass(frozen=True)
class Example:
    """One tokenised example: token ids and labels (IGNORE_INDEX where no loss is taken)."""

    input_ids: list[int]
    labels: list[int]


@dataclass(frozen=True)
class ChatExample:
    """A record normalised to chat messages, or to plain text when `text` is set."""

    messages: list[dict[str, str]] | None = None
    text: str | None = None


# ---------------------------------------------------------------- loading and validation


def load_data(data: Path | str | Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Records from a data path (see `load_file`) or an in-memory sequence of dicts, validated."""
    if isinstance(data, (str, Path)):
        return load_file(Path(data))
    return validate_records(list(data))


def data_sha256(data: Path | str | Sequence[dict[str, Any]]) -> str:
    """sha256 of the data file's bytes (of a folder: its files' relative names and bytes, in name order), or of
    the records' canonical JSON for in-memory data."""
    h = hashlib.sha256()
    if isinstance(data, (str, Path)):
        root = Path(data)
        files = sorted(p for p in root.rglob("*") if p.is_file()) if root.is_dir() else [root]
        for file in files:
            if root.is_dir():
                h.update(str(file.relative_to(root)).encode() + b"\0")
            with open(file, "rb") as f:
                while block := f.read(1 << 20):
                    h.update(block)
    else:
        for r in data:
            h.update(json.dumps(r, sort_keys=True).encode() + b"\n")
    return h.hexdigest()


# ---------------------------------------------------------------- normalising and tokenising


def to_chat(record: dict[str, Any]) -> ChatExample:
    """Normalise a valid record of any supported format to chat messages (or plain text)."""
    fmt = record_format(record)
    if fmt == "messages":
        return ChatExample(messages=[{"role": m["role"], "content": m["content"]} for m in record["messages"]])
    if fmt == "prompt":
        return ChatExample(
            messages=[
                {"role": "user", "content": record["prompt"]},
                {"role": "assistant", "content": record["completion"]},
            ]
        )
    if fmt == "alpaca":
        user = record["instruction"] + (f"\n\n{record['input']}" if record.get("input") else "")
        return ChatExample(
            messages=[{"role": "user", "content": user}, {"role": "assistant", "content": record["output"]}]
        )
    return ChatExample(text=record["text"])


def prompt_and_answer(record: dict[str, Any]) -> tuple[list[dict[str, str]], str] | None:
    """For single-answer records: the messages before the last answer, and that answer; None for plain text."""
    chat = to_chat(record)
    if chat.messages is None:
        return None
    return chat.messages[:-1], chat.messages[-1]["content"]


def _render(tokenizer: Any, messages: list[dict[str, str]], add_generation_prompt: bool = False) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def tokenize_example(tokenizer: Any, record: dict[str, Any], max_seq_len: int) -> Example:
    """Tokenise one record with the chat template; labels only on assistant tokens (and their end-of-turn).

    Assistant spans are found as character ranges of the rendered conversation (the text of the prefix with a
    generation prompt, up to the text of the prefix plus the answer) and mapped to tokens with the fast
    tokenizer's offsets, so it works for any template that renders prefixes as prefixes. Without a chat
    template, messages are joined as plain text with the same masking. Truncated to `max_seq_len` tokens.
    """
    chat = to_chat(record)
    if chat.text is not None:
        ids = tokenizer(chat.text, add_special_tokens=False)["input_ids"]
        if tokenizer.eos_token_id is not None:
            ids = ids + [tokenizer.eos_token_id]
        ids = ids[:max_seq_len]
        return Example(ids, list(ids))
    assert chat.messages is not None  # to_chat sets either `text` (handled above) or `messages`
    text, spans = _render_with_spans(tokenizer, chat.messages)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = enc["input_ids"]
    labels = [IGNORE_INDEX] * len(ids)
    for i, (start, end) in enumerate(enc["offset_mapping"]):
        if end > start and any(s <= start < e for s, e in spans):
            labels[i] = ids[i]
    return Example(ids[:max_seq_len], labels[:max_seq_len])


def _render_with_spans(tokenizer: Any, messages: list[dict[str, str]]) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character spans of each assistant answer in it."""
    if getattr(tokenizer, "chat_template", None):
        full = _render(tokenizer, messages)
        spans = []
        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            before = _render(tokenizer, messages[:i], add_generation_prompt=True)
            upto = _render(tokenizer, messages[: i + 1])
            if not (full.startswith(before) and full.startswith(upto) and len(upto) > len(before)):
                raise DataError("the model's chat template does not render prefixes as prefixes; cannot mask answers")
            spans.append((len(before), len(upto)))
        return full, spans
    eos = tokenizer.eos_token or ""
    parts, spans, pos = [], [], 0
    for m in messages:
        head = f"{m['role']}: "
        body = m["content"] + ("\n" if m["role"] != "assistant" else eos + "\n")
        if m["role"] == "assistant":
            spans.append((pos + len(head), pos + len(head) + len(body)))
        parts.append(head + body)
        pos += len(head) + len(body)
    return "".join(parts), spans


def tokenize_records(tokenizer: Any, records: Iterable[dict[str, Any]], max_seq_len: int) -> list[Example]:
    """Tokenise records; examples whose answer was cut off entirely by truncation are dropped (and logged)."""
    out, dropped = [], 0
    for r in records:
        ex = tokenize_example(tokenizer, r, max_seq_len)
        if all(label == IGNORE_INDEX for label in ex.labels[1:]):
            dropped += 1
            continue
        out.append(ex)
    if dropped:
        log.warning("dropped %d example(s) with no answer tokens left within max_seq_len=%d", dropped, max_seq_len)
    if not out:
        raise DataError(f"no example keeps any answer token within max_seq_len={max_seq_len}; raise max_seq_len")
    return out


# ---------------------------------------------------------------- splitting, packing, batching


def split_eval(
    records: Sequence[dict[str, Any]], fraction: float, seed: int
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Deterministic (train, eval) split: a seeded shuffle, then the last `fraction` (at least one) held out."""
    if fraction <= 0 or len(records) < 2:
        return list(records), []
    order = list(range(len(records)))
    random.Random(seed).shuffle(order)
    n_eval = max(1, int(round(len(records) * fraction)))
    return [records[i] for i in order[:-n_eval]], [records[i] for i in order[-n_eval:]]


@dataclass(frozen=True)
class Row:
    """One training row: token ids, labels, position ids (restarting per packed example)."""

    input_ids: list[int]
    labels: list[int]
    position_ids: list[int]

    @property
    def num_tokens(self) -> int:
        """Real (non-padding) tokens; padding has position id -1 until collation."""
        return sum(1 for p in self.position_ids if p >= 0)


def pack_examples(examples: Sequence[Example], max_seq_len: int) -> list[Row]:
    """Greedy first-fit packing, in order, into rows of at most `max_seq_len` tokens.

    Every example's tokens appear exactly once; position ids restart at 0 for each example; the first label of
    every example is masked so the loss never crosses a boundary.
    """
    rows: list[Row] = []
    ids: list[int] = []
    labels: list[int] = []
    pos: list[int] = []
    for ex in examples:
        n = len(ex.input_ids)
        if ids and len(ids) + n > max_seq_len:
            rows.append(Row(ids, labels, pos))
            ids, labels, pos = [], [], []
        ids += ex.input_ids
        labels += [IGNORE_INDEX] + ex.labels[1:]
        pos += list(range(n))
    if ids:
        rows.append(Row(ids, labels, pos))
    return rows


def unpacked_rows(examples: Sequence[Example]) -> list[Row]:
    """One row per example (no packing)."""
    return [Row(list(ex.input_ids), [IGNORE_INDEX] + ex.labels[1:], list(range(len(ex.input_ids)))) for ex in examples]


def collate(rows: Sequence[Row], pad_token_id: int, packed: bool) -> dict[str, Any]:
    """Right-pad rows into tensors.

    Packed batches get `position_ids` and no attention mask (block-diagonal attention from the position ids;
    padding continues the positions as one more segment and carries no loss). Unpacked batches get a 2D
    attention mask.

    Returns:
        A dict with input_ids, labels (batch, seq) and position_ids or attention_mask.
    """
    import torch

    width = max(len(r.input_ids) for r in rows)
    ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    batch: dict[str, Any] = {"input_ids": ids, "labels": labels}
    if packed:
        pos = torch.arange(width, dtype=torch.long).repeat(len(rows), 1)
        for i, r in enumerate(rows):
            n = len(r.input_ids)
            pos[i, :n] = torch.tensor(r.position_ids)
            # padding forms its own segment: positions 0.. after the last example
            pos[i, n:] = torch.arange(width - n)
        batch["position_ids"] = pos
    else:
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            mask[i, : len(r.input_ids)] = 1
        batch["attention_mask"] = mask
    for i, r in enumerate(rows):
        ids[i, : len(r.input_ids)] = torch.tensor(r.input_ids)
        labels[i, : len(r.labels)] = torch.tensor(r.labels)
    return batch


def epoch_order(num_rows: int, seed: int, epoch: int) -> list[int]:
    """The row order of one epoch: a shuffle that depends only on (seed, epoch), so resumes replay it."""
    order = list(range(num_rows))
    random.Random(seed * 1_000_003 + epoch).shuffle(order)
    return order


def micro_batch(
    rows: Sequence[Row], index: int, batch_size: int, seed: int, rank: int = 0, world_size: int = 1
) -> list[Row]:
    """This rank's share of global micro-batch number `index` (0-based) of `batch_size` rows; epochs wrap around.

    The global micro-batch is a pure function of (index, seed), whatever the number of ranks: rank r of
    `world_size` takes its rows r*b..(r+1)*b-1 (b = batch_size / world_size), so N ranks see exactly the rows one
    rank would. That is what makes resuming exact and results independent of the rank count.
    """
    if batch_size % world_size:
        raise ValueError(f"a global micro-batch of {batch_size} rows does not split across {world_size} ranks")
    per_epoch = batches_per_epoch(len(rows), batch_size)
    epoch, k = divmod(index, per_epoch)
    order = epoch_order(len(rows), seed, epoch)
    share = batch_size // world_size
    start = k * batch_size + rank * share
    picked = [order[(start + j) % len(order)] for j in range(share)]
    return [rows[i] for i in picked]


def batches_per_epoch(num_rows: int, batch_size: int) -> int:
    """Global micro-batches of `batch_size` rows in one pass over the rows (at least 1)."""
    return max(1, num_rows // batch_size)
