"""Tool registration: module-level functions, ``BaseAdapter`` methods, ``setup()``, config,
``teardown()``, the tool list in ``ready``, and version negotiation."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest

from snakepit_bridge import PROTOCOL_VERSIONS, BaseAdapter, __version__, tool
from snakepit_bridge.testing import FakeHost, WorkerError


def test_functions_are_registered_under_their_name_or_the_one_given() -> None:
    @tool
    def add(a: int, b: int) -> int:
        """Adds two numbers.

        Second line."""
        return a + b

    @tool(name="mul")
    def multiply(a: int, b: int) -> int:
        return a * b

    def plain(x: int) -> int:  # not decorated: served when passed in tools=
        return -x

    with FakeHost(tools=[add, multiply, plain]) as host:
        names = [t["name"] for t in host.ready["tools"]]
        assert names == ["add", "mul", "plain"]
        assert host.ready["tools"][0]["doc"] == "Adds two numbers.\n\nSecond line."
        assert host.call("add", {"a": 2, "b": 3}) == 5
        assert host.call("mul", [4, 5]) == 20
        assert host.call("plain", 7) == -7
        with pytest.raises(WorkerError) as e:
            host.call("multiply", [1, 2])
        assert e.value.type_name == "UnknownCommand"


def test_the_module_level_registry_is_served_by_default() -> None:
    @tool
    def registered_here() -> str:
        return "yes"

    with FakeHost() as host:
        assert "registered_here" in [t["name"] for t in host.ready["tools"]]
        assert host.call("registered_here") == "yes"


def test_ready_describes_the_worker() -> None:
    @tool
    def gen(n: int) -> Iterator[int]:
        yield from range(n)

    @tool
    async def agen(n: int) -> AsyncIterator[int]:
        for i in range(n):
            yield i

    @tool
    async def coro() -> int:
        return 1

    with FakeHost(tools=[gen, agen, coro], max_in_flight=3) as host:
        r = host.ready
        assert r["t"] == "ready" and r["version"] == max(PROTOCOL_VERSIONS)
        assert r["max_in_flight"] == 3
        assert r["bridge"].startswith("python/%s " % __version__)
        streams = {t["name"]: t["stream"] for t in r["tools"]}
        assert streams == {"agen": True, "coro": False, "gen": True}


class Model(BaseAdapter):
    """An adapter with state, set up from the host's config."""

    events: list[str] = []

    def setup(self) -> None:
        self.events.append("setup")
        self.scale = self.config["scale"]

    def teardown(self) -> None:
        self.events.append("teardown")

    @tool
    def predict(self, x: float) -> float:
        """Scales x."""
        return x * self.scale

    @tool(name="info")
    def describe(self) -> dict[str, Any]:
        return {"config": self.config}

    def helper(self) -> None:
        """Not a tool."""


def test_adapter_methods_setup_and_config() -> None:
    Model.events = []
    with FakeHost(Model, tools=[], config={"scale": 3}) as host:
        assert [t["name"] for t in host.ready["tools"]] == ["info", "predict"]
        assert Model.events == ["setup"], "setup runs before ready"
        assert host.call("predict", {"x": 2}) == 6
        assert host.call("info") == {"config": {"scale": 3}}
    assert Model.events == ["setup", "teardown"], "teardown runs at shutdown"


def test_an_adapter_instance_and_a_class_found_by_name() -> None:
    Model.events = []
    instance = Model({"scale": 1})
    with FakeHost(instance, tools=[], config={"scale": 5}) as host:
        assert host.call("predict", [1]) == 5, "the host's config replaces the instance's"
    with FakeHost("Model", namespace={"Model": Model}, tools=[], config={"scale": 2}) as host:
        assert host.call("predict", [1]) == 2


def test_the_one_adapter_of_a_namespace_is_found_and_two_are_refused() -> None:
    class A(BaseAdapter):
        @tool
        def a(self) -> str:
            return "a"

    class B(BaseAdapter):
        @tool
        def b(self) -> str:
            return "b"

    with FakeHost(namespace={"__name__": A.__module__, "A": A}, tools=[]) as host:
        assert host.call("a") == "a"
    with pytest.raises(RuntimeError, match="several BaseAdapter subclasses"):
        with FakeHost(namespace={"__name__": A.__module__, "A": A, "B": B}, tools=[], timeout=5):
            pass


def test_a_failing_setup_is_reported_and_no_ready_is_sent() -> None:
    class Broken(BaseAdapter):
        def setup(self) -> None:
            raise ValueError("model file missing")

    with pytest.raises(ValueError, match="model file missing"):
        with FakeHost(Broken, tools=[], timeout=5):
            pass


def test_versions_the_bridge_does_not_speak_are_refused_naming_both_sides() -> None:
    with FakeHost(tools=[], versions=[99, 98]) as host:
        r = host.ready
        assert r["t"] == "refuse"
        assert r["versions"] == list(PROTOCOL_VERSIONS)
        assert "snakepit_bridge %s" % __version__ in r["reason"]
        assert "[99, 98]" in r["reason"] and str(list(PROTOCOL_VERSIONS)) in r["reason"]
        assert r["bridge"].startswith("python/")


def test_the_highest_common_version_is_chosen() -> None:
    with FakeHost(tools=[], versions=[7, 1]) as host:
        assert host.ready["version"] == 1


def test_one_in_process_host_at_a_time() -> None:
    with FakeHost(tools=[]):
        with pytest.raises(RuntimeError, match="one in-process FakeHost"):
            FakeHost(tools=[]).start()
    with FakeHost(tools=[]) as again:  # the first one's close released it
        again.ping()
