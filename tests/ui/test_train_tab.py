"""The Train tab's handlers, called directly with a console context (no browser)."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import pytest

from fedllm.testing.factories import make_settings, write_format
from fedllm.ui.context import ConsoleContext
from fedllm.ui.runs import RunView
from fedllm.ui.tabs import train as tab

GOOD = [{"prompt": "What is 2+2?", "completion": "4"}, {"messages": [{"role": "user", "content": "hi"},
                                                                      {"role": "assistant", "content": "hello"}]}]


def _ctx(home: Path, **ui) -> ConsoleContext:
    return ConsoleContext.from_settings(make_settings(home, ui=ui))


def _jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def test_a_valid_upload_is_stored_private_and_offered(tmp_path):
    ctx = _ctx(tmp_path / "home")
    src = _jsonl(tmp_path / "good.jsonl", GOOD)

    message, dropdown = tab.on_upload(ctx, str(src))

    stored = tab.data_dir(ctx) / "good.jsonl"
    assert message.startswith("**Valid:**") and "2 valid records" in message
    assert stored.read_bytes() == src.read_bytes()
    assert stat.S_IMODE(stored.stat().st_mode) == 0o600
    assert dropdown.value == str(stored)
    assert [p.name for p in tab.data_dir(ctx).iterdir()] == ["good.jsonl"]  # no temp file left behind


def test_an_invalid_upload_lists_its_problems_and_saves_nothing(tmp_path):
    ctx = _ctx(tmp_path / "home")
    src = _jsonl(tmp_path / "bad.jsonl", [{"prompt": "q", "completion": ""}, {"foo": 1}])

    message, _ = tab.on_upload(ctx, str(src))

    assert message.startswith("**Invalid data** - nothing was saved") and "bad.jsonl:1" in message and "bad.jsonl:2" in message
    assert not (tab.data_dir(ctx) / "bad.jsonl").exists()


@pytest.mark.parametrize("name", ["good.csv", "good.parquet", "good.json"])
def test_csv_parquet_and_json_uploads_are_read_by_the_one_validator_and_offered(tmp_path, name):
    ctx = _ctx(tmp_path / "home")
    src = write_format(tmp_path / name, [{"prompt": "What is 2+2?", "completion": "4"}, {"text": "plain text"}])

    message, dropdown = tab.on_upload(ctx, str(src))

    assert message.startswith("**Valid:**") and "2 valid records" in message
    assert dropdown.value == str(tab.data_dir(ctx) / name) and dropdown.value in tab.data_choices(ctx)


def test_a_malformed_csv_row_is_named_and_nothing_is_saved(tmp_path):
    ctx = _ctx(tmp_path / "home")
    src = write_format(tmp_path / "bad.csv", [{"prompt": "q", "completion": "a"}, {"prompt": "q2", "completion": None}])

    message, _ = tab.on_upload(ctx, str(src))

    assert message.startswith("**Invalid data** - nothing was saved") and "bad.csv:row 2: empty answer" in message
    assert not (tab.data_dir(ctx) / "bad.csv").exists()


def test_an_upload_of_another_file_type_names_the_accepted_ones(tmp_path):
    ctx = _ctx(tmp_path / "home")
    src = _jsonl(tmp_path / "notes.txt", GOOD)

    message, _ = tab.on_upload(ctx, str(src))

    assert "Invalid data" in message and ".jsonl, .json, .csv, .parquet" in message
    assert not tab.data_dir(ctx).exists()


def test_an_upload_over_the_size_limit_is_refused_with_the_setting_named(tmp_path):
    ctx = _ctx(tmp_path / "home", max_upload_mb=0.001)  # about 1 KB
    src = _jsonl(tmp_path / "big.jsonl", GOOD * 20)

    message, _ = tab.on_upload(ctx, str(src))

    assert "Invalid data" in message and "ui.max_upload_mb" in message
    assert not tab.data_dir(ctx).exists() or not any(tab.data_dir(ctx).iterdir())


def test_start_without_data_asks_for_it(tmp_path):
    message, _ = tab.on_start(_ctx(tmp_path), None, "m", "out", 5, 1e-4, 1, 8, 16, 256)
    assert "Upload or pick a training file first" in message


def test_refresh_without_runs_shows_the_empty_views(tmp_path):
    dropdown, progress, _plot, caption, log, table, problem = tab.refresh(_ctx(tmp_path), None)
    assert dropdown.value is None and "No training runs yet" in progress
    assert caption == log == problem == "" and table == []


def test_stop_and_resume_of_no_run_say_so(tmp_path):
    ctx = _ctx(tmp_path)
    assert "not running" in tab.on_stop(ctx, "nope")
    assert "Pick a run" in tab.on_resume(ctx, "nope")


def test_a_launch_is_followed_to_its_run_and_no_pick_means_the_newest(tmp_path):
    newest, older = RunView(id="r2", state="running", launch_id="L2"), RunView(id="r1", state="done")
    runs = [newest, older]
    assert tab.find_run(runs, "launch-L2") is newest
    assert tab.find_run(runs, "launch-unknown") is None
    assert tab.find_run(runs, "r1") is older and tab.find_run(runs, None) is newest


def test_a_refresh_keeps_the_pick_it_was_computed_from_and_sets_it_only_to_follow(tmp_path):
    # A timer tick computed from pick "r1" may answer after Start picked "launch-L2": it must not take the pick back.
    run_dir = tmp_path / "runs" / "r1"
    run_dir.mkdir(parents=True)
    (run_dir / "status.json").write_text(json.dumps({"state": "done", "exit_code": 0}), encoding="utf-8")
    ctx = _ctx(tmp_path)

    kept = tab.refresh(ctx, "r1")[0]
    followed = tab.refresh(ctx, None)[0]

    # What an update sends is what its constructor was given (gradio's `constructor_args`).
    assert "value" not in kept.constructor_args and kept.constructor_args["choices"] == ["r1"]
    assert followed.constructor_args["value"] == "r1"  # no pick: the newest run is picked
