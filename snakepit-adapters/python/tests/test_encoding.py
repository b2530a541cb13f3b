"""Results users expect to return: converted by ``default_encoder``, the adapter's ``encode()``
and ``serve(encoder=...)``; what none converts is a typed error naming the type."""

from __future__ import annotations

import dataclasses
import datetime as dt
import decimal
import enum
import math
import pathlib
import types
import uuid
from typing import Any

import numpy as np
import pydantic
import pytest

from snakepit_bridge import BaseAdapter, default_encoder, tool
from snakepit_bridge.testing import FakeHost, WorkerError


class Color(enum.Enum):
    RED = "red"
    GREEN = 2


@dataclasses.dataclass
class Point:
    x: float
    y: float
    when: dt.date
    tags: frozenset[str] = frozenset()


class User(pydantic.BaseModel):
    name: str
    joined: dt.datetime
    id: uuid.UUID


class Money:
    def __init__(self, cents: int) -> None:
        self.cents = cents


UID = uuid.UUID("12345678-1234-5678-1234-567812345678")
WHEN = dt.datetime(2026, 11, 30, 15, 4, 5, 123000, tzinfo=dt.timezone.utc)

VALUES: dict[str, tuple[Any, Any]] = {
    "dataclass": (
        Point(1.5, -2, dt.date(2026, 1, 2), frozenset({"b", "a"})),
        {"x": 1.5, "y": -2, "when": "2026-01-02", "tags": ["a", "b"]},
    ),
    "enum": ([Color.RED, Color.GREEN], ["red", 2]),
    "datetime": (WHEN, "2026-11-30T15:04:05.123000+00:00"),
    "naive datetime": (dt.datetime(2026, 1, 2, 3, 4), "2026-01-02T03:04:00"),
    "date": (dt.date(2026, 2, 28), "2026-02-28"),
    "time": (dt.time(23, 59, 1), "23:59:01"),
    "timedelta": (dt.timedelta(minutes=1, milliseconds=500), 60.5),
    "uuid": (UID, "12345678-1234-5678-1234-567812345678"),
    "decimal": (decimal.Decimal("3.14159265358979323846264338327950288"), "3.14159265358979323846264338327950288"),
    "set": ({3, 1, 2}, [1, 2, 3]),
    "unsortable set": ({1, "a"}, None),
    "tuple": ((1, (2, "x")), [1, [2, "x"]]),
    "numpy int": (np.int64(7), 7),
    "numpy float": (np.float32(0.5), 0.5),
    "numpy bool": (np.bool_(True), True),
    "numpy array": (np.arange(6, dtype=np.int32).reshape(2, 3), [[0, 1, 2], [3, 4, 5]]),
    "numpy float array": (np.array([0.25, 1.5]), [0.25, 1.5]),
    "pydantic": (
        User(name="ada", joined=WHEN, id=UID),
        {"name": "ada", "joined": "2026-11-30T15:04:05.123000Z", "id": str(UID)},
    ),
    "path": (pathlib.PurePosixPath("/tmp/x.csv"), "/tmp/x.csv"),
    "mapping": (types.MappingProxyType({"k": 1}), {"k": 1}),
    "nested": ({"points": [Point(0, 0, dt.date(2000, 1, 1))]}, {"points": [{"x": 0, "y": 0, "when": "2000-01-01", "tags": []}]}),
}


@tool
def give(name: str) -> Any:
    return VALUES[name][0]


@pytest.mark.parametrize("name", sorted(VALUES))
def test_common_types_are_encoded(name: str) -> None:
    # Without binary segments: numpy arrays as lists (test_binary.py has them as segments).
    with FakeHost(tools=[give], segments=False) as host:
        got = host.call("give", [name])
    want = VALUES[name][1]
    if name == "unsortable set":
        assert sorted(map(str, got)) == ["1", "a"]
    else:
        assert got == want


@pytest.mark.parametrize("name", ["dataclass", "numpy array", "pydantic", "datetime"])
def test_encoded_types_stream_too(name: str) -> None:
    @tool
    def gen() -> Any:
        yield VALUES[name][0]

    with FakeHost(tools=[gen], max_in_flight=2, segments=False) as host:
        assert list(host.stream("gen")) == [VALUES[name][1]]


def test_nan_inside_a_numpy_array_is_still_refused() -> None:
    @tool
    def nan_array() -> Any:
        return np.array([1.0, math.nan])

    with FakeHost(tools=[nan_array], segments=False) as host:  # as a segment, NaN is just bytes
        with pytest.raises(WorkerError) as e:
            host.call("nan_array")
    assert e.value.type_name == "TypeError" and "Out of range float" in e.value.message


@tool
def money() -> Any:
    return {"price": Money(1999), "when": WHEN}


def test_an_unknown_type_is_a_typed_error_naming_it() -> None:
    with FakeHost(tools=[money]) as host:
        with pytest.raises(WorkerError) as e:
            host.call("money")
    assert e.value.type_name == "TypeError"
    assert "Object of type %s.Money is not JSON serializable" % __name__ in e.value.message
    assert "serve(encoder=...)" in e.value.message


def encode_money(obj: Any) -> Any:
    if isinstance(obj, Money):
        return {"cents": obj.cents, "currency": "EUR"}
    if isinstance(obj, dt.datetime):
        return obj.timestamp()  # overrides the built-in ISO 8601
    return NotImplemented


def test_serve_encoder_comes_before_the_built_in_conversions() -> None:
    with FakeHost(tools=[money], encoder=encode_money) as host:
        assert host.call("money") == {"price": {"cents": 1999, "currency": "EUR"}, "when": WHEN.timestamp()}


class Shop(BaseAdapter):
    def encode(self, obj: Any) -> Any:
        if isinstance(obj, Money):
            return "%d.%02d" % divmod(obj.cents, 100)
        return NotImplemented

    @tool
    def price(self) -> Any:
        return {"price": Money(1999), "when": WHEN}


def test_the_adapter_encode_comes_first() -> None:
    with FakeHost(Shop, tools=[], encoder=encode_money) as host:
        assert host.call("price") == {"price": "19.99", "when": WHEN.timestamp()}
    with FakeHost(Shop, tools=[]) as host:
        assert host.call("price") == {"price": "19.99", "when": "2026-11-30T15:04:05.123000+00:00"}


def test_an_encoder_that_raises_is_a_worker_error_and_the_worker_goes_on() -> None:
    def broken(obj: Any) -> Any:
        raise ValueError("encoder bug")

    with FakeHost(tools=[money], encoder=broken) as host:
        with pytest.raises(WorkerError) as e:
            host.call("money")
        assert e.value.type_name == "TypeError" and "encoder bug" in e.value.message
        host.ping()


def test_an_encoder_hook_applies_to_host_call_arguments_too() -> None:
    from snakepit_bridge import Context

    @tool
    def send_money(ctx: Context) -> Any:
        return ctx.call_host("echo", {"m": Money(5)})

    with FakeHost(tools=[send_money], encoder=encode_money, host_tools={"echo": lambda a: a}) as host:
        assert host.call("send_money") == {"m": {"cents": 5, "currency": "EUR"}}


def test_default_encoder_passes_what_it_does_not_know() -> None:
    assert default_encoder(Money(1)) is NotImplemented
    assert default_encoder(b"x") is NotImplemented
    assert default_encoder(Color.GREEN) == 2


def test_the_encoder_is_reset_when_the_worker_ends() -> None:
    with FakeHost(tools=[money], encoder=encode_money) as host:
        host.call("money")
    with FakeHost(tools=[money]) as host:
        with pytest.raises(WorkerError):
            host.call("money")
