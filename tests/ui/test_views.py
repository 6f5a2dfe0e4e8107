"""Pure view helpers of the tabs: what the tables and plots are made of."""

from __future__ import annotations

from pathlib import Path

from fedllm.core.adapter_registry import AdapterVersion
from tests.ui.fakes import sample_status
from fedllm.ui.runs import RunView
from fedllm.ui.tabs.adapters import adapter_rows, lineage_source, served_names, served_regions
from fedllm.ui.tabs.federation import eval_frame, round_rows, silo_rows, summary_markdown
from fedllm.ui.tabs.train import loss_caption, loss_frame, progress_html


def test_federation_views_from_a_status_document():
    status = sample_status(now=1000.0)
    assert "**round** 4 / 10" in summary_markdown(status, now=1000.0) and "7:00 left" in summary_markdown(status, now=1000.0)
    assert silo_rows(status, now=1000.0)[2][:3] == ["clinic-c", "no", "1:03 ago"]
    assert round_rows(status)[0][0] == 1 and round_rows(status)[0][-1] == "federation:1"
    frame = eval_frame(status)
    assert set(frame["series"]) == {"global", "hospital-a", "hospital-b", "clinic-c"}
    assert len(frame) == 3 * 4


def test_federation_plot_falls_back_to_train_loss_and_says_so():
    status = {"rounds": [{"round": 1, "metrics": {"train_loss": 2.0}, "per_silo": {"a": {"train_loss": 2.1}}}]}
    assert set(eval_frame(status)["series"]) == {"global (train)", "a (train)"}
    assert eval_frame({}).empty and str(eval_frame({})["loss"].dtype) == "float64"


def test_adapter_views_show_lineage_and_what_is_served(tmp_path: Path):
    fed = AdapterVersion("fed", 2, tmp_path, {"round": 2, "run": "fed", "base_model": "m", "metrics": {"eval_loss": 1.23456}})
    trained = AdapterVersion("bot", 1, tmp_path, {"run_id": "r1", "data_sha256": "ab" * 32, "base_model": "m"})
    entries = [{"name": "fed-v2", "aliases": ["fed-latest"], "regions": ["eu", "ch"]}, "other"]
    served = served_names(entries)
    assert served == {"fed-v2", "fed-latest", "other"}
    rows = adapter_rows([fed, trained], served, served_regions(entries))
    assert rows[0] == ["fed:2", "yes", "fed-v2", "eu, ch", "m", "round 2 of federation fed", "", "eval_loss=1.235"]
    assert rows[1][5:7] == ["run r1", "ab" * 6] and rows[1][1] == "no" and rows[1][3] == ""
    assert adapter_rows([fed], served)[0][3] == "anywhere"  # served, limited to no region
    assert lineage_source({}) == ""


def test_plots_draw_one_line_per_series_with_a_legend():
    from fedllm.ui.tabs.federation import federation_figure
    from fedllm.ui.tabs.train import loss_figure

    ax = federation_figure(sample_status(now=1000.0)).axes[0]
    assert [line.get_label() for line in ax.get_lines()] == ["global", "hospital-a", "hospital-b", "clinic-c"]
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["global", "hospital-a", "hospital-b", "clinic-c"]
    empty = loss_figure(None).axes[0]
    assert not empty.get_lines() and empty.texts[0].get_text() == "No run selected"


def test_train_views_for_a_failed_run():
    run = RunView(id="r9", state="failed", exit_code=-9, error="the training process (pid 7) is gone",
                  metrics=[{"step": 1, "total_steps": 10, "loss": 3.0}, {"step": 2, "total_steps": 10, "loss": 2.5}])
    html = progress_html(run)
    assert "data-state='failed'" in html and "exit code -9" in html and "step 2 / 10" in html
    assert list(loss_frame(run)["series"]) == ["raw", "smoothed", "raw", "smoothed"]
    assert loss_caption(run).startswith("2 steps plotted · last loss 2.5000")


def test_fleet_rows_show_a_quarantined_worker():
    from fedllm.ui.tabs.fleet import WORKER_HEADERS, worker_rows

    rows = worker_rows([{"id": "w-1", "url": "u", "region": "eu", "healthy": True, "draining": False, "quarantined": True,
                         "canary": "failed", "outstanding": 0, "latency_ms": 1.0, "models": ["m"], "adapters": []},
                        {"id": "w-2", "url": "v", "region": "eu", "healthy": True, "canary": "passed", "models": ["m"]}])
    column = WORKER_HEADERS.index("canary")
    assert [r[column] for r in rows] == ["QUARANTINED", "passed"]


def test_fleet_rows_say_why_a_worker_gets_no_traffic():
    from fedllm.ui.tabs.fleet import WORKER_HEADERS, worker_rows

    held = {"id": "w-3", "canary": "unverified", "unverified": ["other"],
            "no_traffic": "no trusted worker serves other, so its answers cannot be checked (serve.allow_unverified is false)"}
    partly = {"id": "w-4", "canary": "pending", "unverified": ["other"], "no_traffic": None}
    column = WORKER_HEADERS.index("canary")
    cells = [r[column] for r in worker_rows([held, partly])]
    assert cells[0].startswith("NO TRAFFIC: no trusted worker serves other") and "serve.allow_unverified" in cells[0]
    assert cells[1] == "pending (no traffic for unverified other)"
