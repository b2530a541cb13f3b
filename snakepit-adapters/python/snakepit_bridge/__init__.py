"""snakepit_bridge: the Python side of snakepit.

A worker script is::

    from snakepit_bridge import tool, serve

    @tool
    def add(a, b):
        return a + b

    if __name__ == "__main__":
        serve()

or a ``BaseAdapter`` subclass whose methods are marked ``@tool`` (with an optional ``setup()``
that runs before the worker reports ready; ``self.config`` holds the host's worker config).

The host starts workers through the bootstrap ``python -m snakepit_bridge --script PATH`` (or
``--module NAME``), which moves the protocol off fd 1 before any user code runs, so ``print()``
goes to stderr and can never corrupt a frame. Only the standard library is used.
"""

from ._core import BaseAdapter, Cancelled, Context, HostCallError, ToolError, serve, tool

__all__ = ["BaseAdapter", "Cancelled", "Context", "HostCallError", "ToolError", "serve", "tool"]
__version__ = "0.1.0"
