"""snakepit_bridge: the Python side of snakepit.

A worker script is::

    from snakepit_bridge import tool, serve

    @tool
    def add(a: int, b: int) -> int:
        return a + b

    if __name__ == "__main__":
        serve()

or a ``BaseAdapter`` subclass whose methods are marked ``@tool`` (with an optional ``setup()``
that runs before the worker reports ready; ``self.config`` holds the host's worker config).

The host starts workers through the bootstrap ``python -m snakepit_bridge --script PATH`` (or
``--module NAME``), which moves the protocol off fd 1 before any user code runs, so ``print()``
goes to stderr and can never corrupt a frame. Only the standard library is used.

Results that are not plain JSON (dataclasses, enums, datetimes, UUIDs, decimals, sets, numpy
arrays, pydantic models, ...) are converted by :func:`default_encoder`; teach the bridge your
own types with ``serve(encoder=...)`` or ``BaseAdapter.encode``.

``snakepit_bridge.testing.FakeHost`` runs a worker in-process over a pipe pair, for tests.
"""

from ._core import (
    PROTOCOL_VERSIONS,
    BaseAdapter,
    Cancelled,
    Context,
    Encoder,
    HostCallError,
    Json,
    ToolError,
    default_encoder,
    serve,
    tool,
)
from ._version import __version__

__all__ = [
    "PROTOCOL_VERSIONS",
    "BaseAdapter",
    "Cancelled",
    "Context",
    "Encoder",
    "HostCallError",
    "Json",
    "ToolError",
    "__version__",
    "default_encoder",
    "serve",
    "tool",
]
