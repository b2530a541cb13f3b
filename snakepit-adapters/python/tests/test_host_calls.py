"""Host calls from tools (``ctx.call_host``) and session variables (``ctx.session``)."""

from __future__ import annotations

from typing import Any

import pytest

from snakepit_bridge import Context, HostCallError, tool
from snakepit_bridge.testing import FakeHost


@tool
def ask(ctx: Context, name: str, args: Any = None) -> Any:
    return ctx.call_host(name, args)


@tool
def ask_safely(ctx: Context, name: str) -> dict[str, Any]:
    try:
        return {"ok": ctx.call_host(name, {})}
    except HostCallError as e:
        return {"type": e.type_name, "message": str(e)}


@tool
def fan_out(ctx: Context, n: int) -> list[Any]:
    return [ctx.call_host("double", {"x": i}) for i in range(n)]


@tool
def counter(ctx: Context) -> int:
    assert ctx.session is not None
    n = int(ctx.session.get("n", 0)) + 1
    ctx.session.set("n", n)
    return n


@tool
def forget(ctx: Context) -> Any:
    assert ctx.session is not None
    return ctx.session.delete("n")


def host_tools() -> dict[str, Any]:
    def fail(_: Any) -> Any:
        raise PermissionError("not allowed")

    return {"double": lambda a: a["x"] * 2, "fail": fail, "echo": lambda a: a}


@pytest.mark.parametrize("threads", [1, 3])
def test_host_calls_return_the_host_tool_result(threads: int) -> None:
    with FakeHost(tools=[ask, fan_out], host_tools=host_tools(), max_in_flight=threads) as host:
        assert host.call("ask", ["double", {"x": 21}]) == 42
        assert host.call("ask", ["echo", {"deep": [1, {"k": None}]}]) == {"deep": [1, {"k": None}]}
        assert host.call("fan_out", [5]) == [0, 2, 4, 6, 8]
        assert host.host_calls[0] == ("double", {"x": 21})


@pytest.mark.parametrize("threads", [1, 3])
def test_a_failed_host_call_raises_host_call_error(threads: int) -> None:
    with FakeHost(tools=[ask_safely], host_tools=host_tools(), max_in_flight=threads) as host:
        assert host.call("ask_safely", ["fail"]) == {"type": "PermissionError", "message": "not allowed"}
        assert host.call("ask_safely", ["missing"]) == {
            "type": "UnknownHostTool",
            "message": "the host has no tool `missing`",
        }


def test_concurrent_calls_make_concurrent_host_calls_in_the_thread_profile() -> None:
    with FakeHost(tools=[fan_out], host_tools=host_tools(), max_in_flight=4) as host:
        ids = [host.submit("fan_out", [3]) for _ in range(8)]
        assert [host.result(i) for i in ids] == [[0, 2, 4]] * 8


@pytest.mark.parametrize("threads", [1, 2])
def test_session_variables_go_through_the_host(threads: int) -> None:
    with FakeHost(tools=[counter, forget], max_in_flight=threads) as host:
        assert [host.call("counter", session="a") for _ in range(3)] == [1, 2, 3]
        assert host.call("counter", session="b") == 1
        assert host.sessions == {"a": {"n": 3}, "b": {"n": 1}}
        assert host.call("forget", session="a") is True
        assert host.sessions["a"] == {}
        assert host.call("counter", session="a") == 1, "a delete is seen at once (no stale cache)"


@tool
def session_op(ctx: Context, op: str, args: Any) -> dict[str, Any]:
    try:
        return {"ok": ctx.call_host(op, args)}
    except HostCallError as e:
        return {"type": e.type_name, "message": str(e)}


def test_session_calls_fail_like_the_hosts() -> None:
    with FakeHost(tools=[session_op], host_tools={"session.get": lambda a: "shadowed"}) as host:
        assert host.call("session_op", ["session.get", {"name": "x"}]) == {
            "type": "NoSession",
            "message": "this call does not run in a session",
        }
        assert host.call("session_op", ["session.get", {}], session="s")["type"] == "BadRequest"
        assert host.call("session_op", ["session.nope", {"name": "x"}], session="s")["type"] == "UnknownHostTool"
        assert host.call("session_op", ["session.get", {"name": "x"}], session="s") == {"ok": None}, (
            "session.* is always the session store, as in the host"
        )


@tool
def visits(ctx: Context) -> Any:
    n = ctx.globals.get("visits", 0) + 1
    ctx.globals.set("visits", n)
    return n


@tool
def reset_visits(ctx: Context) -> Any:
    return ctx.globals.delete("visits")


@pytest.mark.parametrize("threads", [1, 2])
def test_global_variables_go_through_the_host_in_or_out_of_a_session(threads: int) -> None:
    with FakeHost(tools=[visits, reset_visits], max_in_flight=threads) as host:
        assert host.call("visits") == 1
        assert host.call("visits", session="a") == 2, "globals are the same in every session"
        assert host.globals == {"visits": 2}
        host.globals["visits"] = 40  # as the host's pool.globals().set would
        assert host.call("visits") == 41, "read through each time: no cache"
        assert host.call("reset_visits") is True
        assert host.call("reset_visits") is False
        assert ("global.get", {"name": "visits"}) in host.host_calls
