"""Training data: JSONL loading and validation, chat-template tokenisation, answer-only loss masks, packing.

Supported record formats (one JSON object per line):
  - OpenAI chat: ``{"messages": [{"role": "system"|"user"|"assistant", "content": "..."}, ...]}``
  - prompt/answer: ``{"prompt": "...", "completion": "..."}``
  - alpaca: ``{"instruction": "...", "input": "...", "output": "..."}``
  - plain text: ``{"text": "..."}`` (loss on every token)

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

from appliance.core.errors import DataError

log = logging.getLogger(__name__)

IGNORE_INDEX = -100
ROLES = ("system", "user", "assistant")
MAX_ERRORS_SHOWN = 20


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


def record_format(record: dict[str, Any]) -> str | None:
    """The format of a record: 'messages', 'prompt', 'alpaca', 'text', or None if none fits."""
    if "messages" in record:
        return "messages"
    if "prompt" in record and "completion" in record:
        return "prompt"
    if "instruction" in record and "output" in record:
        return "alpaca"
    if "text" in record:
        return "text"
    return None


def _check_record(record: Any) -> str | None:
    """The problem with one record, or None if it is valid."""
    if not isinstance(record, dict):
        return f"expected a JSON object, found {type(record).__name__}"
    fmt = record_format(record)
    if fmt is None:
        return (
            f"no known fields (found {sorted(record)[:6]}); expected 'messages', 'prompt'+'completion', "
            "'instruction'+'output', or 'text'"
        )
    if fmt == "messages":
        return _check_messages(record["messages"])
    if fmt == "prompt":
        if not isinstance(record["prompt"], str) or not record["prompt"].strip():
            return "empty or non-string 'prompt'"
        if not isinstance(record["completion"], str) or not record["completion"].strip():
            return "empty answer: 'completion' is empty or not a string"
        return None
    if fmt == "alpaca":
        if not isinstance(record["instruction"], str) or not record["instruction"].strip():
            return "empty or non-string 'instruction'"
        if not isinstance(record.get("input", ""), str):
            return "'input' must be a string"
        if not isinstance(record["output"], str) or not record["output"].strip():
            return "empty answer: 'output' is empty or not a string"
        return None
    if not isinstance(record["text"], str) or not record["text"].strip():
        return "empty or non-string 'text'"
    return None


def _check_messages(messages: Any) -> str | None:
    if not isinstance(messages, list) or not messages:
        return "'messages' must be a non-empty list"
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            return f"messages[{i}] must be an object with 'role' and 'content'"
        if m["role"] not in ROLES:
            return f"messages[{i}] has unknown role {m['role']!r} (expected one of {', '.join(ROLES)})"
        if not isinstance(m["content"], str):
            return f"messages[{i}].content must be a string"
    roles = [m["role"] for m in messages]
    body = roles[1:] if roles[0] == "system" else roles
    if "system" in body:
        return "wrong role order: 'system' may only be the first message"
    if not body or body[0] != "user":
        return "wrong role order: the first non-system message must be 'user'"
    for i in range(1, len(body)):
        if body[i] == body[i - 1]:
            return f"wrong role order: two '{body[i]}' messages in a row"
    if body[-1] != "assistant":
        return "wrong role order: the last message must be 'assistant' (there is no answer to learn)"
    answers = [m for m in messages if m["role"] == "assistant"]
    if any(not m["content"].strip() for m in answers):
        return "empty answer: an assistant message has empty content"
    return None


def validate_records(records: Sequence[Any], source: str = "<rows>") -> list[dict[str, Any]]:
    """Check every record; raise once with all problems (``source:line: problem``), else return them.

    Raises:
        DataError: at least one record is invalid, or there are none.
    """
    errors = [f"{source}:{i}: {p}" for i, r in enumerate(records, start=1) if (p := _check_record(r))]
    if errors:
        raise _collected(source, errors)
    if not records:
        raise DataError(f"{source}: no records (expected JSONL with one example per line)")
    return list(records)


def _collected(source: str, errors: list[str]) -> DataError:
    shown = "\n  ".join(errors[:MAX_ERRORS_SHOWN])
    more = f"\n  ... and {len(errors) - MAX_ERRORS_SHOWN} more" if len(errors) > MAX_ERRORS_SHOWN else ""
    return DataError(f"{len(errors)} invalid record(s) in {source}; nothing was trained:\n  {shown}{more}")


def load_jsonl(path: Path) -> list[dict[str, Any]]:
    """Read and validate a JSONL file; blank lines are skipped.

    Raises:
        DataError: the file is missing, or lines are bad JSON / invalid records (all listed, with line numbers).
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data file {path} does not exist")
    records: list[dict[str, Any]] = []
    errors: list[str] = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                errors.append(f"{path}:{lineno}: bad JSON ({exc.msg} at column {exc.colno})")
                continue
            if problem := _check_record(record):
                errors.append(f"{path}:{lineno}: {problem}")
            else:
                records.append(record)
    if errors:
        raise _collected(str(path), errors)
    if not records:
        raise DataError(f"{path}: no records (expected JSONL with one example per line)")
    return records


def load_data(data: Path | str | Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Records from a JSONL path or an in-memory sequence of dicts, validated."""
    if isinstance(data, (str, Path)):
        return load_jsonl(Path(data))
    return validate_records(list(data))


def data_sha256(data: Path | str | Sequence[dict[str, Any]]) -> str:
    """sha256 of the data file's bytes, or of the records' canonical JSON for in-memory data."""
    h = hashlib.sha256()
    if isinstance(data, (str, Path)):
        with open(data, "rb") as f:
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
        return ChatExample(messages=[{"role": "user", "content": record["prompt"]}, {"role": "assistant", "content": record["completion"]}])
    if fmt == "alpaca":
        user = record["instruction"] + (f"\n\n{record['input']}" if record.get("input") else "")
        return ChatExample(messages=[{"role": "user", "content": user}, {"role": "assistant", "content": record["output"]}])
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


def split_eval(records: Sequence[dict[str, Any]], fraction: float, seed: int) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
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


def micro_batch(rows: Sequence[Row], index: int, batch_size: int, seed: int, rank: int = 0, world_size: int = 1) -> list[Row]:
    """The rows of global micro-batch number `index` (0-based) for this rank; epochs wrap around.

    A micro-batch is a pure function of (index, seed), which is what makes resuming exact.
    """
    per_epoch = batches_per_epoch(len(rows), batch_size, world_size)
    epoch, k = divmod(index, per_epoch)
    order = epoch_order(len(rows), seed, epoch)
    start = (k * world_size + rank) * batch_size
    picked = [order[(start + j) % len(order)] for j in range(batch_size)]
    return [rows[i] for i in picked]


def batches_per_epoch(num_rows: int, batch_size: int, world_size: int = 1) -> int:
    """Micro-batches in one pass over the rows (at least 1)."""
    return max(1, num_rows // (batch_size * world_size))
