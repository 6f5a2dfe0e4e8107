"""Process helpers of appliance/core: log tail, signal-to-event."""

from __future__ import annotations

import os
import signal

from fedllm.core.processes import log_tail, stop_on_signals, wait_for_signal


def test_log_tail_keeps_the_last_lines(tmp_path):
    path = tmp_path / "x.log"
    path.write_text("".join(f"line {i}\n" for i in range(100)))

    tail = log_tail(path, 30)

    assert tail.splitlines()[0] == "line 70" and tail.splitlines()[-1] == "line 99"
    assert log_tail(tmp_path / "missing.log") == "" and log_tail(None) == ""


def test_log_tail_of_a_huge_log_reads_only_its_end(tmp_path):
    path = tmp_path / "big.log"
    path.write_text("x" * 1_000_000 + "\nlast line\n")

    assert log_tail(path, 1) == "last line"


def test_stop_on_signals_turns_sigterm_into_an_event():
    old = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        stop = stop_on_signals()
        assert not stop.is_set()

        os.kill(os.getpid(), signal.SIGTERM)

        assert wait_for_signal(stop, poll_s=0.01) and stop.is_set()
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)


def test_wait_for_signal_returns_false_when_the_child_is_gone():
    import threading

    assert wait_for_signal(threading.Event(), lambda: False, poll_s=0.01) is False
