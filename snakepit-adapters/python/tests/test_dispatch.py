"""Dispatch: argument forms, ``ctx``, worker errors with their traceback, unknown commands,
results that are not JSON (NaN, cycles), oversized results, pings and bad input from the host."""

from __future__ import annotations

import math
from typing import Any

import pytest

from snakepit_bridge import Context, ToolError, tool
from snakepit_bridge.testing import FakeHost, WorkerError, WorkerExited


@tool
def echo(*args: Any, **kwargs: Any) -> dict[str, Any]:
    return {"args": list(args), "kwargs": kwargs}


@tool
def whoami(ctx: Context, tag: str = "") -> dict[str, Any]:
    return {"id": ctx.request_id, "session": ctx.session.id if ctx.session else None, "tag": tag}


@tool
def boom(kind: str) -> None:
    if kind == "tool":
        raise ToolError("bad input: x must be positive", "InvalidInput")
    if kind == "key":
        raise KeyError("missing")
    raise RuntimeError("it broke")


@tool
def produce(what: str) -> Any:
    if what == "nan":
        return {"x": [1.0, math.nan]}
    if what == "inf":
        return -math.inf
    if what == "cycle":
        a: list[Any] = []
        a.append(a)
        return a
    if what == "object":
        return object()
    if what == "bytes":
        return b"\x00\x01"
    if what == "big":
        return "x" * 5000
    return None


def test_args_are_passed_by_their_json_shape() -> None:
    with FakeHost(tools=[echo]) as host:
        assert host.call("echo", {"a": 1}) == {"args": [], "kwargs": {"a": 1}}
        assert host.call("echo", [1, "two"]) == {"args": [1, "two"], "kwargs": {}}
        assert host.call("echo", "one") == {"args": ["one"], "kwargs": {}}
        assert host.call("echo", None) == {"args": [], "kwargs": {}}
        assert host.call("echo", {"s": "\u00e9\u4e2d\U0001f40d"})["kwargs"]["s"] == "\u00e9\u4e2d\U0001f40d"


def test_a_ctx_parameter_receives_the_call_and_its_session() -> None:
    with FakeHost(tools=[whoami]) as host:
        rid = host.submit("whoami", {"tag": "t"}, session="s1")
        assert host.result(rid) == {"id": rid, "session": "s1", "tag": "t"}
        assert host.call("whoami", ["p"])["session"] is None


@pytest.mark.parametrize("threads", [1, 4])
def test_tool_errors_carry_type_message_and_traceback(threads: int) -> None:
    with FakeHost(tools=[boom], max_in_flight=threads) as host:
        with pytest.raises(WorkerError) as e:
            host.call("boom", ["tool"])
        assert e.value.type_name == "InvalidInput"
        assert e.value.message == "bad input: x must be positive"
        with pytest.raises(WorkerError) as e:
            host.call("boom", ["other"])
        assert e.value.type_name == "RuntimeError" and e.value.message == "it broke"
        assert e.value.traceback is not None
        assert 'raise RuntimeError("it broke")' in e.value.traceback
        assert "in boom" in e.value.traceback
        with pytest.raises(WorkerError) as e:
            host.call("boom", {"wrong_arg": 1})
        assert e.value.type_name == "TypeError" and "wrong_arg" in e.value.message
        host.ping()  # the worker lives on


def test_unknown_commands_are_a_typed_error() -> None:
    with FakeHost(tools=[echo]) as host:
        with pytest.raises(WorkerError) as e:
            host.call("nope", {})
        assert e.value.type_name == "UnknownCommand" and "'nope'" in e.value.message
        rid = host.submit(123, {})  # type: ignore[arg-type]  # not a string: still just unknown
        with pytest.raises(WorkerError, match="UnknownCommand"):
            host.result(rid)


@pytest.mark.parametrize(
    "what, detail",
    [
        ("nan", "Out of range float values are not JSON compliant"),
        ("inf", "Out of range float values are not JSON compliant"),
        ("cycle", "reference cycle"),
        ("object", "Object of type object is not JSON serializable"),
        ("bytes", "bytes are not JSON"),
    ],
)
def test_results_that_are_not_json_are_a_typed_error(what: str, detail: str) -> None:
    with FakeHost(tools=[produce], segments=False) as host:  # with segments, bytes are fine
        with pytest.raises(WorkerError) as e:
            host.call("produce", [what])
        assert e.value.type_name == "TypeError"
        assert e.value.message.startswith("result is not JSON-serialisable")
        assert detail in e.value.message
        assert host.call("produce", ["none"]) is None, "the worker goes on"


def test_a_result_over_max_frame_is_frame_too_large() -> None:
    with FakeHost(tools=[produce], max_frame=1024) as host:
        with pytest.raises(WorkerError) as e:
            host.call("produce", ["big"])
        assert e.value.type_name == "FrameTooLarge" and "max_frame 1024" in e.value.message
        assert host.call("produce", ["none"]) is None


def test_pings_are_answered_between_calls() -> None:
    with FakeHost(tools=[echo]) as host:
        for i in range(3):
            host.ping(i)


def test_unknown_message_types_are_ignored() -> None:
    with FakeHost(tools=[echo]) as host:
        host.send({"t": "from_the_future", "id": 1})
        assert host.call("echo", [1])["args"] == [1]


@pytest.mark.parametrize(
    "body, reason",
    [
        (b"not json", "malformed message from host"),
        (b"[1,2]", "not a JSON object"),
        (b'{"id":1}', "not a JSON object with a string `t`"),
        (b"\xff\xfe", "malformed message from host"),
    ],
)
def test_a_malformed_frame_from_the_host_ends_the_bridge_with_a_protocol_error(body: bytes, reason: str) -> None:
    from snakepit_bridge._core import ProtocolError

    host = FakeHost(tools=[echo])
    with pytest.raises(ProtocolError, match=reason):
        with host:
            host.send(body)
            host.recv()


def test_an_oversized_frame_header_from_the_host_is_a_protocol_error() -> None:
    from snakepit_bridge._core import ProtocolError

    with pytest.raises(ProtocolError, match="exceeds max_frame"):
        with FakeHost(tools=[echo], max_frame=1 << 20) as host:
            host.send_raw((1 << 30).to_bytes(4, "big"))
            host.recv()


@pytest.mark.parametrize(
    "hello",
    [
        {"t": "call", "id": 1},
        {"t": "hello", "versions": "1"},
        {"t": "hello", "versions": [1], "max_frame": "big"},
        {"t": "hello", "versions": [1], "max_in_flight": -1},
        {"t": "hello", "versions": [1], "transport": ["grpc"]},
    ],
)
def test_a_bad_hello_is_a_protocol_error(hello: dict[str, Any]) -> None:
    import os
    import threading

    from snakepit_bridge import _core

    r, w = os.pipe()
    r2, w2 = os.pipe()
    errors: list[BaseException] = []

    def run() -> None:
        try:
            _core._serve(_core._Channel(r, w2), None, None, tools={}, watch_parent=False)
        except BaseException as e:
            errors.append(e)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    body = _core._dumps(hello)
    os.write(w, len(body).to_bytes(4, "big") + body)
    t.join(10)
    for fd in (r, w, r2, w2):
        os.close(fd)
    assert not t.is_alive()
    assert len(errors) == 1 and isinstance(errors[0], _core.ProtocolError), errors


def test_eof_ends_the_bridge_quietly_before_hello_and_after_shutdown() -> None:
    import os

    from snakepit_bridge import _core

    r, w = os.pipe()
    r2, w2 = os.pipe()
    os.close(w)  # the host is gone before it said hello
    _core._serve(_core._Channel(r, w2), None, None, tools={}, watch_parent=False)
    os.close(w2)
    assert os.read(r2, 10) == b"", "nothing was written"
    os.close(r)
    os.close(r2)
    with pytest.raises(WorkerExited):
        with FakeHost(tools=[echo], timeout=5) as h:
            h.send({"t": "shutdown"})
            h.recv()


@tool
def big(n: int, pad: str = "") -> str:
    return "x" * n


def test_large_frames_both_ways_do_not_deadlock_the_pipes() -> None:
    """The worker blocks writing a 1 MiB result while the host writes 1 MiB of arguments:
    FakeHost reads while it writes, as the real host does."""
    with FakeHost(tools=[big], timeout=10) as host:
        a = host.submit("big", [1 << 20])
        b = host.submit("big", [3, "y" * (1 << 20)])
        assert len(host.result(a)) == 1 << 20
        assert host.result(b) == "xxx"


def test_close_reads_a_large_answer_the_worker_is_still_writing() -> None:
    with FakeHost(tools=[big], timeout=10) as host:
        host.submit("big", [4 << 20])  # never read by the test
