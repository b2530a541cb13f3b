"""The bridge's JSON codec gives the same results with orjson installed and without it (the
suite runs in both modes: `cargo xtask py` sets SNAKEPIT_BRIDGE_ORJSON=0 for the second run)."""

from __future__ import annotations

import datetime
import enum
import json
import os
import uuid

import pytest

from snakepit_bridge import _core


class Color(enum.Enum):
    RED = "red"


def roundtrip(value: object) -> object:
    return json.loads(_core._dumps(value))


def test_the_mode_is_the_one_asked_for() -> None:
    wanted = os.environ.get("SNAKEPIT_BRIDGE_ORJSON", "1") != "0"
    try:
        import orjson  # noqa: F401

        installed = True
    except ImportError:
        installed = False
    _core._loads(b"1")  # the codec is chosen at the first message
    assert (_core._orjson is not None) == (wanted and installed)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), {"a": [1, float("-inf")]}])
def test_nan_and_infinities_are_refused(bad: object) -> None:
    with pytest.raises(ValueError):
        _core._dumps(bad)


def test_values_orjson_refuses_or_writes_otherwise_come_out_as_with_the_stdlib() -> None:
    big = 2**70
    assert roundtrip({"n": big, "neg": -(2**65)}) == {"n": big, "neg": -(2**65)}
    assert roundtrip({1: "a", None: "b", 2.5: "c"}) == {"1": "a", "null": "b", "2.5": "c"}
    assert roundtrip({"none": None, "list": [None, 1]}) == {"none": None, "list": [None, 1]}
    when = datetime.datetime(2026, 1, 2, 3, 4, 5, 6)
    assert roundtrip({"t": when, "d": when.date()}) == {"t": when.isoformat(), "d": "2026-01-02"}
    u = uuid.UUID(int=7)
    assert roundtrip([Color.RED, u, (1, 2)]) == ["red", str(u), [1, 2]]
    assert roundtrip([1e-07, 1e16, 0.1, -0.0]) == [1e-07, 1e16, 0.1, -0.0]
    assert _core._loads(b'{"a":NaN,"b":123456789012345678901234567890}')["b"] == 123456789012345678901234567890
    with pytest.raises(ValueError):
        _core._loads(b'{"a":')


def test_encoder_hooks_are_asked_first_whatever_the_codec() -> None:
    _core._hooks.append(lambda o: o.name if isinstance(o, Color) else NotImplemented)
    try:
        assert roundtrip({"c": Color.RED}) == {"c": "RED"}
    finally:
        del _core._hooks[:]


def test_binary_values_become_one_segment_each_whatever_the_codec() -> None:
    _core._segments_on[0] = True
    try:
        body, segs = _core._dumps_segments({"a": b"xyz", "b": None, "c": [bytearray(b"12")]})
    finally:
        _core._segments_on[0] = False
    assert json.loads(body) == {"a": {"$seg": 0}, "b": None, "c": [{"$seg": 1}]}
    assert [bytes(s) for s in segs] == [b"xyz", b"12"]
