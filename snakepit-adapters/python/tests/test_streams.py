"""Streams: chunks within the host's credit, sync and async generators, plain tools called as
streams, errors mid-stream, and the generator's ``finally`` on cancel."""

from __future__ import annotations

import threading
import time
from collections.abc import AsyncIterator, Iterator

import pytest

from snakepit_bridge import tool
from snakepit_bridge.testing import FakeHost, ProtocolViolation, WorkerError

produced: list[int] = []
closed = threading.Event()


@tool
def count(n: int) -> Iterator[int]:
    try:
        for i in range(n):
            produced.append(i)
            yield i
    finally:
        closed.set()


@tool
async def acount(n: int) -> AsyncIterator[int]:
    for i in range(n):
        yield i


@tool
def fails_at(n: int) -> Iterator[int]:
    for i in range(n):
        yield i
    raise ValueError("ran dry at %d" % n)


@tool
def plain() -> list[int]:
    return [1, 2]


@pytest.mark.parametrize("threads", [1, 2])
def test_a_stream_yields_every_chunk_then_ends(threads: int) -> None:
    with FakeHost(tools=[count, acount], max_in_flight=threads) as host:
        assert list(host.stream("count", [5], window=2)) == [0, 1, 2, 3, 4]
        assert list(host.stream("acount", [4], window=1)) == [0, 1, 2, 3]
        assert list(host.stream("count", [0])) == []


@pytest.mark.parametrize("threads", [1, 2])
def test_the_worker_never_runs_ahead_of_its_credit(threads: int) -> None:
    produced.clear()
    with FakeHost(tools=[count], max_in_flight=threads) as host:
        rid = host.submit("count", [100], stream=3)
        assert [host.reply(rid)["data"] for _ in range(3)] == [0, 1, 2]
        # The window is used up: the worker computes the next item, then waits for credit. (A
        # chunk sent beyond the credit fails the test: FakeHost counts them.)
        deadline = time.monotonic() + 5
        while len(produced) < 4 and time.monotonic() < deadline:
            host.ping()  # answered while the stream waits (by the reader thread, or in the wait)
        assert produced == [0, 1, 2, 3], "one item computed ahead, never more"
        host.grant(rid, 2)
        assert [host.reply(rid)["data"] for _ in range(2)] == [3, 4]
        host.cancel(rid)
        m = host.reply(rid)
        assert m["t"] == "error" and m["error"]["type"] == "Cancelled"


def test_a_chunk_beyond_the_credit_is_caught_by_the_fake_host() -> None:
    with FakeHost(tools=[count]) as host:
        rid = host.submit("count", [3], stream=1)
        assert host.reply(rid)["data"] == 0
        host.send({"t": "credit", "id": rid, "n": 5})  # granted behind FakeHost's back
        with pytest.raises(ProtocolViolation, match="beyond the credit"):
            host.reply(rid)


def test_a_stream_called_without_credit_is_collected_into_one_result() -> None:
    with FakeHost(tools=[count, acount]) as host:
        assert host.call("count", [3]) == [0, 1, 2]
        assert host.call("acount", [2]) == [0, 1]


def test_a_plain_tool_called_as_a_stream_is_one_chunk() -> None:
    with FakeHost(tools=[plain]) as host:
        assert list(host.stream("plain")) == [[1, 2]]


@pytest.mark.parametrize("threads", [1, 2])
def test_an_error_mid_stream_ends_it_with_the_error(threads: int) -> None:
    with FakeHost(tools=[fails_at], max_in_flight=threads) as host:
        got = []
        with pytest.raises(WorkerError) as e:
            for item in host.stream("fails_at", [3], window=8):
                got.append(item)
        assert got == [0, 1, 2]
        assert e.value.type_name == "ValueError" and e.value.message == "ran dry at 3"


@pytest.mark.parametrize("threads", [1, 2])
def test_cancel_closes_the_generator_so_its_finally_runs(threads: int) -> None:
    closed.clear()
    with FakeHost(tools=[count], max_in_flight=threads) as host:
        rid = host.submit("count", [1000], stream=1)
        assert host.reply(rid)["data"] == 0
        host.cancel(rid)  # the worker waits for credit: the cancel reaches it there
        m = host.reply(rid)
        assert m["t"] == "error" and m["error"]["type"] == "Cancelled"
        assert closed.wait(5), "the generator's finally block ran"
        host.ping()
        assert list(host.stream("count", [2])) == [0, 1], "the worker goes on"


def test_streams_interleave_in_the_thread_profile() -> None:
    with FakeHost(tools=[count], max_in_flight=4) as host:
        a = host.submit("count", [3], stream=1)
        b = host.submit("count", [3], stream=1)
        assert list(host.chunks(b)) == [0, 1, 2]
        assert list(host.chunks(a)) == [0, 1, 2]
