"""Shared fixtures: the bridge's tool registry is restored after each test, so tools a test
defines (``@tool`` inside a test function registers it, as at module level) do not leak."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from snakepit_bridge import _core


@pytest.fixture(autouse=True)
def _restore_tool_registry() -> Iterator[None]:
    saved = dict(_core._TOOLS)
    yield
    _core._TOOLS.clear()
    _core._TOOLS.update(saved)
