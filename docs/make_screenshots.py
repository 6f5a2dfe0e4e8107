"""Regenerate docs/screenshots/*.png from a real appliance: `python docs/make_screenshots.py`.

Everything shown is real: `appliance up` in a temporary APPLIANCE_HOME (a vLLM worker on the embedded model, the
router, the coordinator and the console), a short `appliance train` run on the embedded model, a small federation of
two hospital silos (`appliance silo join`, CURVE on, the demo's data) whose rounds the coordinator publishes to the
router as `federation-latest`, and chat answers from vLLM. Headless Chromium (Debian's `/usr/bin/chromium`, driven by
Playwright) opens each console tab and saves it. Takes about ten minutes on two idle cores (`--rounds`,
`--local-steps` and `--train-steps` size it); needs the embedded
model prepared once (`appliance model prepare`, or any earlier test run, which leaves it in .cache/test-home).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import httpx

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from fedllm.core.cores import CoreShare, divide_cores  # noqa: E402

OUT = REPO / "docs" / "screenshots"
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--no-first-run", "--disable-sync"]
MODEL = "smollm2-135m-instruct"
SILOS = ("northbridge", "lakeside")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(predicate: Callable[[], Any], timeout_s: float, what: str, step_s: float = 1.0) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(step_s)
    raise RuntimeError(f"timed out after {timeout_s:.0f} s waiting for {what}")


def get_json(url: str) -> Any:
    try:
        return httpx.get(url, timeout=5).json()
    except (httpx.HTTPError, ValueError):
        return None


def appliance(home: Path, *args: str, env: dict[str, str]) -> str:
    """Run `appliance --home HOME ARGS...` to completion; its output (raises with it on failure)."""
    result = subprocess.run([sys.executable, "-m", "fedllm.appliance", "--home", str(home), *args], cwd=REPO, env=env,
                            capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"appliance {' '.join(args)} failed ({result.returncode}):\n{result.stdout}{result.stderr}")
    return result.stdout


def start(home: Path, args: list[str], env: dict[str, str], log: Path, share: CoreShare | None = None) -> subprocess.Popen:
    argv = [sys.executable, "-m", "fedllm.appliance", "--home", str(home), *args]
    with open(log, "wb") as out:
        return subprocess.Popen(share.argv(argv) if share else argv, cwd=REPO, env={**env, **(share.env() if share else {})},
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def stop(proc: subprocess.Popen, timeout_s: float = 60.0) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)


TRAIN = {"max_seq_len": 128, "batch_size": 4, "grad_accum": 1, "warmup_steps": 0, "lr": 2e-3, "lora_dropout": 0.0,
         "zero_stage": 0, "checkpoint_every_steps": 10_000}  # the demo's fast settings


def write_config(home: Path, ports: dict[str, int], rounds: int, local_steps: int) -> None:
    """A small appliance: one CPU worker, a short-sequence training setup, a federation of two silos."""
    config = {
        "model": MODEL,
        "train": TRAIN,
        "worker": {"count": 1, "base_port": ports["worker"], "kv_cache_gib": 1, "max_model_len": 2048, "startup_timeout_s": 900},
        "serve": {"port": ports["router"]},
        "ui": {"port": ports["console"], "poll_interval_s": 1.0, "require_login": False},  # pages, not the login form
        "federation": {"port": ports["federation"], "status_port": ports["status"], "rounds": rounds, "min_silos": len(SILOS),
                       "local_steps": local_steps, "round_deadline_s": 1800, "silo_timeout_s": 300, "run_name": "federation"},
    }
    (home / "config.yaml").write_text(json.dumps(config, indent=2))  # JSON is YAML


def prepare(home: Path, env: dict[str, str]) -> tuple[str, dict[str, Path], dict[str, dict[str, Path]]]:
    """Model, keys and data: the coordinator's key, two enrolled silos with their own homes, the demo's hospital data."""
    from fedllm.core.model_store import prepare_model
    from fedllm.federation.demo import data as demo_data

    prepared = prepare_model(REPO / ".cache" / "test-home" / "models", cache_dir=REPO / ".cache" / "wheels").path
    link_model(home, prepared)
    coordinator_key = appliance(home, "federation", "init", env=env).split()[-1]
    silo_homes = {}
    for org in SILOS:
        silo_homes[org] = home.parent / f"silo-{org}"
        silo_homes[org].mkdir()
        link_model(silo_homes[org], prepared)
        (silo_homes[org] / "config.yaml").write_text(json.dumps({"model": MODEL, "train": TRAIN}))
        public = appliance(silo_homes[org], "silo", "keygen", env=env).split()[-1]
        appliance(home, "federation", "enroll", "--", org, public, env=env)
    data = demo_data.write(home.parent / "data")
    return coordinator_key, silo_homes, data


def link_model(home: Path, prepared: Path) -> None:
    (home / "models").mkdir(parents=True, exist_ok=True)
    (home / "models" / MODEL).symlink_to(prepared)


def chat_answer(page, timeout_s: float = 300.0) -> str:
    """Wait until the chat's last answer has stopped growing; return it."""
    bot = page.locator("#chatbot [data-testid=bot]").last
    seen, stable_since = "", time.monotonic()
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        text = bot.inner_text() if bot.count() else ""
        if text != seen:
            seen, stable_since = text, time.monotonic()
        elif seen.strip() and time.monotonic() - stable_since > 4:
            return seen
        time.sleep(0.5)
    raise RuntimeError("the chat answer did not finish")


def shoot(console_url: str, question: str, compare_question: str, rounds: int) -> None:
    from playwright.sync_api import expect, sync_playwright

    expect.set_options(timeout=120_000)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True)
        page = browser.new_context(viewport={"width": 1280, "height": 900}).new_page()
        page.set_default_timeout(120_000)
        page.goto(console_url)

        expect(page.locator("#chat-model input")).to_have_value(MODEL)
        page.locator("#chat-input textarea").fill(question)
        page.locator("#chat-send").click()
        print("chat:", chat_answer(page)[:200].replace("\n", " "), flush=True)
        page.screenshot(path=str(OUT / "chat.png"), full_page=True)

        page.get_by_text("Compare two models on one prompt").click()
        page.locator("#compare-a input").fill(MODEL)
        page.locator("#compare-a input").press("Enter")
        page.locator("#compare-b input").fill("federation-latest")
        page.locator("#compare-b input").press("Enter")
        page.locator("#compare-prompt textarea").fill(compare_question)
        page.locator("#compare-run").click()
        for side in ("a", "b"):
            expect(page.locator(f"#compare-out-{side}")).to_contain_text(".", timeout=300_000)
        time.sleep(20)  # both streams run to their end (max tokens or a stop)
        page.screenshot(path=str(OUT / "chat-compare.png"), full_page=True)

        page.get_by_role("tab", name="Train").click()
        expect(page.locator("#train-progress .run-progress")).to_have_attribute("data-state", "done")
        expect(page.locator("#train-loss-caption")).to_contain_text("steps plotted")
        time.sleep(2)
        page.screenshot(path=str(OUT / "train.png"), full_page=True)

        page.get_by_role("tab", name="Federation").click()
        expect(page.locator("#fed-rounds")).to_contain_text(f"federation:{rounds}")
        expect(page.locator("#fed-plot img")).to_be_visible()
        time.sleep(2)
        page.screenshot(path=str(OUT / "federation.png"), full_page=True)

        page.get_by_role("tab", name="Fleet").click()
        expect(page.locator("#fleet-workers")).to_contain_text("127.0.0.1")
        # The tab was drawn at page load, before the chats; its timer samples the router's /metrics every few
        # seconds: wait for a sample that counts the chats, and a second one so the rate plots have an interval.
        expect(page.locator("#fleet-metrics")).to_contain_text("Requests")
        expect(page.locator("#fleet-metrics")).not_to_contain_text("Requests 0 ")
        time.sleep(12)  # the plots are images: give the timer (at least 5 s) two more samples
        page.screenshot(path=str(OUT / "fleet.png"), full_page=True)

        page.get_by_role("tab", name="Adapters").click()
        expect(page.locator("#adapters-table")).to_contain_text("support-bot:1")
        time.sleep(2)
        page.screenshot(path=str(OUT / "adapters.png"), full_page=True)
        browser.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train-steps", type=int, default=12, help="Steps of the training run shown in the Train tab.")
    parser.add_argument("--rounds", type=int, default=3, help="Federation rounds.")
    parser.add_argument("--local-steps", type=int, default=3, help="Steps each silo trains per round.")
    parser.add_argument("--keep", action="store_true", help="Keep the temporary homes (their logs) afterwards.")
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # a SIGTERM still stops everything this script started
    if not CHROMIUM.exists():
        sys.exit("needs Debian's chromium: apt-get install -y chromium (the Makefile's `browser` target)")
    root = Path(tempfile.mkdtemp(prefix="appliance-screens-"))
    home = root / "home"
    home.mkdir()
    ports = {name: free_port() for name in ("worker", "router", "console", "federation", "status")}
    env = {k: v for k, v in os.environ.items() if not k.startswith("APPLIANCE_")}
    env.update(APPLIANCE_HOME=str(home), PYTHONPATH=str(REPO), GRADIO_ANALYTICS_ENABLED="False")
    # One round more than the screenshots wait for: a coordinator exits after its last round, and the console's
    # Federation tab is shot while it is still serving its status.
    write_config(home, ports, args.rounds + 1, args.local_steps)
    coordinator_key, silo_homes, data = prepare(home, env)
    print(f"home {home}", flush=True)

    up = start(home, ["up"], env, root / "up.log")
    procs: list[subprocess.Popen] = []
    try:
        def everything_ready() -> bool:
            if up.poll() is not None:
                raise RuntimeError(f"appliance up exited:\n{(root / 'up.log').read_text()[-3000:]}")
            state = get_json_file(home / "run" / "up.json")
            return bool(state) and all(c["state"] == "ready" for c in state["children"])

        wait_until(everything_ready, 1800, "appliance up to report every part ready", step_s=2)
        print("appliance up is ready", flush=True)

        appliance(home, "train", "--data", str(data[SILOS[0]]["train"]), "--max-steps", str(args.train_steps), "--output", "support-bot", env=env)
        print("trained support-bot:1", flush=True)

        for org, share in zip(SILOS, divide_cores(len(SILOS))):  # the silos train at once: a share of the cores each
            procs.append(start(silo_homes[org], [
                "silo", "join", "--coordinator", f"tcp://127.0.0.1:{ports['federation']}", "--coordinator-key", coordinator_key,
                "--data", str(data[org]["train"]), "--eval", str(data[org]["eval"]), "--name", org], env, root / f"silo-{org}.log", share))
        status_url = f"http://127.0.0.1:{ports['status']}/status"
        wait_until(lambda: (get_json(status_url) or {}).get("completed_rounds", 0) >= args.rounds, 3600,
                   f"{args.rounds} federation rounds", step_s=5)
        router = f"http://127.0.0.1:{ports['router']}"
        wait_until(lambda: "federation-latest" in [m["id"] for m in (get_json(f"{router}/v1/models") or {}).get("data", [])],
                   300, "federation-latest on the router")
        print("federation done and published", flush=True)

        eval_rows = [json.loads(line) for line in Path(data[SILOS[0]]["eval"]).read_text().splitlines() if line.strip()]
        question = eval_rows[0]["messages"][0]["content"]
        shoot(f"http://127.0.0.1:{ports['console']}", "In two sentences: what is federated learning?", question, args.rounds)
        print(f"screenshots in {OUT}", flush=True)
        return 0
    finally:
        for proc in procs:
            stop(proc)
        stop(up, 120)
        if not args.keep:
            import shutil

            shutil.rmtree(root, ignore_errors=True)
        else:
            print(f"kept {root}")


def get_json_file(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


if __name__ == "__main__":
    sys.exit(main())
