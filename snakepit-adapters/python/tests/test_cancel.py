"""Cancel: sync and async tools in the thread profile, a call waiting on the host in the serial
profile, cancels that arrive after the answer, and the worker carrying on afterwards."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from snakepit_bridge import Cancelled, Context, tool
from snakepit_bridge.testing import FakeHost, WorkerError

started = threading.Event()
cleaned = threading.Event()


@tool
def spin() -> None:
    """Busy Python code: cancelled at its next bytecode."""
    started.set()
    try:
        while True:
            time.sleep(0.001)
    finally:
        cleaned.set()


@tool
def swallow() -> str:
    """`except Exception` does not swallow a cancel."""
    started.set()
    try:
        while True:
            time.sleep(0.001)
    except Exception:
        return "swallowed"


@tool
async def asleep() -> None:
    started.set()
    try:
        await asyncio.sleep(3600)
    finally:
        await asyncio.sleep(0.05)  # the call is answered only after this
        cleaned.set()


@tool
def host_then_spin(ctx: Context) -> None:
    ctx.call_host("started")
    while True:
        time.sleep(0.001)


@tool
def wait_on_host(ctx: Context) -> object:
    return ctx.call_host("slow")


@tool
def quick() -> str:
    return "ok"


def _expect_cancelled(host: FakeHost, rid: int) -> None:
    with pytest.raises(WorkerError) as e:
        host.result(rid)
    assert e.value.type_name == "Cancelled"


@pytest.mark.parametrize("cmd", ["spin", "swallow", "asleep"])
def test_a_running_tool_is_cancelled_in_the_thread_profile(cmd: str) -> None:
    started.clear()
    cleaned.clear()
    with FakeHost(tools=[spin, swallow, asleep, quick], max_in_flight=2) as host:
        rid = host.submit(cmd)
        assert started.wait(5)
        other = host.submit("quick")  # the other thread still serves
        assert host.result(other) == "ok"
        host.cancel(rid)
        _expect_cancelled(host, rid)
        if cmd == "asleep":
            assert cleaned.is_set(), "answered only once the coroutine has ended"
        if cmd != "swallow":
            assert cleaned.wait(5), "finally blocks run"
        assert host.call("quick") == "ok"


def test_a_call_waiting_on_the_host_is_cancelled_in_the_serial_profile() -> None:
    with FakeHost(tools=[wait_on_host, quick]) as host:
        rid = host.submit("wait_on_host")
        m = host.recv()  # the host call, left unanswered
        assert m["t"] == "host_call" and m["call"] == rid and m["name"] == "slow"
        host.cancel(rid)
        _expect_cancelled(host, rid)
        # The late answer to the host call is ignored.
        host.send({"t": "host_result", "id": m["id"], "ok": 1})
        assert host.call("quick") == "ok"


def test_a_call_waiting_on_the_host_is_cancelled_in_the_thread_profile() -> None:
    with FakeHost(tools=[wait_on_host, quick], max_in_flight=2) as host:
        rid = host.submit("wait_on_host")
        m = host.recv()
        assert m["t"] == "host_call"
        host.cancel(rid)
        _expect_cancelled(host, rid)
        assert host.call("quick") == "ok"


@pytest.mark.parametrize("threads", [1, 2])
def test_a_cancel_after_the_answer_changes_nothing(threads: int) -> None:
    with FakeHost(tools=[quick], max_in_flight=threads) as host:
        rid = host.submit("quick")
        assert host.result(rid) == "ok"
        host.cancel(rid)
        host.cancel(9999)
        assert host.call("quick") == "ok"


def test_async_cancel_in_the_thread_profile_never_leaves_the_coroutine_running() -> None:
    """A cancel right after the coroutine starts (the race a test run once caught)."""
    with FakeHost(tools=[asleep, quick], max_in_flight=2) as host:
        for _ in range(30):
            started.clear()
            cleaned.clear()
            rid = host.submit("asleep")
            assert started.wait(5)
            host.cancel(rid)
            _expect_cancelled(host, rid)
            assert cleaned.is_set(), "the coroutine was cancelled and had ended before the answer"
        assert host.call("quick") == "ok"


@pytest.mark.parametrize("shutdown", [True, False])
def test_calls_waiting_on_the_host_end_when_it_closes_the_pipe(shutdown: bool) -> None:
    """Thread profile: `shutdown` lets calls finish, but once the pipe is closed no host result
    or credit can come: calls waiting on one are cancelled, and the worker ends."""
    with FakeHost(tools=[wait_on_host, quick], max_in_flight=3, timeout=5) as host:
        host.submit("wait_on_host")
        assert host.recv()["t"] == "host_call"  # left unanswered
        host.close(shutdown=shutdown)  # raises HostTimeout if the worker does not end


def test_a_cancel_during_a_host_call_that_then_succeeds_is_not_lost() -> None:
    """Thread profile: the cancel comes while the call waits on the host (it is only recorded
    then); the host's answer arrives; the call is cancelled as it goes back to its code."""
    with FakeHost(tools=[host_then_spin, quick], max_in_flight=2) as host:
        for _ in range(10):
            rid = host.submit("host_then_spin")
            m = host.recv()
            assert m["t"] == "host_call"
            host.cancel(rid)
            host.send({"t": "host_result", "id": m["id"], "ok": None})
            _expect_cancelled(host, rid)
        assert host.call("quick") == "ok"


def test_a_cancel_that_overtakes_the_start_of_the_call_is_kept() -> None:
    """Thread profile: the cancel is read before a pool thread has taken the call up."""
    with FakeHost(tools=[spin, quick], max_in_flight=2) as host:
        for _ in range(30):
            rid = host.submit("spin")
            host.cancel(rid)
            _expect_cancelled(host, rid)
        assert host.call("quick") == "ok"


def test_a_call_after_shutdown_is_refused_in_the_thread_profile() -> None:
    with FakeHost(tools=[quick], max_in_flight=2) as host:
        host.send({"t": "shutdown"})
        with pytest.raises(WorkerError) as e:
            host.call("quick")
        assert e.value.type_name == "ShuttingDown"


def test_cancelled_is_a_base_exception() -> None:
    assert not issubclass(Cancelled, Exception)
