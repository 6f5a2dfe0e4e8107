"""The Train tab in headless Chromium: a real `appliance train` run on the tiny model, watched from disk."""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import pytest
from playwright.sync_api import expect

from tests.ui.conftest import screenshot

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(importlib.util.find_spec("fedllm.appliance.commands.train") is None, reason="`appliance train` does not exist yet"),
]

GOOD_ROWS = [{"messages": [{"role": "user", "content": f"What is {i} plus {i}?"},
                           {"role": "assistant", "content": f"{i} plus {i} is {2 * i}."}]} for i in range(24)]


@pytest.fixture(scope="module")
def good_jsonl(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "sums.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in GOOD_ROWS))
    return path


def progress(page):
    return page.locator("#train-progress .run-progress")


def step_of(page) -> int:
    return int(progress(page).get_attribute("data-step") or 0)


def upload_and_fill(page, data: Path, model: str, steps: int) -> None:
    page.get_by_role("tab", name="Train").click()
    page.locator("#train-upload input[type=file]").set_input_files(str(data))
    expect(page.locator("#train-data-check")).to_contain_text("valid records")
    page.locator("#train-model").get_by_role("textbox").fill(model)
    page.locator("#train-steps").get_by_role("spinbutton").fill(str(steps))
    page.locator("#train-batch").get_by_role("spinbutton").fill("2")
    page.locator("#train-seq").get_by_role("spinbutton").fill("128")


def test_bad_upload_shows_every_error(page, console, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": [{"role": "user", "content": "hi"}]}\nnot json\n')
    page.goto(console.url)
    page.get_by_role("tab", name="Train").click()
    page.locator("#train-upload input[type=file]").set_input_files(str(bad))
    check = page.locator("#train-data-check")
    expect(check).to_contain_text("Invalid data")
    expect(check).to_contain_text(":2:")  # the bad JSON line, by number
    screenshot(page, "train-bad-data")


def test_training_progress_and_loss_survive_reload(page, console, good_jsonl, tiny_model_dir):
    page.goto(console.url)
    upload_and_fill(page, good_jsonl, str(tiny_model_dir), steps=10)
    page.locator("#train-start").click()
    expect(page.locator("#train-status")).to_contain_text("Started", timeout=20_000)
    # Progress arrives from runs/ID/metrics.jsonl while the subprocess trains.
    expect(progress(page)).to_have_attribute("data-state", "running", timeout=120_000)
    expect(progress(page)).not_to_have_attribute("data-step", "0", timeout=120_000)
    first_step = step_of(page)
    run_id = page.locator("#train-progress b").inner_text()

    page.reload()
    page.get_by_role("tab", name="Train").click()
    expect(page.locator("#train-progress b")).to_have_text(run_id, timeout=20_000)
    assert step_of(page) >= first_step  # nothing of the progress was lost with the page
    expect(progress(page)).to_have_attribute("data-state", "done", timeout=180_000)
    screenshot(page, "train")
    expect(page.locator("#train-progress .run-steps")).to_contain_text("step 10 / 10")
    expect(page.locator("#train-loss-caption")).to_contain_text("10 steps")
    expect(page.locator("#train-loss-caption")).to_contain_text("smoothed")
    expect(page.locator("#train-loss img")).to_be_visible()
    expect(page.locator("#train-runs")).to_contain_text(run_id)
    metrics = [json.loads(line) for line in (console.home / "runs" / run_id / "metrics.jsonl").read_text().splitlines()]
    assert len([m for m in metrics if "loss" in m]) == 10


def test_unknown_model_run_is_failed_with_exit_code(page, console, good_jsonl):
    page.goto(console.url)
    upload_and_fill(page, good_jsonl, "no-such-model", steps=4)
    page.locator("#train-start").click()
    expect(progress(page)).to_have_attribute("data-state", "failed", timeout=90_000)
    expect(page.locator("#train-progress .run-error")).to_contain_text("exit code 2")
    expect(page.locator("#train-log textarea")).to_have_value(re.compile("unknown model"), timeout=20_000)
    screenshot(page, "train-failed-exit")
