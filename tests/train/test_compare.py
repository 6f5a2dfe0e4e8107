"""`appliance eval --model BASE` and `appliance eval --compare base,NAME[:V],...`: one table on the same data."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from tests.train.conftest import arithmetic_records, write_jsonl
from fedllm.train.compare import format_table, parse_targets


@pytest.fixture
def cli():
    from fedllm.appliance.cli import app

    runner = CliRunner()
    return lambda *args: runner.invoke(app, [str(a) for a in args])


def table_rows(output: str) -> dict[str, dict[str, str]]:
    """The printed table as {model: {column: cell}} (the header names the columns)."""
    # CliRunner mixes stderr in: a progress bar may precede the header on the same line
    lines = [line.split() for line in output[output.rindex("model "):].splitlines()]
    return {cells[0]: dict(zip(lines[0][1:], cells[1:])) for cells in lines[1:] if cells}


def test_format_table_aligns_rows_and_marks_missing_metrics() -> None:
    text = format_table([("base", {"eval_loss": 2.5, "perplexity": 12.18, "tokens": 40}),
                         ("sums:1", {"eval_loss": 1.25, "perplexity": 3.49, "exact_match": 0.5, "tokens": 40})])
    rows = table_rows(text)
    assert rows["base"] == {"eval_loss": "2.5000", "perplexity": "12.1800", "exact_match": "-", "tokens": "40"}
    assert rows["sums:1"]["exact_match"] == "0.5000"
    assert len({len(line) for line in text.splitlines()}) == 1  # aligned columns


def test_parse_targets_refuses_empty_and_repeated() -> None:
    from fedllm.core.errors import ConfigError

    assert parse_targets("base, sums:2 ,") == ["base", "sums:2"]
    with pytest.raises(ConfigError, match="twice"):
        parse_targets("base,base")
    with pytest.raises(ConfigError, match="at least one"):
        parse_targets(" , ")


def test_eval_base_model_and_compare_on_the_tiny_model(cli, tiny_model_dir: Path, tmp_path: Path) -> None:
    data = write_jsonl(tmp_path / "sums.jsonl", arithmetic_records(6))
    home = tmp_path / "home"
    trained = cli("--home", home, "train", "--data", data, "--model", tiny_model_dir, "--max-steps", 2, "--max-seq-len", 64,
                  "--zero-stage", 0, "--output", "sums")
    assert trained.exit_code == 0, trained.output

    base = cli("--home", home, "eval", "--model", tiny_model_dir, "--data", data, "--max-new-tokens", 2, "--max-generate", 1)
    assert base.exit_code == 0, base.output
    assert "eval_loss:" in base.output and "generated: 1" in base.output

    no_data = cli("--home", home, "eval", "--model", tiny_model_dir)
    assert no_data.exit_code != 0 and "--data is required" in " ".join(no_data.output.split())

    compared = cli("--home", home, "eval", "--compare", "base,sums", "--max-new-tokens", 2, "--max-generate", 1)
    assert compared.exit_code == 0, compared.output
    rows = table_rows(compared.output)
    assert list(rows) == ["base", "sums:1"]  # the adapter's training data is the default eval data
    assert rows["base"]["tokens"] == rows["sums:1"]["tokens"]  # scored on the same tokens
    assert rows["base"]["eval_loss"] != rows["sums:1"]["eval_loss"]

    unknown = cli("--home", home, "eval", "--compare", "base,nope", "--data", data)
    assert unknown.exit_code == 2 and "nope" in unknown.output


@pytest.mark.slow
def test_compare_a_real_20_step_adapter_with_its_base_model(cli, embedded_model_dir: Path, tmp_path: Path) -> None:
    """On the embedded SmolLM2-135M: 20 steps of LoRA on the data lower its loss there below the base model's."""
    home = tmp_path / "home"
    (home / "models").mkdir(parents=True)
    (home / "models" / embedded_model_dir.name).symlink_to(embedded_model_dir)
    data = write_jsonl(tmp_path / "sums.jsonl", arithmetic_records(8))
    trained = cli("--home", home, "train", "--data", data, "--model", embedded_model_dir.name, "--max-steps", 20,
                  "--max-seq-len", 64, "--batch-size", 2, "--lr", "1e-3", "--lora-r", 8, "--target-modules", "q_proj,v_proj",
                  "--zero-stage", 0, "--output", "sums")
    assert trained.exit_code == 0, trained.output

    compared = cli("--home", home, "eval", "--compare", "base,sums:1", "--max-new-tokens", 12, "--max-generate", 4)

    assert compared.exit_code == 0, compared.output
    rows = table_rows(compared.output)
    assert list(rows) == ["base", "sums:1"]
    assert float(rows["sums:1"]["eval_loss"]) < float(rows["base"]["eval_loss"])
    assert float(rows["sums:1"]["perplexity"]) < float(rows["base"]["perplexity"])
    for row in rows.values():
        assert 0.0 <= float(row["exact_match"]) <= 1.0 and 0.0 <= float(row["token_f1"]) <= 1.0
