"""Binary segments: bytes, buffers and numpy arrays travel beside the JSON, without a copy into
it; only when both sides agreed in the handshake."""

from __future__ import annotations

import array
from typing import Any

import numpy as np
import pytest

from snakepit_bridge import Context, tool
from snakepit_bridge.testing import FakeHost, ProtocolViolation, WorkerError

seen: dict[str, Any] = {}


@tool
def echo(data: Any) -> Any:
    seen["type"] = type(data)
    seen["readonly"] = getattr(data, "readonly", None)
    return data


@tool
def kinds() -> dict[str, Any]:
    return {
        "bytes": b"\x00\x01",
        "bytearray": bytearray(b"ab"),
        "memoryview": memoryview(b"xyz")[1:],
        "array": array.array("h", [1, -1]),
        "empty": b"",
        "text": "plain",
        "n": np.int64(3),
    }


@tool
def matrix(n: int) -> Any:
    return np.arange(n * n, dtype=np.float64).reshape(n, n)


@tool
def transposed() -> Any:
    return np.arange(6, dtype=np.int16).reshape(2, 3).T  # not contiguous: copied once


@tool
def total(a: Any) -> dict[str, Any]:
    seen["array"] = a
    return {"sum": float(a.sum()), "shape": list(a.shape), "writeable": bool(a.flags.writeable)}


@tool
def gen_chunks(n: int) -> Any:
    for i in range(n):
        yield bytes([i]) * (i + 1)


@tool
def via_host(ctx: Context, data: Any) -> Any:
    return ctx.call_host("reverse", {"data": data})


@pytest.mark.parametrize("threads", [1, 3])
def test_bytes_round_trip_as_memoryviews(threads: int) -> None:
    with FakeHost(tools=[echo], max_in_flight=threads) as host:
        assert host.ready["segments"] is True
        for size in [0, 1, 1000, 1 << 20]:
            data = bytes(range(256)) * (size // 256) + bytes(size % 256)
            assert host.call("echo", [data]) == data
            assert seen["type"] is memoryview and seen["readonly"] is True
        assert host.call("echo", {"data": {"nested": [b"\xff"]}}) == {"nested": [b"\xff"]}


def test_every_buffer_kind_is_a_segment() -> None:
    with FakeHost(tools=[kinds]) as host:
        got = host.call("kinds")
    assert got == {
        "bytes": b"\x00\x01",
        "bytearray": b"ab",
        "memoryview": b"yz",
        "array": array.array("h", [1, -1]).tobytes(),
        "empty": b"",
        "text": "plain",
        "n": 3,
    }


def test_numpy_arrays_keep_dtype_and_shape_both_ways() -> None:
    with FakeHost(tools=[matrix, transposed, total]) as host:
        m = host.call("matrix", [3])
        assert isinstance(m, np.ndarray) and m.dtype == np.float64 and m.shape == (3, 3)
        assert m.tolist() == np.arange(9.0).reshape(3, 3).tolist()
        t = host.call("transposed")
        assert t.shape == (3, 2) and t.tolist() == [[0, 3], [1, 4], [2, 5]]
        a = np.linspace(0, 1, 11, dtype=np.float32).reshape(1, 11)
        assert host.call("total", [a]) == {"sum": pytest.approx(5.5), "shape": [1, 11], "writeable": False}
        # Zero copy: the tool's array is a view over the frame the bridge read.
        assert seen["array"].base is not None


def test_segments_stream_and_pass_through_host_calls() -> None:
    with FakeHost(tools=[gen_chunks, via_host], host_tools={"reverse": lambda a: a["data"][::-1]}) as host:
        assert list(host.stream("gen_chunks", [3], window=1)) == [b"\x00", b"\x01\x01", b"\x02\x02\x02"]
        assert host.call("via_host", [b"abc"]) == b"cba"
        assert host.host_calls == [("reverse", {"data": b"abc"})]


def test_without_agreement_bytes_are_refused_as_before() -> None:
    with FakeHost(tools=[kinds, echo], segments=False) as host:
        assert "segments" not in host.ready
        with pytest.raises(WorkerError) as e:
            host.call("kinds")
        assert e.value.type_name == "TypeError" and "bytes" in e.value.message
        assert host.call("echo", ["text"]) == "text"


def test_a_worker_can_refuse_segments(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SNAKEPIT_BRIDGE_SEGMENTS", "0")
    with FakeHost(tools=[echo]) as host:
        assert "segments" not in host.ready
        assert host.call("echo", [[1, 2]]) == [1, 2]


def test_a_reference_to_a_missing_segment_is_a_worker_error() -> None:
    with FakeHost(tools=[echo]) as host:
        rid = host.submit("echo", [b"x"])
        assert host.result(rid) == b"x"
        # By hand: a reference to segment 5 of a frame that carries one.
        import json
        import struct

        body = json.dumps({"t": "call", "id": 99, "cmd": "echo", "args": [{"$seg": 5}], "seg": [1]}).encode()
        frame = struct.pack(">I", (4 + len(body) + 1) | 1 << 31) + struct.pack(">I", len(body)) + body + b"x"
        host.send_raw(frame)
        with pytest.raises(WorkerError) as e:
            host.result(99)
        assert e.value.type_name == "BadSegment"


@pytest.mark.parametrize(
    "table, reason",
    [([2], "runs past the frame"), ([0], "bytes past the segments"), ("x", "valid `seg` table")],
)
def test_a_segment_table_that_does_not_add_up_is_a_protocol_error(table: Any, reason: str) -> None:
    import json
    import struct

    from snakepit_bridge._core import ProtocolError

    body = json.dumps({"t": "call", "id": 1, "cmd": "echo", "args": None, "seg": table}).encode()
    frame = struct.pack(">I", (4 + len(body) + 1) | 1 << 31) + struct.pack(">I", len(body)) + body + b"x"
    with pytest.raises(ProtocolError, match=reason):
        with FakeHost(tools=[echo]) as host:
            host.send_raw(frame)
            host.recv()


def test_a_segmented_frame_without_agreement_is_a_protocol_error() -> None:
    from snakepit_bridge._core import ProtocolError

    with pytest.raises(ProtocolError, match="not agreed"):
        with FakeHost(tools=[echo], segments=False) as host:
            host.send_raw(b"\x80\x00\x00\x05\x00\x00\x00\x01{")
            host.recv()


def test_fake_host_refuses_segments_the_worker_did_not_announce(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SNAKEPIT_BRIDGE_SEGMENTS", "0")
    with FakeHost(tools=[echo]) as host:
        host.ready["segments"] = False
        with pytest.raises(ProtocolViolation):
            host._buf += b"\x80\x00\x00\x05\x00\x00\x00\x01{"
            host.recv()
