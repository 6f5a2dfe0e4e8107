"""The supervisor of `appliance up`, with fast fake children (tests/appliance/fake_service.py) on free ports."""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from fedllm.core.errors import ConfigError
from fedllm.appliance.launcher import (
    ChildFailed,
    ChildSpec,
    PortInUse,
    Supervisor,
    backoff_delay,
    child_health,
    dependency_order,
    pid_alive,
    port_in_use,
    read_state,
)
from fedllm.testing.factories import REPO, free_port, wait_until

FAKE = REPO / "tests" / "appliance" / "fake_service.py"


def fake_spec(name: str, *extra: str, depends_on: tuple[str, ...] = (), port: int | None = None, timeout_s: float = 20) -> ChildSpec:
    port = port or free_port()
    return ChildSpec(
        name=name, argv=[sys.executable, str(FAKE), "--port", str(port), *extra],
        health_url=f"http://127.0.0.1:{port}/health", ports=(port,), url=f"http://127.0.0.1:{port}",
        depends_on=depends_on, ready_timeout_s=timeout_s,
    )


@pytest.fixture
def supervisor_factory(tmp_path):
    made: list[Supervisor] = []

    def make(specs, **kw) -> Supervisor:
        sup = Supervisor(specs, tmp_path / "logs", tmp_path / "run" / "up.json", poll_s=0.05, **kw)
        made.append(sup)
        return sup

    yield make
    for sup in made:
        sup.stop(timeout_s=5)


def test_dependency_order_puts_dependencies_first():
    a, b, c = ChildSpec("a", [], depends_on=("b",)), ChildSpec("b", [], depends_on=("c",)), ChildSpec("c", [])
    assert [s.name for s in dependency_order([a, b, c])] == ["c", "b", "a"]


@pytest.mark.parametrize("specs, message", [
    ([ChildSpec("a", [], depends_on=("zzz",))], "unknown"),
    ([ChildSpec("a", [], depends_on=("b",)), ChildSpec("b", [], depends_on=("a",))], "cycle"),
    ([ChildSpec("a", []), ChildSpec("a", [])], "duplicate"),
])
def test_dependency_errors_are_config_errors(specs, message):
    with pytest.raises(ConfigError, match=message):
        dependency_order(specs)


def test_backoff_doubles_and_is_capped():
    assert [backoff_delay(n, 1.0, 5.0) for n in (1, 2, 3, 4, 5)] == [1.0, 2.0, 4.0, 5.0, 5.0]


def test_start_in_order_writes_state_and_stop_removes_everything(supervisor_factory, tmp_path):
    sup = supervisor_factory([fake_spec("b", depends_on=("a",)), fake_spec("a")])

    sup.start()

    state = read_state(tmp_path / "run" / "up.json")
    assert [c["name"] for c in state["children"]] == ["a", "b"]
    assert all(c["state"] == "ready" for c in state["children"])
    assert all(c["healthy"] for c in child_health(state))
    pids = [c["pid"] for c in state["children"]]
    sup.stop(timeout_s=5)
    assert not any(pid_alive(p) for p in pids)
    assert not (tmp_path / "run" / "up.json").exists()


def test_a_taken_port_is_refused_before_anything_starts(supervisor_factory):
    with socket.socket() as blocker:
        blocker.bind(("127.0.0.1", 0))
        blocker.listen()
        taken = blocker.getsockname()[1]
        first = fake_spec("first")
        sup = supervisor_factory([first, fake_spec("second", port=taken, depends_on=("first",))])

        assert port_in_use("127.0.0.1", taken)
        with pytest.raises(PortInUse, match=f"second needs 127.0.0.1:{taken}"):
            sup.start()
    assert sup.child("first").proc is None  # nothing was started


def test_a_child_that_fails_at_start_stops_the_others_and_quotes_its_log(supervisor_factory):
    sup = supervisor_factory([fake_spec("ok"), fake_spec("bad", "--exit-after-s", "0", "--exit-code", "5", depends_on=("ok",))])

    with pytest.raises(ChildFailed) as info:
        sup.start()

    assert "bad exited with code 5" in str(info.value) and "fake service starting" in str(info.value)
    assert sup.child("ok").proc.returncode is not None


def test_a_killed_child_is_restarted_with_backoff(supervisor_factory, caplog):
    sup = supervisor_factory([fake_spec("svc")], backoff_initial_s=0.2)
    sup.start()
    stop = threading.Event()
    thread = threading.Thread(target=sup.supervise, args=(stop,))
    thread.start()
    try:
        for round_ in (1, 2):
            old = sup.child("svc").proc.pid
            os.kill(old, signal.SIGKILL)
            assert wait_until(lambda: sup.child("svc").restarts == round_ and sup.child("svc").state == "ready")
            assert sup.child("svc").proc.pid != old
    finally:
        stop.set()
        thread.join()
    assert sup.child("svc").failures == 2  # consecutive crashes: the second restart waited twice as long
    assert "svc exited with code -9; restarting it in 0.2 s" in caplog.text
    assert "restarting it in 0.4 s" in caplog.text
    assert read_state(sup.state_path)["children"][0]["restarts"] == 2


def _up_process(tmp_path: Path, specs: list[ChildSpec]) -> subprocess.Popen:
    """A real supervisor process (as `appliance up` runs it) over `specs`, driven by the script below."""
    script = tmp_path / "sup.py"
    script.write_text(
        "import json, sys\n"
        "from pathlib import Path\n"
        "from fedllm.core.processes import stop_on_signals\n"
        "from fedllm.appliance.launcher import ChildSpec, Supervisor\n"
        "specs = [ChildSpec(**{**d, 'ports': tuple(d['ports'])}) for d in json.loads(sys.argv[1])]\n"
        "stop = stop_on_signals()\n"
        "sup = Supervisor(specs, Path(sys.argv[2]) / 'logs', Path(sys.argv[2]) / 'up.json', poll_s=0.05)\n"
        "sup.start(stop)\n"
        "try:\n"
        "    sup.supervise(stop)\n"
        "finally:\n"
        "    sup.stop()\n"
    )
    payload = json.dumps([{"name": s.name, "argv": s.argv, "health_url": s.health_url, "ports": list(s.ports)} for s in specs])
    return subprocess.Popen([sys.executable, str(script), payload, str(tmp_path)], cwd=REPO,
                            env={**os.environ, "PYTHONPATH": str(REPO)})


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_ctrl_c_or_sigterm_stops_every_child(tmp_path, sig):
    proc = _up_process(tmp_path, [fake_spec("a"), fake_spec("b")])
    try:
        assert wait_until(lambda: (s := read_state(tmp_path / "up.json")) is not None
                          and all(c["state"] == "ready" for c in s["children"]) and len(s["children"]) == 2)
        pids = [c["pid"] for c in read_state(tmp_path / "up.json")["children"]]

        proc.send_signal(sig)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert not any(pid_alive(p) for p in pids)
    assert not (tmp_path / "up.json").exists()


def test_children_die_with_a_killed_supervisor(tmp_path):
    proc = _up_process(tmp_path, [fake_spec("a")])
    try:
        assert wait_until(lambda: (s := read_state(tmp_path / "up.json")) is not None and s["children"][0]["state"] == "ready")
        pid = read_state(tmp_path / "up.json")["children"][0]["pid"]
    finally:
        proc.kill()
        proc.wait()
    assert wait_until(lambda: not pid_alive(pid), timeout_s=10)  # PR_SET_PDEATHSIG
    assert read_state(tmp_path / "up.json") is None  # a stale state file of a dead supervisor reads as "not running"


def test_an_optional_child_that_fails_at_start_is_retried_instead_of_aborting(supervisor_factory, caplog):
    flaky = fake_spec("console", "--exit-after-s", "0", depends_on=("core",))
    sup = supervisor_factory([fake_spec("core"), ChildSpec(**{**flaky.__dict__, "optional": True})], backoff_initial_s=0.1)

    sup.start()

    assert sup.child("core").state == "ready"
    assert "console (optional) failed to start" in caplog.text
    stop = threading.Event()
    thread = threading.Thread(target=sup.supervise, args=(stop,))
    thread.start()
    try:
        assert wait_until(lambda: sup.child("console").restarts >= 1)
    finally:
        stop.set()
        thread.join()
    assert sup.child("core").restarts == 0


def test_a_child_that_exits_0_has_finished_and_is_not_restarted(supervisor_factory, caplog):
    caplog.set_level(logging.INFO, logger="fedllm.appliance.launcher")
    sup = supervisor_factory([fake_spec("coordinator", "--exit-after-s", "2", "--exit-code", "0")], backoff_initial_s=0.05)
    sup.start()
    stop = threading.Event()
    thread = threading.Thread(target=sup.supervise, args=(stop,))
    thread.start()
    try:
        assert wait_until(lambda: sup.child("coordinator").state == "done")
        time.sleep(0.3)  # several supervision steps: still no restart
    finally:
        stop.set()
        thread.join()
    assert sup.child("coordinator").restarts == 0
    assert "coordinator finished (exit code 0)" in caplog.text


def test_a_child_that_refuses_its_settings_is_not_restarted(supervisor_factory, caplog):
    sup = supervisor_factory([fake_spec("coordinator", "--exit-after-s", "2", "--exit-code", "2")], backoff_initial_s=0.05)
    sup.start()
    stop = threading.Event()
    thread = threading.Thread(target=sup.supervise, args=(stop,))
    thread.start()
    try:
        assert wait_until(lambda: sup.child("coordinator").state == "failed")
        time.sleep(0.3)
    finally:
        stop.set()
        thread.join()
    assert sup.child("coordinator").restarts == 0
    assert "coordinator refused its settings (exit code 2)" in caplog.text and "fake service starting" in caplog.text
