"""Training data records: the formats the appliance accepts, the file reader, and their validation (torch-free).

Files: JSONL (read here, problems named by line), or JSON, CSV, Parquet and folders saved by Hugging Face
`datasets` (read by `datasets`, imported only then; problems named by row). Supported record formats:
  - OpenAI chat: ``{"messages": [{"role": "system"|"user"|"assistant", "content": "..."}, ...]}``
  - prompt/answer: ``{"prompt": "...", "completion": "..."}``
  - alpaca: ``{"instruction": "...", "input": "...", "output": "..."}``
  - plain text: ``{"text": "..."}`` (loss on every token)

The training engine (`fedllm.train.data`) and the console's upload check both read and validate with these functions.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fedllm.core.errors import DataError

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


# Readers of Hugging Face `datasets` by file suffix; JSONL keeps its own reader (bad JSON is named by line).
DATASETS_BUILDERS = {".json": "json", ".csv": "csv", ".parquet": "parquet"}
SUPPORTED = "JSONL, JSON, CSV, Parquet, or a folder saved with datasets' save_to_disk"


def load_file(path: Path) -> list[dict[str, Any]]:
    """Read and validate a data file: JSONL (any other suffix too), or JSON, CSV, Parquet or a saved `datasets` folder.

    JSONL problems are named by line, the others by row (1-based, header not counted); cells that are empty
    (null) count as absent fields, so tables that mix formats in one schema work.

    Raises:
        DataError: the path is missing or unreadable, or records are invalid (all listed, with file and row).
    """
    path = Path(path)
    if path.is_dir():
        rows = _read_saved_dataset(path)
    elif not path.is_file():
        raise DataError(f"data file {path} does not exist")
    elif path.suffix.lower() in DATASETS_BUILDERS:
        rows = _read_with_datasets(path, DATASETS_BUILDERS[path.suffix.lower()])
    else:
        return load_jsonl(path)
    return validate_records([_table_record(row) for row in rows], str(path), unit="row ")


def _table_record(row: dict[str, Any]) -> dict[str, Any]:
    """A table row as a record: null cells are absent fields, unless then no format fits (then they are empty
    strings, so that an empty answer cell is reported as an empty answer)."""
    record = {k: v for k, v in row.items() if v is not None}
    return record if record_format(record) is not None else {k: "" if v is None else v for k, v in row.items()}


def _read_with_datasets(path: Path, builder: str) -> list[dict[str, Any]]:
    """The rows of a JSON/CSV/Parquet file, streamed by `datasets` (no cache copy of private data is written)."""
    import datasets

    try:
        # CSV cells are text: without string features pandas would turn an answer "4" into the integer 4.
        options = {"features": _csv_string_features(path)} if builder == "csv" else {}
        return list(datasets.load_dataset(builder, data_files=str(path), split="train", streaming=True, **options))
    except Exception as exc:  # the input edge: pyarrow, pandas and json errors all mean "cannot read this file"
        raise DataError(
            f"{path}: cannot read it as {builder.upper()} ({type(exc).__name__}: {exc}); expected {SUPPORTED}"
        ) from exc


def _csv_string_features(path: Path) -> Any:
    """`datasets.Features` reading every column of a CSV file (named by its header row) as a string."""
    import csv

    import datasets

    with open(path, encoding="utf-8", newline="") as f:
        header = next(csv.reader(f), [])
    return datasets.Features({name: datasets.Value("string") for name in header})


def _read_saved_dataset(path: Path) -> list[dict[str, Any]]:
    """The rows of a folder written by `Dataset.save_to_disk` (a DatasetDict: its 'train' split, or its only one)."""
    import datasets

    try:
        loaded = datasets.load_from_disk(str(path))
    except FileNotFoundError as exc:
        raise DataError(f"{path} is a folder but not a saved dataset ({exc}); expected {SUPPORTED}") from exc
    if isinstance(loaded, datasets.DatasetDict):
        splits = list(loaded)
        if "train" not in loaded and len(splits) != 1:
            raise DataError(f"{path}: a dataset with splits {splits} and none named 'train'; save the split to use")
        loaded = loaded["train" if "train" in loaded else splits[0]]
    return loaded.to_list()
