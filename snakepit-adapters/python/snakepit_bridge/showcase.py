"""The showcase adapter: small tools for demos, tests and fault injection.

Run with ``python -m snakepit_bridge --module snakepit_bridge.showcase`` (what
``Python::module("snakepit_bridge.showcase")`` does) or ``python -m snakepit_bridge.showcase``.
"""

import builtins
import os
import struct
import subprocess
import sys
import time

from snakepit_bridge import _core, serve, tool


@tool
def ping():
    """Returns "pong"."""
    return "pong"


@tool
def echo(*args, **kwargs):
    """Returns its arguments: the keyword object, or the single positional value."""
    if kwargs:
        return kwargs
    if len(args) == 1:
        return args[0]
    return list(args)


@tool
def add(a, b):
    """Returns a + b."""
    return a + b


@tool
def sleep(ms):
    """Sleeps `ms` milliseconds, returns `ms`."""
    time.sleep(ms / 1000.0)
    return ms


@tool
def sleep_then_touch(ms, path, started=None):
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
def stubborn_sleep(ms, started=None):
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
def cpu(n):
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
def fail(type="ValueError", message="boom"):
    """Raises an exception of the given builtin type name (or a new class of that name)."""
    cls = getattr(builtins, type, None)
    if not (isinstance(cls, builtins.type) and issubclass(cls, Exception)):
        cls = builtins.type(type, (Exception,), {})
    raise cls(message)


@tool
def crash(code=1):
    """Exits the worker process at once with `code` (no reply is sent)."""
    sys.stderr.write("showcase: crashing with exit code %d\n" % code)
    sys.stderr.flush()
    os._exit(code)


@tool
def print_stdout(text="hello from print"):
    """Prints `text` to stdout (which the bridge points at stderr); returns its length."""
    print(text)
    return len(text)


@tool
def garbage(kind="text"):
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


_HOARD = []


@tool
def leak(mb):
    """Allocates and keeps `mb` MiB (touched, so it is resident); returns the total held."""
    _HOARD.append(bytearray(b"x" * (int(mb) << 20)))
    return sum(len(b) for b in _HOARD) >> 20


@tool
def big(bytes):
    """Returns a string of `bytes` characters."""
    return "x" * int(bytes)


@tool
def pid():
    """Returns the worker's process id."""
    return os.getpid()


@tool
def env(name):
    """Returns the environment variable `name` (or None)."""
    return os.environ.get(name)


@tool
def info():
    """Returns facts about the worker: pid, interpreter, cwd, argv."""
    return {"pid": os.getpid(), "executable": sys.executable, "cwd": os.getcwd(), "argv": sys.argv}


@tool
def grandchild(setsid=False):
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
def count(n, size=0, path=None):
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
async def acount(n):
    """An async generator: yields 0..n, awaiting between items."""
    import asyncio

    for i in range(int(n)):
        await asyncio.sleep(0)
        yield i


@tool
async def asleep(ms):
    """An async tool: awaits `ms` milliseconds, returns `ms`."""
    import asyncio

    await asyncio.sleep(ms / 1000.0)
    return ms


@tool
def spin(seconds):
    """Busy Python loop for `seconds` (cancellable at any bytecode); returns iterations."""
    deadline = time.monotonic() + seconds
    n = 0
    while time.monotonic() < deadline:
        n += 1
    return n


@tool
async def adouble(x):
    """An async tool: returns 2 * x."""
    return 2 * x


@tool
def fail_after(n):
    """Yields 0..n, then raises ValueError."""
    for i in range(int(n)):
        yield i
    raise ValueError("failed after %d items" % n)


@tool
def ask_host(name, args=None, ctx=None):
    """Calls the host tool `name` with `args` and returns its answer (or the error it raised,
    as {"error": type, "message": ...})."""
    from snakepit_bridge import HostCallError

    try:
        return {"ok": ctx.call_host(name, args)}
    except HostCallError as e:
        return {"error": e.type_name, "message": str(e)}


@tool
def remember(name, value, ctx=None):
    """Stores a session variable through the host; returns what a read gives back."""
    ctx.session.set(name, value)
    return ctx.session.get(name)


@tool
def recall(name, ctx=None):
    """Reads a session variable through the host (None without a session)."""
    return ctx.session.get(name) if ctx.session is not None else None


@tool
def touch(path):
    """Creates the file `path` (lets tests observe that a call ran)."""
    with open(path, "a"):
        pass
    return path


@tool
def wait_for(path, timeout_ms=30000):
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
