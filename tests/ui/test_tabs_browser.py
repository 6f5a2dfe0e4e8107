"""Every tab with state in it (a finished run, adapters, a federation three rounds in, a worker), in Chromium.

The state is laid out on disk and served by fakes, so this checks what the console shows, fast; it also saves the
screenshots of each tab that the README uses (artifacts/ui/tab-*.png).
"""

from __future__ import annotations

import json
import math
import re
import time
from pathlib import Path

import pytest
from playwright.sync_api import expect

from fedllm.core.adapter_registry import AdapterRegistry
from tests.ui.conftest import ADMIN_TOKEN, screenshot, start_console, stop_process
from tests.ui.fakes import FakeCoordinator, FakeRouter, sample_status

pytestmark = pytest.mark.browser


def make_state(home: Path) -> None:
    run = home / "runs" / "20261125-101500-a1b2c3"
    run.mkdir(parents=True)
    lines = []
    for step in range(1, 41):
        loss = 2.6 * math.exp(-step / 18) + 0.9 + 0.08 * math.sin(step * 1.7)
        lines.append({"step": step, "total_steps": 40, "loss": loss, "lr": 2e-4, "tokens_per_s": 160.0,
                      "elapsed_s": 6.0 * step, "eta_s": 6.0 * (40 - step), "time": time.time()})
        if step % 10 == 0:
            lines.append({"step": step, "eval_loss": loss + 0.15})
    (run / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    (run / "status.json").write_text(json.dumps({"state": "done", "pid": 1, "exit_code": 0, "adapter": "support-bot:1"}))
    src = home / "adapter-src"
    src.mkdir()
    (src / "adapter_config.json").write_text(json.dumps({"r": 8, "lora_alpha": 16}))
    (src / "adapter_model.safetensors").write_bytes(b"\0" * 64)
    registry = AdapterRegistry(home / "adapters")
    registry.register("support-bot", src, {"base_model": "smollm2-135m-instruct", "run_id": run.name,
                                           "data_sha256": "9f2c" * 16, "metrics": {"train_loss": 1.02, "eval_loss": 1.17}})
    for r in (1, 2, 3):
        registry.register("federation", src, {"base_model": "smollm2-135m-instruct", "round": r, "federation": "federation",
                                              "metrics": {"eval_loss": 2.55 - 0.29 * r}})


@pytest.fixture(scope="module")
def showcase(tmp_path_factory):
    home = tmp_path_factory.mktemp("showcase-home")
    make_state(home)
    router = FakeRouter(admin_token=ADMIN_TOKEN).start()
    router.state.workers.append({"id": "w1", "url": "http://127.0.0.1:8100", "region": "eu-west", "healthy": True,
                                 "draining": False, "outstanding": 1, "latency_ms": 182.4,
                                 "models": ["smollm2-135m-instruct"], "adapters": ["federation-v3"]})
    router.state.adapters["federation-v3"] = {"name": "federation-v3", "path": "/x", "aliases": ["federation-latest"]}
    coordinator = FakeCoordinator(sample_status(time.time())).start()
    console = start_console(home, router.url, coordinator.url)
    yield console, router
    stop_process(console.process)
    coordinator.stop()
    router.stop()


def test_every_tab_shows_its_state(page, showcase):
    console, router = showcase
    page.goto(console.url)

    expect(page.locator("#chat-model input")).to_have_value("smollm2-135m-instruct")
    page.locator("#chat-input textarea").fill("What can you do?")
    page.locator("#chat-send").click()
    expect(page.locator("#chatbot")).to_contain_text("word by word", timeout=20_000)
    screenshot(page, "tab-chat")

    page.get_by_role("tab", name="Train").click()
    expect(page.locator("#train-progress .run-progress")).to_have_attribute("data-state", "done")
    expect(page.locator("#train-loss-caption")).to_contain_text("40 steps plotted")
    expect(page.locator("#train-loss-caption")).to_contain_text("eval loss")
    screenshot(page, "tab-train")

    page.get_by_role("tab", name="Federation").click()
    expect(page.locator("#fed-summary")).to_contain_text("round 4 / 10")
    expect(page.locator("#fed-summary")).to_contain_text("collecting")
    expect(page.locator("#fed-silos")).to_contain_text("clinic-c")
    expect(page.locator("#fed-rounds")).to_contain_text("federation:3")
    expect(page.locator("#fed-plot img")).to_be_visible()
    expect(page.locator("#fed-timings")).to_contain_text("clinic-c")  # the last round's per-silo timings
    expect(page.locator("#fed-timing-plot img")).to_be_visible()
    screenshot(page, "tab-federation")
    import zmq

    public_key = zmq.curve_keypair()[0].decode()
    page.locator("#fed-silo-name").get_by_role("textbox").fill("hospital-d")
    page.locator("#fed-silo-key").get_by_role("textbox").fill(public_key)
    page.locator("#fed-silo-examples").get_by_role("spinbutton").fill("250")
    page.locator("#fed-enrol").click()
    expect(page.locator("#fed-action")).to_contain_text("Enrolled silo hospital-d")
    from fedllm.federation.wire.keys import declared_examples, enrolled_silos

    assert enrolled_silos(console.home / "keys")["hospital-d"] == public_key
    assert declared_examples(console.home / "keys")["hospital-d"] == 250
    page.locator("#fed-silo-key").get_by_role("textbox").fill("not-a-key")
    page.locator("#fed-enrol").click()
    expect(page.locator("#fed-action")).to_contain_text("⚠")

    page.get_by_role("tab", name="Fleet").click()
    expect(page.locator("#fleet-workers")).to_contain_text("eu-west")
    expect(page.locator("#fleet-metrics")).to_contain_text("Requests 42")
    page.locator("#fleet-url").get_by_role("textbox").fill("http://10.0.0.7:8100")
    page.locator("#fleet-add").click()
    expect(page.locator("#fleet-action")).to_contain_text("API key is needed")
    page.locator("#fleet-api-key").get_by_role("textbox").fill("worker-key-0123456789")
    page.locator("#fleet-add").click()
    expect(page.locator("#fleet-action")).to_contain_text("with its API key")
    expect(page.locator("#fleet-workers")).to_contain_text("10.0.0.7")
    added = next(w["id"] for w in router.state.workers if w["url"] == "http://10.0.0.7:8100")
    assert router.state.worker_keys[added] == "worker-key-0123456789"
    screenshot(page, "tab-fleet")

    page.get_by_role("tab", name="Adapters").click()
    table = page.locator("#adapters-table")
    expect(table).to_contain_text("support-bot:1")
    expect(table).to_contain_text("round 3 of federation federation")
    expect(page.locator("#adapters-pick input")).to_have_value("support-bot:1")
    page.locator("#adapters-publish").click()
    expect(page.locator("#adapters-action")).to_contain_text("Published support-bot-v1 (alias support-bot-latest)")
    expect(table).to_contain_text("yes")  # federation-v3 is served by the fleet
    page.locator("#adapters-export").click()
    expect(page.locator("#adapters-download")).to_contain_text("support-bot-v1")
    expect(page.locator("#adapters-action")).to_contain_text("Exported support-bot:1")
    screenshot(page, "tab-adapters")
    assert router.state.publish_calls[-1]["aliases"] == ["support-bot-latest"]


def test_compare_streams_two_models(page, showcase):
    console, router = showcase
    page.goto(console.url)
    page.get_by_text("Compare two models on one prompt").click()
    expect(page.locator("#compare-b input")).to_have_value(re.compile(r"-latest$"))  # the last model the router lists
    model_b = page.locator("#compare-b input").input_value()
    page.locator("#compare-prompt textarea").fill("Summarise our refund policy")
    page.locator("#compare-run").click()
    expect(page.locator("#compare-out-a")).to_contain_text("Hello from smollm2-135m-instruct", timeout=20_000)
    expect(page.locator("#compare-out-b")).to_contain_text(f"Hello from {model_b}", timeout=20_000)
    expect(page.locator("#compare-out-b")).to_contain_text("word by word", timeout=20_000)
    screenshot(page, "chat-compare")
