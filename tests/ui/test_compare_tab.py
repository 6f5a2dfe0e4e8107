"""The Adapters tab's "compare on eval data": its handlers called directly (no browser), the comparison itself a real
`appliance eval --compare` process on the tiny model, launched detached as the console does."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from fedllm.testing.factories import make_settings, wait_until, write_format
from fedllm.ui import evals, launcher
from fedllm.ui.context import ConsoleContext
from fedllm.ui.tabs import adapters as tab

QA = [{"prompt": f"What is {i} plus {i}?", "completion": f"{2 * i}"} for i in range(4)]


def _ctx(home: Path) -> ConsoleContext:
    return ConsoleContext.from_settings(make_settings(home))


def _register_adapter(ctx: ConsoleContext, model_dir: Path, tmp_path: Path, name: str = "sums") -> str:
    """A LoRA of the tiny model with non-zero B (so it scores differently from the base), registered as NAME:1."""
    import torch

    from tests.train.conftest import small_cfg
    from fedllm.train import initial_adapter_state, save_adapter_dir

    cfg = small_cfg(lora_r=4)
    gen = torch.Generator().manual_seed(0)
    state = {k: (torch.randn(v.shape, generator=gen) * 0.5 if "lora_B" in k else v)
             for k, v in initial_adapter_state(cfg, model_dir).items()}
    folder = save_adapter_dir(state, cfg, model_dir, tmp_path / "adapter")
    return ctx.registry.register(name, folder, {"base_model_dir": str(model_dir)}).ref


def test_bad_input_is_refused_with_the_problem_named_and_nothing_starts(tmp_path):
    ctx = _ctx(tmp_path / "home")
    uploads = tab.data_dir(ctx)
    uploads.mkdir(parents=True)
    good = write_format(uploads / "good.json", QA)
    bad_csv = write_format(uploads / "bad.csv", [QA[0], {"prompt": "q", "completion": None}])  # changed after its upload
    outside = write_format(tmp_path / "outside.json", QA)

    one_model = tab.on_compare(ctx, ["base"], str(good), True, 5)
    no_data = tab.on_compare(ctx, ["base", "sums:1"], None, True, 5)
    not_uploaded = tab.on_compare(ctx, ["base", "sums:1"], str(outside), True, 5)
    missing = tab.on_compare(ctx, ["base", "sums:1"], str(uploads / "nope.jsonl"), True, 5)
    bad_row = tab.on_compare(ctx, ["base", "sums:1"], str(bad_csv), True, 5)
    unknown = tab.on_compare(ctx, ["base", "sums:1"], str(good), True, 5)
    upload_message, _ = tab.on_upload(ctx, str(write_format(tmp_path / "typo.parquet", [QA[0], {"prompt": "", "completion": "a"}])))

    assert "at least two models" in one_model
    assert "eval data file" in no_data
    assert "uploaded to the console" in not_uploaded
    assert "nope.jsonl does not exist" in missing
    assert f"{bad_csv}:row 2: empty answer" in bad_row
    assert "sums" in unknown and "⚠️" in unknown
    assert "Invalid data" in upload_message and "typo.parquet:row 2: empty or non-string" in upload_message
    assert launcher.list_records(ctx.settings.home, evals.KIND) == []


def test_a_failed_comparison_shows_its_exit_code_and_the_cli_error(tmp_path):
    home = tmp_path / "home"
    log = launcher.launches_dir(home) / "x.log"
    log.parent.mkdir(parents=True)
    log.write_text("Loading...\nerror: the adapters have different base models (/a, /b); compare adapters of\none base model at a time\n")
    record = {"id": "x", "kind": "eval", "cmd": ["appliance", "eval", "--compare", "base,a:1,b:1"], "pid": None,
              "log": str(log), "started_at": time.time(), "exit_code": 2, "ended_at": time.time(), "stop_requested": False}

    view = evals.compare_view(record)

    assert view.state == "failed" and view.targets == ["base", "a:1", "b:1"] and view.rows == []
    assert view.error == "error: the adapters have different base models (/a, /b); compare adapters of one base model at a time"
    assert "data-state='failed'" in evals.progress_html(view) and "different base models" in evals.progress_html(view)


@pytest.mark.slow
def test_compare_runs_appliance_eval_and_fills_the_table_and_the_chart(tiny_model_dir, tmp_path):
    ctx = _ctx(tmp_path / "home")
    ref = _register_adapter(ctx, tiny_model_dir, tmp_path)
    message, dropdown = tab.on_upload(ctx, str(write_format(tmp_path / "qa.parquet", QA)))
    assert "4 valid records" in message

    started = tab.on_compare(ctx, ["base", ref], dropdown.value, True, 1, 4)
    assert started.startswith("Started `appliance eval --compare base,sums:1` on qa.parquet (4 records"), started
    again = tab.on_compare(ctx, ["base", ref], dropdown.value, True, 1, 4)  # one comparison at a time
    view = wait_until(lambda: (v := evals.latest_compare(ctx.settings.home)) and v.state != "running" and v, timeout_s=600,
                      step_s=0.5, what="the comparison to end")
    progress, rows, figure = tab.refresh_compare(ctx)

    assert "already running" in again
    assert view.state == "done", (view.error, launcher.list_records(ctx.settings.home, evals.KIND)[0])
    assert "data-state='done'" in progress and "scored 2 of 2 models" in progress
    assert [r[0] for r in rows] == ["base", "sums:1"] and evals.HEADERS[1:3] == ["loss", "perplexity"]
    (base_loss, base_ppl), (lora_loss, _) = [r[1:3] for r in rows]
    assert base_loss > 0 and base_ppl > 1 and lora_loss != base_loss  # the same data, different models
    assert all(r[3] is not None and r[4] is not None for r in rows)  # exact match and token F1 from generated answers
    (axes,) = figure.axes
    assert [t.get_text() for t in axes.get_xticklabels()] == ["base", "sums:1"]
    assert [round(b.get_height(), 4) for b in axes.patches] == [base_loss, lora_loss]
    # the CLI's own JSON is what the tab shows
    report = json.loads(next(evals.evals_dir(ctx.settings.home).glob("*.json")).read_text())
    assert report["done"] == report["total"] == 2 and report["data"].endswith("qa.parquet")


def test_a_launch_whose_process_ended_reads_running_until_its_wrapper_writes_the_exit_code(tmp_path):
    import os
    import subprocess

    gone = subprocess.Popen(["true"])
    gone.wait()
    record = {"pid": gone.pid, "exit_code": None, "stop_requested": False}

    assert launcher.record_state({**record, "wrapper_pid": os.getpid()}) == "running"  # the exit code is on its way
    assert launcher.record_state(record) == "failed"  # nobody left to write it: a crash
    assert launcher.record_state({**record, "exit_code": 0}) == "done"
