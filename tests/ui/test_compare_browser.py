"""The Adapters tab's "Compare on eval data" in headless Chromium, on the embedded SmolLM2-135M with a real 20-step
adapter: the comparison runs as `appliance eval --compare` launched by the console, and the page shows the table
(the adapter's loss lower than the base model's on the data it learned) and the bar chart."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from playwright.sync_api import expect
from typer.testing import CliRunner

from fedllm.testing.factories import free_port
from tests.train.conftest import arithmetic_records, write_jsonl
from tests.ui.conftest import screenshot, start_console, stop_process

pytestmark = [pytest.mark.browser, pytest.mark.slow]


@pytest.fixture
def trained_home(embedded_model_dir: Path, tmp_path: Path) -> tuple[Path, Path]:
    """An APPLIANCE_HOME with the embedded model and `sums:1`, 20 LoRA steps on the data; (home, data)."""
    from fedllm.appliance.cli import app

    home = tmp_path / "home"
    (home / "models").mkdir(parents=True)
    (home / "models" / embedded_model_dir.name).symlink_to(embedded_model_dir)
    data = write_jsonl(tmp_path / "sums.jsonl", arithmetic_records(8))
    trained = CliRunner().invoke(app, [str(a) for a in (
        "--home", home, "train", "--data", data, "--model", embedded_model_dir.name, "--max-steps", 20, "--max-seq-len", 64,
        "--batch-size", 2, "--lr", "1e-3", "--lora-r", 8, "--target-modules", "q_proj,v_proj", "--zero-stage", 0,
        "--output", "sums")])
    assert trained.exit_code == 0, trained.output
    return home, data


def test_compare_base_and_a_20_step_adapter_in_the_adapters_tab(page, fake_router, trained_home):
    home, data = trained_home
    console = start_console(home, fake_router.url, f"http://127.0.0.1:{free_port()}")
    try:
        page.goto(console.url)
        page.get_by_role("tab", name="Adapters").click()
        models = page.locator("#compare-models")
        models.get_by_label("base", exact=True).check()
        models.get_by_label("sums:1", exact=True).check()
        page.locator("#compare-upload input[type=file]").set_input_files(str(data))
        expect(page.locator("#compare-data-check")).to_contain_text("8 valid records")
        page.locator("#compare-max-generate").get_by_role("spinbutton").fill("2")
        page.locator("#compare-max-new-tokens").get_by_role("spinbutton").fill("12")
        page.locator("#compare-start").click()

        expect(page.locator("#compare-message")).to_contain_text("Started appliance eval --compare base,sums:1 on sums.jsonl (8 records")
        progress = page.locator("#compare-progress .compare-progress")
        expect(progress).to_have_attribute("data-state", "running", timeout=60_000)
        expect(progress).to_have_attribute("data-state", "done", timeout=900_000)
        expect(progress).to_contain_text("scored 2 of 2 models")
        table = page.locator("#compare-table")
        expect(table).to_contain_text("sums:1")
        expect(page.locator("#compare-plot img")).to_be_visible()
        screenshot(page, "adapters-compare")

        (report_path,) = list((home / "ui" / "evals").glob("*.json"))
        rows = {r["model"]: r["metrics"] for r in json.loads(report_path.read_text())["rows"]}
        assert list(rows) == ["base", "sums:1"]
        assert rows["sums:1"]["eval_loss"] < rows["base"]["eval_loss"]  # 20 steps on this data lowered its loss there
        for metrics in rows.values():  # the page shows the numbers the command wrote
            expect(table).to_contain_text(f"{round(metrics['eval_loss'], 4)}")
            assert 0.0 <= metrics["exact_match"] <= 1.0 and 0.0 <= metrics["token_f1"] <= 1.0
    finally:
        stop_process(console.process)
