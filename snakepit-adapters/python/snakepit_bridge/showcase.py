"""The showcase adapter: small tools for demos, tests and fault injection.

Run with ``python -m snakepit_bridge --module snakepit_bridge.showcase`` (what
``Python::module("snakepit_bridge.showcase")`` does) or ``python -m snakepit_bridge.showcase``.
"""

from __future__ import annotations

import builtins
import os
import struct
import subprocess
import sys
import time
from typing import TYPE_CHECKING

from snakepit_bridge import _core, serve, tool

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Iterator
    from typing import Any, NoReturn

    from snakepit_bridge import Context


@tool
def ping() -> str:
    """Returns "pong"."""
    return "pong"


@tool
def echo(*args: Any, **kwargs: Any) -> Any:
    """Returns its arguments: the keyword object, or the single positional value."""
    if kwargs:
        return kwargs
    if len(args) == 1:
        return args[0]
    return list(args)


@tool
def add(a: int, b: int) -> int:
    """Returns a + b."""
    return a + b


@tool
def sleep(ms: float) -> float:
    """Sleeps `ms` milliseconds, returns `ms`."""
    time.sleep(ms / 1000.0)
    return ms


@tool
def sleep_then_touch(ms: float, path: str, started: str | None = None) -> float:
    """Sleeps `ms` milliseconds; creates `path` when it ends, even if cancelled (finally).

    Creates the file `started` (if given) first, inside the `try`, so a test can tell that a
    cancel reached the tool itself rather than the bridge before the tool ran.
    """
    try:
        if started is not None:
            with open(started, "a"):
                pass
        time.sleep(ms / 1000.0)
    finally:
        with open(path, "a"):
            pass
    return ms


@tool
def stubborn_sleep(ms: float, started: str | None = None) -> float:
    """Sleeps `ms` milliseconds and ignores cancellation (to test the kill after cancel_grace).

    Creates the file `started` (if given) once it runs where a cancel can no longer stop it, so
    a test can wait for that instead of guessing how long the start takes.
    """
    deadline = time.monotonic() + ms / 1000.0
    while True:
        try:
            if started is not None:
                with open(started, "a"):
                    pass
                started = None
            left = deadline - time.monotonic()
            if left <= 0:
                return ms
            time.sleep(left)
        except BaseException:
            continue


@tool
def cpu(n: int) -> int:
    """CPU-bound work: counts the primes below `n`."""
    n = int(n)
    if n < 3:
        return 0 if n < 2 else 0
    sieve = bytearray([1]) * n
    sieve[0] = sieve[1] = 0
    i = 2
    while i * i < n:
        if sieve[i]:
            sieve[i * i :: i] = bytearray(len(range(i * i, n, i)))
        i += 1
    return sum(sieve)


@tool
def fail(type: str = "ValueError", message: str = "boom") -> NoReturn:
    """Raises an exception of the given builtin type name (or a new class of that name)."""
    cls = getattr(builtins, type, None)
    if not (isinstance(cls, builtins.type) and issubclass(cls, Exception)):
        cls = builtins.type(type, (Exception,), {})
    raise cls(message)


@tool
def crash(code: int = 1) -> NoReturn:
    """Exits the worker process at once with `code` (no reply is sent)."""
    sys.stderr.write("showcase: crashing with exit code %d\n" % code)
    sys.stderr.flush()
    os._exit(code)


@tool
def print_stdout(text: str = "hello from print") -> int:
    """Prints `text` to stdout (which the bridge points at stderr); returns its length."""
    print(text)
    return len(text)


@tool
def garbage(kind: str = "text") -> str:
    """Writes raw bytes to the real protocol fd, breaking the stream on purpose.

    kind: "text" (not a frame at all), "json" (a frame whose body is not JSON), "partial" (a
    header announcing 100 bytes followed by 10), "oversize" (a header announcing 1 GiB).
    """
    fd = _core.protocol_fd()
    if kind == "json":
        data = struct.pack(">I", 9) + b"not json!"
    elif kind == "partial":
        data = struct.pack(">I", 100) + b"0123456789"
    elif kind == "oversize":
        data = struct.pack(">I", 1 << 30) + b"xxxx"
    else:
        data = b"this is not a frame\n"
    os.write(fd, data)
    return kind


_HOARD: list[bytearray] = []


@tool
def leak(mb: int) -> int:
    """Allocates and keeps `mb` MiB (touched, so it is resident); returns the total held."""
    _HOARD.append(bytearray(b"x" * (int(mb) << 20)))
    return sum(len(b) for b in _HOARD) >> 20


@tool
def big(bytes: int) -> str:
    """Returns a string of `bytes` characters."""
    return "x" * int(bytes)


@tool
def pid() -> int:
    """Returns the worker's process id."""
    return os.getpid()


@tool
def env(name: str) -> str | None:
    """Returns the environment variable `name` (or None)."""
    return os.environ.get(name)


@tool
def info() -> dict[str, Any]:
    """Returns facts about the worker: pid, interpreter, cwd, argv."""
    return {"pid": os.getpid(), "executable": sys.executable, "cwd": os.getcwd(), "argv": sys.argv}


@tool
def grandchild(setsid: bool = False) -> int:
    """Starts a child process that ignores SIGTERM and SIGHUP (and leaves the worker's process
    group and session if `setsid`), then returns its pid. For orphan tests."""
    code = (
        "import os, signal, threading\n"
        "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
        "signal.signal(signal.SIGHUP, signal.SIG_IGN)\n"
        + ("os.setsid()\n" if setsid else "")
        + "threading.Event().wait()\n"
    )
    p = subprocess.Popen(
        [sys.executable, "-c", code],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    return p.pid


@tool
def count(n: int, size: int = 0, path: str | None = None) -> Iterator[dict[str, int | str]]:
    """Yields {"i": i} for i in 0..n (with a `size`-character "pad" when given); when the
    stream ends or is cancelled, creates `path` (a finally block) if given."""
    pad = "x" * int(size)
    try:
        for i in range(int(n)):
            yield {"i": i, "pad": pad} if size else {"i": i}
    finally:
        if path:
            with open(path, "a"):
                pass


@tool
async def acount(n: int) -> AsyncIterator[int]:
    """An async generator: yields 0..n, awaiting between items."""
    import asyncio

    for i in range(int(n)):
        await asyncio.sleep(0)
        yield i


@tool
async def asleep(ms: float) -> float:
    """An async tool: awaits `ms` milliseconds, returns `ms`."""
    import asyncio

    await asyncio.sleep(ms / 1000.0)
    return ms


@tool
def spin(seconds: float) -> int:
    """Busy Python loop for `seconds` (cancellable at any bytecode); returns iterations."""
    deadline = time.monotonic() + seconds
    n = 0
    while time.monotonic() < deadline:
        n += 1
    return n


@tool
async def adouble(x: float) -> float:
    """An async tool: returns 2 * x."""
    return 2 * x


@tool
def fail_after(n: int) -> Iterator[int]:
    """Yields 0..n, then raises ValueError."""
    for i in range(int(n)):
        yield i
    raise ValueError("failed after %d items" % n)


@tool
def ask_host(name: str, args: Any = None, ctx: Context | None = None) -> dict[str, Any]:
    """Calls the host tool `name` with `args` and returns its answer (or the error it raised,
    as {"error": type, "message": ...})."""
    from snakepit_bridge import HostCallError

    if ctx is None:
        raise TypeError("ask_host needs the ctx the bridge passes")

    try:
        return {"ok": ctx.call_host(name, args)}
    except HostCallError as e:
        return {"error": e.type_name, "message": str(e)}


@tool
def remember(name: str, value: Any, ctx: Context | None = None) -> Any:
    """Stores a session variable through the host; returns what a read gives back."""
    if ctx is None:
        raise TypeError("remember needs the ctx the bridge passes")
    if ctx.session is None:
        raise AttributeError("remember needs a session: call it in one")
    ctx.session.set(name, value)
    return ctx.session.get(name)


@tool
def recall(name: str, ctx: Context | None = None) -> Any:
    """Reads a session variable through the host (None without a session)."""
    if ctx is None:
        raise TypeError("recall needs the ctx the bridge passes")
    return ctx.session.get(name) if ctx.session is not None else None


@tool
def touch(path: str) -> str:
    """Creates the file `path` (lets tests observe that a call ran)."""
    with open(path, "a"):
        pass
    return path


_journal: list[Any] = []


@tool
def journal(entry: Any = None) -> list[Any]:
    """Appends `entry` (when given) to this worker's journal and returns the journal: lets
    tests see the order the worker ran calls in."""
    if entry is not None:
        _journal.append(entry)
    return _journal


@tool
def wait_for(path: str, timeout_ms: float = 30000) -> bool:
    """Holds the worker until the file `path` exists (a test's gate) or `timeout_ms` passes;
    returns whether the file appeared."""
    deadline = time.monotonic() + timeout_ms / 1000.0
    while not os.path.exists(path):
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.002)
    return True


if __name__ == "__main__":
    serve()
