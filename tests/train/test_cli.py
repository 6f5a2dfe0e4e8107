"""`appliance train|eval|export` through Typer's CliRunner on the tiny model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from tests.train.conftest import arithmetic_records, write_jsonl


@pytest.fixture
def cli():
    from fedllm.appliance.cli import app

    runner = CliRunner()
    return lambda *args: runner.invoke(app, [str(a) for a in args])


def test_dry_run_prints_peft_equal_counts(cli, tiny_model_dir: Path, tmp_path: Path) -> None:
    import torch

    from tests.train.conftest import small_cfg
    from fedllm.train.lora import build_peft_model

    result = cli("--home", tmp_path, "train", "--dry-run", "--model", tiny_model_dir, "--lora-r", 4, "--target-modules", "q_proj,v_proj")
    assert result.exit_code == 0, result.output
    trainable, total = build_peft_model(small_cfg(lora_r=4, target_modules=["q_proj", "v_proj"]), tiny_model_dir, torch.float32).get_nb_trainable_parameters()
    assert f"trainable LoRA parameters: {trainable:,}" in result.output
    assert f"total parameters: {total:,}" in result.output
    assert "q_proj, v_proj" in result.output


def test_dry_run_checks_csv_parquet_and_datasets_data_and_names_a_bad_row(cli, tiny_model_dir: Path, tmp_path: Path) -> None:
    from fedllm.testing.factories import write_format

    rows = [{"prompt": "What is 2+2?", "completion": "4"}, {"instruction": "Add 1 and 1.", "output": "2"}]
    good = [write_format(tmp_path / name, rows) for name in ("d.csv", "d.parquet", "d-saved")]
    bad = write_format(tmp_path / "bad.parquet", [rows[0], {"prompt": "q", "completion": ""}])

    results = [cli("--home", tmp_path, "train", "--dry-run", "--model", tiny_model_dir, "--data", p) for p in good]
    failed = cli("--home", tmp_path, "train", "--dry-run", "--model", tiny_model_dir, "--data", good[0], "--eval", bad)

    for path, result in zip(good, results):
        assert result.exit_code == 0, result.output
        assert f"data: {path}: 2 records (1 prompt, 1 alpaca)" in " ".join(result.output.split())
    assert failed.exit_code == 2
    assert f"{bad}:row 2: empty answer" in " ".join(failed.output.split())


def test_bad_data_exits_2_naming_file_and_line(cli, tiny_model_dir: Path, tmp_path: Path) -> None:
    bad = write_jsonl(tmp_path / "bad.jsonl", ['{"prompt": "q"', {"prompt": "q", "completion": "a"}])
    result = cli("--home", tmp_path, "train", "--data", bad, "--model", tiny_model_dir, "--max-steps", 1)
    assert result.exit_code == 2
    assert "bad.jsonl:1: bad JSON" in " ".join(result.output.split())
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


@pytest.mark.slow
def test_train_registers_then_eval_export_and_resume(cli, tiny_model_dir: Path, tmp_path: Path) -> None:
    data = write_jsonl(tmp_path / "sums.jsonl", arithmetic_records(8))
    home = tmp_path / "home"
    result = cli("--home", home, "train", "--data", data, "--model", tiny_model_dir, "--max-steps", 2, "--max-seq-len", 128,
                 "--zero-stage", 0, "--lr", "0.01", "--output", "sums")
    assert result.exit_code == 0, result.output
    assert "registered adapter sums:1" in result.output
    (run_dir,) = list((home / "runs").iterdir())
    assert json.loads((run_dir / "status.json").read_text())["adapter"] == "sums:1"
    meta = json.loads((home / "adapters" / "sums" / "1" / "meta.json").read_text())
    assert len(meta["data_sha256"]) == 64 and meta["run_id"] == run_dir.name and meta["metrics"]["steps"] == 2

    evaluated = cli("--home", home, "eval", "--adapter", "sums", "--max-new-tokens", 3, "--max-generate", 2)
    assert evaluated.exit_code == 0, evaluated.output
    assert "generated: 2" in evaluated.output
    assert "eval_loss:" in evaluated.output and "exact_match:" in evaluated.output and "token_f1:" in evaluated.output

    out = tmp_path / "exported"
    assert cli("--home", home, "export", "--adapter", "sums:1", "--out", out).exit_code == 0
    assert (out / "adapter_model.safetensors").exists() and (out / "meta.json").exists()
    assert "library_name: peft" in (out / "README.md").read_text() and len(meta["base_model_hash"]) == 64
    merged = tmp_path / "merged"
    exported = cli("--home", home, "export", "--adapter", "sums", "--merge", "--out", merged)
    assert exported.exit_code == 0, exported.output
    from transformers import AutoModelForCausalLM

    assert AutoModelForCausalLM.from_pretrained(merged).config.num_hidden_layers == 2

    resumed = cli("--home", home, "train", "--resume", run_dir.name)
    assert resumed.exit_code == 0, resumed.output
    assert "registered adapter sums:2" in resumed.output


def test_resume_of_an_unknown_run_exits_2(cli, tmp_path: Path) -> None:
    result = cli("--home", tmp_path, "train", "--resume", "nope")
    assert result.exit_code == 2 and "unknown run" in " ".join(result.output.split())


@pytest.mark.slow
def test_launcher_entry_point_trains_and_writes_a_peft_folder(tiny_model_dir: Path, tmp_path: Path, monkeypatch) -> None:
    """`python -m fedllm.train` (what `deepspeed --module train` runs on every rank), in process as rank 0."""
    from fedllm.train.__main__ import main

    config = tmp_path / "appliance.yaml"
    config.write_text("train:\n  max_seq_len: 128\n  zero_stage: 0\n  batch_size: 2\n", encoding="utf-8")
    monkeypatch.setenv("APPLIANCE_HOME", str(tmp_path / "home"))
    data = write_jsonl(tmp_path / "d.jsonl", arithmetic_records(4))
    code = main(["--model-dir", str(tiny_model_dir), "--data", str(data), "--out", str(tmp_path / "out"), "--config", str(config),
                 "--max-steps", "1", "--run-dir", str(tmp_path / "run"), "--local_rank=0"])
    assert code == 0 and (tmp_path / "out" / "adapter_model.safetensors").exists()
    assert json.loads((tmp_path / "run" / "status.json").read_text())["state"] == "done"


def test_ranks_that_do_not_split_the_global_batch_exit_2_before_anything_starts(cli, tiny_model_dir: Path, tmp_path: Path) -> None:
    data = write_jsonl(tmp_path / "d.jsonl", arithmetic_records(8))
    result = cli("--home", tmp_path, "train", "--data", data, "--model", tiny_model_dir, "--ranks", 3, "--batch-size", 4)
    assert result.exit_code == 2
    assert "multiple of the 3 ranks" in " ".join(result.output.split())
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())
