"""Pipelining (docs/protocol.md §4e): negotiation, calls run in the order sent, a queued call
cancelled before it starts is answered without running, and the cancel signals go by call
position (a signal meant for another position is ignored)."""

from __future__ import annotations

import os
import signal
import sys
import textwrap
import threading
from pathlib import Path

import pytest

from snakepit_bridge import tool
from snakepit_bridge.testing import FakeHost, WorkerError

ran: list[object] = []
go = threading.Event()


@tool
def record(i: object) -> object:
    ran.append(i)
    return i


@tool
def gate(i: object) -> object:
    """Waits (bounded) until the test lets it go."""
    ran.append(i)
    if not go.wait(10):
        raise RuntimeError("the test never let the gate go")
    return i


@pytest.fixture(autouse=True)
def _reset() -> None:
    del ran[:]
    go.clear()


def test_the_depth_is_negotiated() -> None:
    with FakeHost(pipeline_depth=4) as host:
        assert host.ready["pipeline_depth"] == 4
        # In-process (not the main thread): no cancel signal at all, so none per position.
        assert "cancel_signals" not in host.ready
    with FakeHost(pipeline_depth=64) as host:
        assert host.ready["pipeline_depth"] == 16, "capped"
    with FakeHost() as host:
        assert "pipeline_depth" not in host.ready
    with FakeHost(pipeline_depth=4, max_in_flight=4) as host:
        assert "pipeline_depth" not in host.ready, "the thread profile does not pipeline"


def test_no_pipelining_when_turned_off(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SNAKEPIT_BRIDGE_PIPELINE", "0")
    with FakeHost(pipeline_depth=4) as host:
        assert "pipeline_depth" not in host.ready


def test_queued_calls_run_in_order_and_a_cancelled_one_never_runs() -> None:
    with FakeHost(pipeline_depth=4) as host:
        first = host.submit("gate", {"i": "first"})
        queued = [host.submit("record", {"i": i}) for i in range(3)]
        host.cancel(queued[1])
        go.set()
        assert host.result(first) == "first"
        assert host.result(queued[0]) == 0
        with pytest.raises(WorkerError) as e:
            host.result(queued[1])
        assert e.value.type_name == "Cancelled"
        assert "before it started" in str(e.value)
        assert host.result(queued[2]) == 2
        assert ran == ["first", 0, 2]


def test_a_cancel_read_while_a_call_waits_on_the_host_answers_the_queued_call() -> None:
    from snakepit_bridge import Context

    def slow_host(ctx: Context) -> object:
        return ctx.call_host("wait")

    answered: list[object] = []

    def wait(args: object) -> object:
        # The host tool runs while the worker waits for its result: cancel the queued call
        # now; the worker reads the cancel while it waits, and answers that call at once.
        host.cancel(queued)
        answered.append(host.reply(queued))
        return "done"

    with FakeHost(tools=[slow_host, record], pipeline_depth=2, host_tools={"wait": wait}) as host:
        first = host.submit("slow_host")
        queued = host.submit("record", {"i": 1})
        assert host.result(first) == "done"
        assert answered[0]["t"] == "error" and answered[0]["error"]["type"] == "Cancelled"
        assert ran == []


def test_eof_with_calls_queued_ends_the_worker() -> None:
    host = FakeHost(pipeline_depth=4)
    host.start()
    first = host.submit("gate", {"i": "first"})
    host.submit("record", {"i": 1})
    go.set()
    assert host.result(first) == "first"
    host.close(shutdown=False)


WORKER = textwrap.dedent(
    """
    import time
    from snakepit_bridge import tool

    @tool
    def spin(seconds):
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            pass
        return "finished"

    @tool
    def signal_then_spin(ctx, seconds):
        ctx.call_host("started")
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            pass
        return "finished"

    @tool
    def echo(x):
        return x
    """
)


@pytest.mark.skipif(not hasattr(signal, "SIGRTMAX"), reason="real-time signals")
def test_process_signals_go_by_position(tmp_path: Path) -> None:
    script = tmp_path / "w.py"
    script.write_text(WORKER)
    with FakeHost.process(script=script, pipeline_depth=4, python=sys.executable) as host:
        sigs = host.ready["cancel_signals"]
        assert len(sigs) == 5 and len(set(sigs)) == 5, sigs  # depth + 1
        assert sigs[0] == signal.SIGRTMAX
        # The running call (position 0) is interrupted by its own signal; the queued one runs.
        a = host.submit("spin", {"seconds": 30})
        b = host.submit("echo", {"x": "b"})
        host.cancel(a)
        with pytest.raises(WorkerError) as e:
            host.result(a)
        assert e.value.type_name == "Cancelled"
        assert host.result(b) == "b"
        # A signal for another position (a call that has just ended, as the host may send it)
        # does not touch the running call (position 2).
        assert host.pid is not None

        def stale(args: object) -> None:
            os.kill(host.pid or 0, sigs[1])  # position 1's signal

        host.host_tools["started"] = stale
        c = host.submit("signal_then_spin", {"seconds": 0.2})
        assert host.result(c) == "finished"


def test_a_release_read_ahead_does_not_wait_for_more_input() -> None:
    # Before the queued call starts, the read-ahead finds only a `release` (the host sends one
    # after it copies arena segments out): it must take it and go on, not wait for a frame
    # that the host, waiting for that call's answer, will never send.
    with FakeHost(pipeline_depth=4, timeout=5.0) as host:
        first = host.submit("gate", {"i": "first"})
        queued = host.submit("record", {"i": 1})
        host.send({"t": "release", "shm": []})
        go.set()
        assert host.result(first) == "first"
        assert host.result(queued) == 1
