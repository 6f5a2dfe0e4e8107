"""Training data records: the JSONL formats the appliance accepts, and their validation (pure, torch-free).

Supported record formats (one JSON object per line):
  - OpenAI chat: ``{"messages": [{"role": "system"|"user"|"assistant", "content": "..."}, ...]}``
  - prompt/answer: ``{"prompt": "...", "completion": "..."}``
  - alpaca: ``{"instruction": "...", "input": "...", "output": "..."}``
  - plain text: ``{"text": "..."}`` (loss on every token)

The training engine (`train.data`) and the console's upload check both validate with these functions.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from appliance.core.errors import DataError

ROLES = ("system", "user", "assistant")
MAX_ERRORS_SHOWN = 20


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


def validate_records(records: Sequence[Any], source: str = "<rows>", unit: str = "") -> list[dict[str, Any]]:
    """Check every record; raise once with all problems (``source:{unit}N: problem``, N from 1), else return them.

    Raises:
        DataError: at least one record is invalid, or there are none.
    """
    errors = [f"{source}:{unit}{i}: {p}" for i, r in enumerate(records, start=1) if (p := _check_record(r))]
    if errors:
        raise _collected(source, errors)
    if not records:
        raise DataError(f"{source}: no records (expected JSONL with one example per line)")
    return list(records)


def _collected(source: str, errors: list[str]) -> DataError:
    shown = "\n  ".join(errors[:MAX_ERRORS_SHOWN])
    more = f"\n  ... and {len(errors) - MAX_ERRORS_SHOWN} more" if len(errors) > MAX_ERRORS_SHOWN else ""
    return DataError(f"{len(errors)} invalid record(s) in {source}:\n  {shown}{more}")


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
