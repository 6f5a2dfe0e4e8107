"""The Federation tab's handlers, called directly with a console context (no browser)."""

from __future__ import annotations

import zmq

from fedllm.testing.factories import free_port, make_settings
from fedllm.ui.context import ConsoleContext
from fedllm.ui.tabs import federation as tab


def _ctx(home) -> ConsoleContext:
    return ConsoleContext.from_settings(make_settings(home, ui={"coordinator_url": f"http://127.0.0.1:{free_port()}"}))


def test_enrol_admits_a_silo_key_with_its_declared_count_through_the_cli(tmp_path):
    from fedllm.federation.wire.keys import declared_examples

    ctx = _ctx(tmp_path)
    public, _secret = zmq.curve_keypair()

    message = tab.on_enrol(ctx, " hospital-a ", public.decode(), 120)

    assert "Enrolled silo **hospital-a**" in message and "120 examples" in message
    enrolled = (ctx.settings.keys_dir).rglob("*.json")
    assert any(public.decode() in p.read_text() for p in enrolled)
    assert declared_examples(ctx.settings.keys_dir) == {"hospital-a": 120}


def test_enrol_without_an_example_count_is_refused(tmp_path):
    ctx = _ctx(tmp_path)
    public, _secret = zmq.curve_keypair()

    for missing in (None, 0, 2.5):
        message = tab.on_enrol(ctx, "hospital-a", public.decode(), missing)
        assert message.startswith("⚠️") and "example count" in message
    assert not any("hospital-a" in p.read_text() for p in ctx.settings.keys_dir.rglob("*.json"))


def test_enrol_of_a_bad_key_shows_the_cli_error_and_enrols_nothing(tmp_path):
    ctx = _ctx(tmp_path)

    message = tab.on_enrol(ctx, "hospital-a", "not-a-key", 10)

    assert message.startswith("⚠️") and "key" in message.lower()
    assert not any("hospital-a" in p.read_text() for p in ctx.settings.keys_dir.rglob("*.json"))


def test_refresh_with_the_coordinator_down_says_so_and_shows_empty_views(tmp_path):
    problem, summary, silos, rounds, _plot, timings, _timing_plot = tab.refresh(_ctx(tmp_path))
    assert problem.startswith("⚠️") and summary == "" and silos == [] and rounds == [] and timings == []


def test_stop_with_nothing_running_says_so(tmp_path):
    assert "No coordinator or demo" in tab.on_stop(_ctx(tmp_path))


def test_refresh_shows_the_coordinator_status(tmp_path):
    import time

    from tests.ui.fakes import FakeCoordinator, sample_status

    coordinator = FakeCoordinator(sample_status(time.time())).start()
    try:
        ctx = ConsoleContext.from_settings(make_settings(tmp_path, ui={"coordinator_url": coordinator.url}))
        problem, summary, silos, rounds, _plot, timings, timing_plot = tab.refresh(ctx)
    finally:
        coordinator.stop()

    assert problem == "" and "**round** 4 / 10" in summary
    assert [row[0] for row in silos] == ["hospital-a", "hospital-b", "clinic-c"] and len(rounds) == 3
    # the last round's per-silo timings: a table row per silo and a stacked bar per silo
    assert [row[:2] for row in timings] == [[3, "clinic-c"], [3, "hospital-a"], [3, "hospital-b"]]
    assert timings[0][2:] == [2.2, 30.0, 4.4, 0.4, 620.0, 1.23, 1.23]  # download, train, upload, other, deadline, MB
    bars = timing_plot.axes[0].patches
    assert len(bars) == 3 * len(tab.TIMING_PARTS)


def test_demo_result_shows_the_recovered_share_per_silo(tmp_path):
    import json

    ctx = _ctx(tmp_path)
    assert tab.demo_markdown(ctx) == ""  # no demo yet
    out = ctx.settings.home / "ui" / "demo"
    out.mkdir(parents=True)
    (out / "result.json").write_text(json.dumps({"recovered": {"northbridge": 0.981, "lakeside": 0.97},
                                                  "federated_beats_local_cross_silo": True}))

    text = tab.demo_markdown(ctx)

    assert "northbridge **98%**" in text and "lakeside **97%**" in text and "beats every local-only" in text
    (out / "result.json").write_text("{not json")
    assert tab.demo_markdown(ctx) == ""


def test_timing_parts_put_unknown_transfers_in_other_and_skip_rounds_without_timings():
    # an older silo (no timestamps): the span is training plus what cannot be split
    assert tab.silo_timing_parts({"train_s": 3.0, "span_s": 5.0, "download_s": None, "upload_s": None}) == \
        {"download": 0.0, "train": 3.0, "upload": 0.0, "other": 2.0}
    status = {"rounds": [{"round": 1, "timings": {"a": {"download_s": 0.1, "train_s": 1.0, "upload_s": 0.2, "span_s": 1.5}}},
                         {"round": 2, "failed": "1 valid update(s) < min_silos=2"}]}
    assert tab.timing_rows(status) == [[1, "a", 0.1, 1.0, 0.2, 0.2, "", "", ""]]  # the last round that has timings
    assert tab.timing_rows({"rounds": []}) == []
