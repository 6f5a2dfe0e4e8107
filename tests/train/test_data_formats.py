"""Data beyond JSONL: JSON, CSV, Parquet and saved `datasets` folders, read by Hugging Face `datasets`, validated
row by row with the file and row named, and trained on (locally and in a federation silo)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from fedllm.core.errors import DataError
from fedllm.testing.factories import write_format
from tests.train.conftest import small_cfg
from fedllm.train.data import data_sha256, load_data

PAIRS = [{"prompt": f"What is {i} plus {i}?", "completion": f"{i} plus {i} is {2 * i}."} for i in range(6)]


@pytest.mark.parametrize("name", ["data.csv", "data.parquet", "data.json", "saved-dataset"])
def test_each_format_reads_the_same_records(tmp_path: Path, name: str) -> None:
    path = write_format(tmp_path / name, PAIRS)

    assert load_data(path) == PAIRS
    assert len(data_sha256(path)) == 64


def test_mixed_formats_in_one_table_leave_empty_cells_absent(tmp_path: Path) -> None:
    rows = [PAIRS[0], {"instruction": "Add 2 and 2.", "input": "", "output": "4"}, {"text": "plain text"}]
    path = write_format(tmp_path / "mixed.parquet", rows)

    assert load_data(path) == rows  # pandas fills the missing columns with nulls; they are dropped again


def test_a_saved_dataset_dict_uses_its_train_split_and_refuses_ambiguity(tmp_path: Path) -> None:
    import datasets

    datasets.DatasetDict({"train": datasets.Dataset.from_list(PAIRS[:4]), "test": datasets.Dataset.from_list(PAIRS[4:])}).save_to_disk(str(tmp_path / "dd"))
    datasets.DatasetDict({"a": datasets.Dataset.from_list(PAIRS), "b": datasets.Dataset.from_list(PAIRS)}).save_to_disk(str(tmp_path / "ab"))

    assert load_data(tmp_path / "dd") == PAIRS[:4]
    with pytest.raises(DataError, match="splits \\['a', 'b'\\] and none named 'train'"):
        load_data(tmp_path / "ab")


def test_malformed_rows_are_named_by_file_and_row(tmp_path: Path) -> None:
    rows = [PAIRS[0], {"prompt": "What is 1 plus 1?", "completion": ""}, PAIRS[1], {"prompt": "Where?", "completion": None}]
    csv = write_format(tmp_path / "bad.csv", rows)
    parquet = write_format(tmp_path / "bad.parquet", [PAIRS[0], {"question": "q", "answer": "a"}])

    with pytest.raises(DataError) as csv_err:
        load_data(csv)
    with pytest.raises(DataError) as parquet_err:
        load_data(parquet)

    assert "2 invalid record(s)" in str(csv_err.value)
    assert f"{csv}:row 2: empty answer" in str(csv_err.value) and f"{csv}:row 4:" in str(csv_err.value)
    assert f"{parquet}:row 2: empty or non-string 'prompt'" in str(parquet_err.value)  # the table has that column


def test_unreadable_files_and_plain_folders_say_what_was_expected(tmp_path: Path) -> None:
    (tmp_path / "broken.parquet").write_bytes(b"not parquet at all")
    (tmp_path / "folder").mkdir()

    with pytest.raises(DataError, match="cannot read it as PARQUET"):
        load_data(tmp_path / "broken.parquet")
    with pytest.raises(DataError, match="not a saved dataset"):
        load_data(tmp_path / "folder")
    with pytest.raises(DataError, match="does not exist"):
        load_data(tmp_path / "missing.csv")


@pytest.mark.parametrize("name", ["data.csv", "data.parquet", "saved-dataset"])
def test_training_reads_csv_parquet_and_datasets_folders(tiny_model_dir: Path, tmp_path: Path, name: str) -> None:
    from fedllm.train import fit_adapter

    path = write_format(tmp_path / name, PAIRS)

    result = fit_adapter(small_cfg(max_seq_len=64, batch_size=2), tiny_model_dir, path, eval_data=path, max_steps=1)

    assert result.num_examples == len(PAIRS) and result.metrics["steps"] == 1 and "eval_loss" in result.metrics


def test_a_federation_silo_trains_on_a_parquet_file_and_a_saved_dataset(tiny_model_dir: Path, tmp_path: Path) -> None:
    from fedllm.federation.runtime.silo import EngineTrainer

    trainer = EngineTrainer(small_cfg(max_seq_len=64, batch_size=2), tiny_model_dir, write_format(tmp_path / "silo.parquet", PAIRS),
                            write_format(tmp_path / "held-out", PAIRS[:2]))

    examples, metrics = trainer.fit(1, {})

    assert examples == len(PAIRS) and metrics["steps"] == 1
    assert set(trainer.evaluate()) == {"eval_loss", "perplexity"}
