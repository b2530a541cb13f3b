"""Test your worker without the Rust host: :class:`FakeHost` speaks the host's side of the
protocol (docs/protocol.md) over a pipe pair.

In-process (the default), the bridge's dispatch loop runs on a thread of the test process, so
a test can patch, inspect and debug the worker's code directly::

    from snakepit_bridge.testing import FakeHost
    import my_worker  # registers its @tool functions

    def test_add() -> None:
        with FakeHost() as host:
            assert host.call("add", {"a": 1, "b": 2}) == 3

``FakeHost.process(script=...)`` (or ``module=...``) starts the worker as the host does instead
(``python -m snakepit_bridge``, protocol moved off fd 1 before the user's code is imported,
the cancel signal armed): for what only a process shows, such as output at import time.

Like the host, a ``FakeHost`` answers the worker's ``host_call`` frames (``host_tools``, and
``session.get``/``set``/``delete`` from an in-memory session store, with the host's error types:
``NoSession``, ``UnknownHostTool``, ``BadRequest``), grants stream credit one chunk at a time as
the test takes chunks and fails the test on a chunk sent beyond its credit, and sends the cancel
signal only for a call not yet answered. Every wait, reads and writes alike, is bounded by
``timeout``: a worker that hangs fails the test with :class:`HostTimeout` instead of hanging it.
"""

from __future__ import annotations

import json
import os
import select
import signal
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Callable

from . import _core

if TYPE_CHECKING:
    from collections.abc import Iterable, Iterator
    from types import TracebackType
    from typing import IO

__all__ = ["FakeHost", "HostTimeout", "ProtocolViolation", "WorkerError", "WorkerExited"]

_HDR = struct.Struct(">I")
_SEGMENTED = 1 << 31
# One in-process bridge at a time: its dispatch state is per process, as in a real worker.
_ACTIVE = threading.Lock()
# How the host starts the bootstrap (snakepit-adapters/src/python.rs, BOOTSTRAP).
_BOOTSTRAP = (
    "import sys\nif sys.path and sys.path[0] == '':\n    del sys.path[0]\n"
    "import runpy\nrunpy.run_module('snakepit_bridge', run_name='__main__', alter_sys=True)\n"
)


class WorkerError(Exception):
    """The worker answered a call with an ``error``."""

    def __init__(self, error: Mapping[str, Any]) -> None:
        self.type_name: str = str(error.get("type"))
        self.message: str = str(error.get("message"))
        self.traceback: str | None = error.get("traceback")
        super().__init__("%s: %s" % (self.type_name, self.message))


class HostTimeout(Exception):
    """The worker did not answer within the fake host's ``timeout``."""


class WorkerExited(Exception):
    """The worker closed its protocol output (it exited, or its loop ended)."""


class ProtocolViolation(AssertionError):
    """The worker broke the protocol (a chunk beyond its credit, a frame over ``max_frame``,
    a body that is not a message)."""


class FakeHost:
    """The host's side of the protocol, for tests of a worker.

    ``adapter``, ``tools`` and ``encoder`` are what ``serve()`` would get: ``tools`` (functions,
    or a name -> function mapping) replaces the module-level ``@tool`` registry, which is served
    by default. ``config`` is the worker config sent in ``hello``; ``max_in_flight`` > 1 selects
    the bridge's thread profile. ``host_tools`` answers the worker's host calls by name (a
    function of the call's ``args``; raising ``Exception`` answers an error). ``timeout``
    bounds every wait, in seconds.
    """

    def __init__(
        self,
        adapter: _core.AdapterSpec = None,
        *,
        tools: Iterable[Callable[..., Any]] | Mapping[str, Callable[..., Any]] | None = None,
        config: Any = None,
        encoder: _core.Encoder | None = None,
        namespace: dict[str, Any] | None = None,
        max_in_flight: int = 1,
        max_frame: int = 64 * 1024 * 1024,
        versions: Iterable[int] = (1,),
        host_tools: Mapping[str, Callable[[Any], Any]] | None = None,
        timeout: float = 10.0,
        segments: bool = True,
        pipeline_depth: int = 1,
        busy_ping: bool = False,
    ) -> None:
        self._adapter = adapter
        self._tools = _tool_map(tools)
        self._encoder = encoder
        self._namespace = namespace
        self.config = config
        self.max_in_flight = max_in_flight
        self.max_frame = max_frame
        self.versions = list(versions)
        self.timeout = timeout
        #: Whether binary segments are offered in ``hello`` (as the stdio host does).
        self.segments = segments
        #: The pipeline depth offered in ``hello`` (1: none; docs/protocol.md §4e).
        self.pipeline_depth = pipeline_depth
        #: Whether ``hello`` offers pings while busy (docs/protocol.md §6).
        self.busy_ping = busy_ping
        #: Host tools by name; ``session.get``/``set``/``delete`` and ``global.*`` are built in.
        self.host_tools: dict[str, Callable[[Any], Any]] = dict(host_tools or {})
        #: The session store the built-in session host tools use: session id -> name -> value.
        self.sessions: dict[str, dict[str, Any]] = {}
        #: The global variables the built-in ``global.*`` host tools use: name -> value.
        self.globals: dict[str, Any] = {}
        #: Every host call the worker made, as ``(name, args)``, in order.
        self.host_calls: list[tuple[str, Any]] = []
        #: The worker's answer to ``hello`` (``ready`` or ``refuse``), once started.
        self.ready: dict[str, Any] = {}
        self._next_id = 0
        self._session_of: dict[Any, str] = {}  # call id -> the session it runs in
        self._open: set[Any] = set()  # calls sent and not answered yet
        self._position: dict[Any, int] = {}  # call id -> its place among the calls sent
        self._calls_sent = 0
        self._credit: dict[Any, int] = {}  # stream id -> chunks it may still send
        self._replies: dict[Any, list[dict[str, Any]]] = {}
        self._buf = bytearray()
        self._to_worker: int | None = None
        self._from_worker: int | None = None
        self._thread: threading.Thread | None = None
        self._thread_error: BaseException | None = None
        self._worker_fds: tuple[int, int] | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._owns_lock = False

    @classmethod
    def process(
        cls,
        *,
        script: str | os.PathLike[str] | None = None,
        module: str | None = None,
        adapter_class: str | None = None,
        env: Mapping[str, str] | None = None,
        python: str | None = None,
        stderr: int | IO[bytes] | None = None,
        **kwargs: Any,
    ) -> FakeHost:
        """A fake host for a worker process started like the host starts one: the bootstrap
        runs ``script`` (a path) or ``module`` (an importable name), with this package first
        on ``PYTHONPATH``. Its stderr is inherited unless ``stderr`` (a file or fd) is given.
        Other arguments are as for ``FakeHost``."""
        if (script is None) == (module is None):
            raise ValueError("give exactly one of script= and module=")
        host = cls(**kwargs)
        argv = [python or sys.executable, "-c", _BOOTSTRAP]
        argv += ["--script", os.fspath(script)] if script is not None else ["--module", str(module)]
        if adapter_class is not None:
            argv += ["--adapter", adapter_class]
        child_env = dict(os.environ if env is None else env)
        pkg_parent = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        path = child_env.get("PYTHONPATH")
        child_env["PYTHONPATH"] = pkg_parent + (os.pathsep + path if path else "")
        host._proc = subprocess.Popen(
            argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=stderr, env=child_env
        )
        assert host._proc.stdin is not None and host._proc.stdout is not None
        host._to_worker = host._proc.stdin.fileno()
        host._from_worker = host._proc.stdout.fileno()
        os.set_blocking(host._to_worker, False)
        return host

    # -- life cycle ------------------------------------------------------------------------

    def __enter__(self) -> FakeHost:
        try:
            self.start()
        except BaseException:
            self._abort()
            raise
        return self

    def _abort(self) -> None:
        """Ends a worker that failed to start, without raising (a process is killed)."""
        if self._proc is not None and self._proc.poll() is None:
            self._proc.kill()
        try:
            self.close()
        except BaseException:
            pass

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def start(self) -> dict[str, Any]:
        """Starts the worker (in-process: on a thread), sends ``hello`` and returns the answer,
        ``ready`` or ``refuse`` (also kept in ``self.ready``)."""
        if self._proc is None:
            if not _ACTIVE.acquire(blocking=False):
                raise RuntimeError("one in-process FakeHost at a time: the bridge's state is per process")
            self._owns_lock = True
            to_worker_r, self._to_worker = os.pipe()
            self._from_worker, from_worker_w = os.pipe()
            os.set_blocking(self._to_worker, False)
            self._worker_fds = (to_worker_r, from_worker_w)
            self._thread = threading.Thread(
                target=self._run_bridge, args=(to_worker_r, from_worker_w), name="snakepit-fake-worker", daemon=True
            )
            self._thread.start()
        hello: dict[str, Any] = {
            "t": "hello",
            "versions": self.versions,
            "codecs": ["json"],
            "worker": "fake 0.0",
            "max_frame": self.max_frame,
            "config": self.config,
            "max_in_flight": self.max_in_flight,
        }
        if self.segments:
            hello["segments"] = True
        if self.pipeline_depth > 1:
            hello["pipeline_depth"] = self.pipeline_depth
        if self.busy_ping:
            hello["busy_ping"] = True
        self.send(hello)
        self.ready = self._recv()
        if self.ready.get("t") not in ("ready", "refuse"):
            raise AssertionError("expected ready or refuse, got %r" % (self.ready,))
        return self.ready

    def _run_bridge(self, in_fd: int, out_fd: int) -> None:
        try:
            chan = _core._Channel(in_fd, out_fd)
            _core._serve(
                chan,
                self._adapter,
                self._namespace,
                encoder=self._encoder,
                tools=self._tools,
                watch_parent=False,
            )
        except BaseException as e:  # reported by the next wait, and by close()
            self._thread_error = e
        finally:
            os.close(out_fd)  # EOF for the host side: the worker is gone

    def close(self, *, shutdown: bool = True) -> None:
        """Sends ``shutdown`` (unless ``shutdown=False``: as if the host died), closes the
        worker's input and waits (bounded) for it to end; a process that outlives the wait is
        killed. Raises what the in-process bridge raised, or :class:`HostTimeout` if it did not
        end."""
        if self._to_worker is None:
            return
        if shutdown:
            try:
                self.send({"t": "shutdown"})
            except (OSError, HostTimeout):
                pass  # the worker is gone already, or does not read
        stuck = False
        try:
            if self._proc is not None:
                assert self._proc.stdin is not None
                self._proc.stdin.close()
                self._drain(time.monotonic() + self.timeout)
                try:
                    self._proc.wait(self.timeout)
                except subprocess.TimeoutExpired:
                    stuck = True
                    self._proc.kill()
                    self._proc.wait()
                assert self._proc.stdout is not None
                self._proc.stdout.close()
            else:
                os.close(self._to_worker)
                assert self._thread is not None and self._worker_fds is not None
                # Read what the worker still writes (a large answer would block it) until it
                # closes its end, which it does when its loop ends.
                deadline = time.monotonic() + self.timeout
                self._drain(deadline)
                self._thread.join(max(0.1, deadline - time.monotonic()))
                stuck = self._thread.is_alive()
                if not stuck:
                    os.close(self._worker_fds[0])
                    assert self._from_worker is not None
                    os.close(self._from_worker)
        finally:
            self._to_worker = None
            if self._owns_lock and not stuck:
                self._owns_lock = False
                _ACTIVE.release()
        if stuck:
            raise HostTimeout("the worker did not end within %.1f s of shutdown" % self.timeout)
        if self._thread_error is not None and not isinstance(self._thread_error, SystemExit):
            raise self._thread_error

    @property
    def returncode(self) -> int | None:
        """The worker process's exit status (process mode, once it ended)."""
        return None if self._proc is None else self._proc.poll()

    @property
    def pid(self) -> int | None:
        """The worker process's pid (process mode)."""
        return None if self._proc is None else self._proc.pid

    # -- calls -----------------------------------------------------------------------------

    def submit(
        self, cmd: str, args: Any = None, *, stream: int | None = None, session: str | None = None
    ) -> int:
        """Sends a ``call`` and returns its id, without waiting (see :meth:`reply`)."""
        self._next_id += 1
        msg: dict[str, Any] = {"t": "call", "id": self._next_id, "cmd": cmd, "args": args}
        if stream is not None:
            msg["stream"] = stream
            self._credit[self._next_id] = stream
        if session is not None:
            msg["session"] = session
            self._session_of[self._next_id] = session
        self._open.add(self._next_id)
        self._position[self._next_id] = self._calls_sent
        self._calls_sent += 1
        self.send(msg)
        return self._next_id

    def call(self, cmd: str, args: Any = None, *, session: str | None = None) -> Any:
        """Calls the tool ``cmd`` and returns its result; raises :class:`WorkerError`."""
        return self.result(self.submit(cmd, args, session=session))

    def result(self, rid: int) -> Any:
        """The result of call ``rid``; raises :class:`WorkerError` for an ``error``. Binary
        segments come back as ``bytes`` (a reference with ``dtype`` and ``shape`` as a numpy
        array)."""
        m = self.reply(rid)
        if m["t"] == "error":
            raise WorkerError(m.get("error") or {})
        if m["t"] != "result":
            raise AssertionError("call %d: expected result or error, got %r" % (rid, m))
        return _bind(m.get("ok"), m.get("$segs"))

    def stream(
        self, cmd: str, args: Any = None, *, window: int = 1, session: str | None = None
    ) -> Iterator[Any]:
        """Calls ``cmd`` as a stream with ``window`` chunks of credit and yields its chunks,
        granting one more credit per chunk taken (as the host does); raises
        :class:`WorkerError` if the stream ends in an ``error``."""
        rid = self.submit(cmd, args, stream=window, session=session)
        return self.chunks(rid)

    def chunks(self, rid: int, *, grant: bool = True) -> Iterator[Any]:
        """The chunks of stream ``rid`` as they come (see :meth:`stream`); ``grant=False``
        grants no credit, so the worker stalls once its window is used."""
        while True:
            m = self.reply(rid)
            t = m["t"]
            if t == "chunk":
                yield _bind(m.get("data"), m.get("$segs"))
                if grant:
                    self.grant(rid, 1)
            elif t == "end":
                return
            elif t == "error":
                raise WorkerError(m.get("error") or {})
            else:
                raise AssertionError("stream %d: unexpected %r" % (rid, m))

    def grant(self, rid: int, n: int) -> None:
        """Grants stream ``rid`` ``n`` more chunks of credit."""
        self._credit[rid] = self._credit.get(rid, 0) + n
        self.send({"t": "credit", "id": rid, "n": n})

    def cancel(self, rid: int) -> None:
        """Cancels call ``rid``: sends ``cancel``, and in process mode also the worker's cancel
        signal when it announced one and the call is not answered yet (as the host does for a
        worker that runs one call at a time). A pipelined worker is signalled only when ``rid``
        is the oldest open call (the one it runs), with its position's signal."""
        self.send({"t": "cancel", "id": rid})
        self._pump()  # an answer already written means the call is no longer open
        if self._proc is None or rid not in self._open or self._proc.poll() is not None:
            return
        signum = self.ready.get("cancel_signal")
        depth = self.ready.get("pipeline_depth", 1)
        if isinstance(depth, int) and depth > 1:
            sigs = self.ready.get("cancel_signals") or []
            oldest = min(self._open, key=lambda c: self._position.get(c, 0))
            pos = self._position.get(rid, 0)
            signum = sigs[pos % len(sigs)] if len(sigs) > depth and rid == oldest else None
        if isinstance(signum, int):
            os.kill(self._proc.pid, signum)

    def ping(self, pid: int = 0) -> None:
        """Sends ``ping`` and waits for its ``pong``."""
        self.send({"t": "ping", "id": pid})
        self._next(("pong", pid))

    # -- frames ----------------------------------------------------------------------------

    def reply(self, rid: Any) -> dict[str, Any]:
        """The next message for request ``rid``, answering host calls and keeping other
        requests' messages for later, within ``timeout``."""
        return self._next(rid)

    def _next(self, key: Any) -> dict[str, Any]:
        deadline = time.monotonic() + self.timeout
        while True:
            queued = self._replies.get(key)
            if queued:
                return queued.pop(0)
            self._take(self._recv(deadline), deadline)

    def _take(self, m: dict[str, Any], deadline: float) -> None:
        """Files a frame from the worker for whoever waits for it (a host call is answered)."""
        t = m.get("t")
        rid = m.get("id")
        if t == "host_call":
            self._answer_host_call(m, deadline)
            return
        if t == "chunk":
            left = self._credit.get(rid, 0)
            if left <= 0:
                raise ProtocolViolation("stream %r: a chunk beyond the credit granted" % (rid,))
            self._credit[rid] = left - 1
        elif t in ("result", "error", "end"):
            self._open.discard(rid)
            self._credit.pop(rid, None)
        self._replies.setdefault(("pong", rid) if t == "pong" else rid, []).append(m)

    def send(self, msg: Mapping[str, Any] | bytes) -> None:
        """Writes one frame: a message, or a raw body (bytes) for malformed-input tests. A
        message holding binary data (bytes-like objects, numpy arrays) is sent as a segmented
        frame, each as a segment reference (docs/protocol.md, "Binary segments")."""
        deadline = time.monotonic() + self.timeout
        if isinstance(msg, bytes):
            self._write(_HDR.pack(len(msg)) + msg, deadline)
            return
        segs: list[bytes] = []
        value = _extract(dict(msg), segs)
        if not segs:
            body = json.dumps(value, separators=(",", ":"), allow_nan=False).encode()
            self._write(_HDR.pack(len(body)) + body, deadline)
            return
        value["seg"] = [len(b) for b in segs]
        body = json.dumps(value, separators=(",", ":"), allow_nan=False).encode()
        total = 4 + len(body) + sum(len(b) for b in segs)
        self._write(_HDR.pack(total | _SEGMENTED) + _HDR.pack(len(body)) + body + b"".join(segs), deadline)

    def send_raw(self, data: bytes) -> None:
        """Writes ``data`` as is, no framing (for broken-frame tests)."""
        self._write(data, time.monotonic() + self.timeout)

    def _write(self, data: bytes, deadline: float) -> None:
        """Writes `data` by the deadline, reading what the worker writes meanwhile (a worker
        blocked writing a large result does not read: both sides would wait forever)."""
        to, frm = self._to_worker, self._from_worker
        if to is None or frm is None:
            raise RuntimeError("the fake host is not started, or closed")
        view = memoryview(data)
        watch = [frm]
        while view:
            left = deadline - time.monotonic()
            if left <= 0:
                self._raise_thread_error()
                raise HostTimeout("the worker did not read its input within %.1f s" % self.timeout)
            readable, writable, _ = select.select(watch, [to], [], left)
            if readable:
                chunk = os.read(frm, 1 << 16)
                if chunk:
                    self._buf += chunk
                else:
                    watch = []  # the worker closed its output; a write to it fails with EPIPE
            if writable:
                try:
                    n = os.write(to, view)
                except BlockingIOError:
                    continue
                view = view[n:]

    def recv(self) -> dict[str, Any]:
        """The next frame from the worker, whatever it is (host calls are not answered)."""
        return self._recv()

    def _answer_host_call(self, m: dict[str, Any], deadline: float) -> None:
        name = str(m.get("name"))
        args = _bind(m.get("args"), m.get("$segs"))
        self.host_calls.append((name, args))
        reply: dict[str, Any] = {"t": "host_result", "id": m.get("id")}
        try:
            reply["ok"] = self._host_tool(name, m.get("call"), args)
        except _HostError as e:
            reply["error"] = {"type": e.type_name, "message": str(e)}
        except Exception as e:
            reply["error"] = {"type": type(e).__name__, "message": str(e)}
        self.send(reply)

    def _host_tool(self, name: str, rid: Any, args: Any) -> Any:
        if name.startswith("session."):  # as the host: always the session store
            session = self._session_of.get(rid)
            if session is None:
                raise _HostError("NoSession", "this call does not run in a session")
            if not isinstance(args, dict) or not isinstance(args.get("name"), str):
                raise _HostError("BadRequest", "missing `name`")
            store = self.sessions.setdefault(session, {})
            op = name[len("session.") :]
            if op == "get":
                return store.get(args["name"])
            if op == "set":
                store[args["name"]] = args.get("value")
                return None
            if op == "delete":
                return store.pop(args["name"], None) is not None
            raise _HostError("UnknownHostTool", "no session operation `%s`" % name)
        if name.startswith("global."):  # as the host: the store's global variables
            if not isinstance(args, dict) or not isinstance(args.get("name"), str):
                raise _HostError("BadRequest", "missing `name`")
            op = name[len("global.") :]
            if op == "get":
                return self.globals.get(args["name"])
            if op == "set":
                self.globals[args["name"]] = args.get("value")
                return None
            if op == "delete":
                return self.globals.pop(args["name"], None) is not None
            raise _HostError("UnknownHostTool", "no global operation `%s`" % name)
        fn = self.host_tools.get(name)
        if fn is None:
            raise _HostError("UnknownHostTool", "the host has no tool `%s`" % name)
        return fn(args)

    def _recv(self, deadline: float | None = None) -> dict[str, Any]:
        if deadline is None:
            deadline = time.monotonic() + self.timeout
        hdr = self._read_exact(4, deadline)
        (n,) = _HDR.unpack(hdr)
        segmented = n >= _SEGMENTED
        n &= _SEGMENTED - 1
        if n > self.max_frame:
            raise ProtocolViolation("the worker sent a frame of %d bytes (max_frame %d)" % (n, self.max_frame))
        if segmented and not self.ready.get("segments", not self.ready):
            raise ProtocolViolation("a segmented frame, and the worker did not announce segments")
        body = self._read_exact(n, deadline)
        try:
            msg = _core._split_segments(body) if segmented else _core._loads(body)
        except ValueError as e:
            raise ProtocolViolation("the worker sent a body that is not a message (%s): %r" % (e, body[:200]))
        if segmented:
            msg["$segs"] = [bytes(v) for v in msg["$segs"]]
        if not isinstance(msg, dict) or not isinstance(msg.get("t"), str):
            raise ProtocolViolation("the worker sent %r, not a message" % (msg,))
        return msg

    def _read_exact(self, n: int, deadline: float) -> bytes:
        fd = self._from_worker
        if fd is None:
            raise RuntimeError("the fake host is not started, or closed")
        while len(self._buf) < n:
            left = deadline - time.monotonic()
            if left <= 0:
                self._raise_thread_error()
                raise HostTimeout("no answer from the worker within %.1f s" % self.timeout)
            ready, _, _ = select.select([fd], [], [], left)
            if not ready:
                continue
            chunk = os.read(fd, 1 << 16)
            if not chunk:
                self._raise_thread_error()
                raise WorkerExited("the worker closed its protocol output")
            self._buf += chunk
        out = bytes(self._buf[:n])
        del self._buf[:n]
        return out

    def _drain(self, deadline: float) -> None:
        """Reads (and keeps) the worker's output until it closes it or the deadline passes."""
        fd = self._from_worker
        while fd is not None:
            left = deadline - time.monotonic()
            if left <= 0:
                return
            readable, _, _ = select.select([fd], [], [], left)
            if readable:
                chunk = os.read(fd, 1 << 16)
                if not chunk:
                    return
                self._buf += chunk

    def _pump(self) -> None:
        """Takes in the frames the worker has written so far, without waiting."""
        fd = self._from_worker
        while fd is not None and select.select([fd], [], [], 0)[0]:
            chunk = os.read(fd, 1 << 16)
            if not chunk:
                break
            self._buf += chunk
        while len(self._buf) >= 4:
            (n,) = _HDR.unpack(self._buf[:4])
            if len(self._buf) < 4 + n:
                break
            self._take(self._recv(time.monotonic()), time.monotonic() + self.timeout)

    def _raise_thread_error(self) -> None:
        if self._thread is not None and self._thread_error is not None:
            if self._thread is not None:
                self._thread.join(1.0)
            raise self._thread_error


def _extract(value: Any, segs: list[bytes]) -> Any:
    """`value` with its binary parts replaced by segment references (appended to `segs`)."""
    if isinstance(value, dict):
        return {k: _extract(v, segs) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_extract(v, segs) for v in value]
    if isinstance(value, (bytes, bytearray, memoryview)):
        segs.append(bytes(value))
        return {"$seg": len(segs) - 1}
    np = sys.modules.get("numpy")
    if np is not None and isinstance(value, np.ndarray):
        arr = np.ascontiguousarray(value)
        segs.append(arr.tobytes())
        return {"$seg": len(segs) - 1, "dtype": arr.dtype.str, "shape": list(arr.shape)}
    return value


def _bind(value: Any, segs: list[bytes] | None) -> Any:
    """`value` with segment references replaced by their bytes (numpy arrays for references
    with `dtype` and `shape`)."""
    if segs is None:
        return value
    if isinstance(value, dict):
        i = value.get("$seg")
        if type(i) is int:
            if not 0 <= i < len(segs):
                raise ProtocolViolation("segment %d referred to, %d sent" % (i, len(segs)))
            if "dtype" in value and "shape" in value:
                import numpy as np

                return np.frombuffer(segs[i], dtype=value["dtype"]).reshape(value["shape"])
            return segs[i]
        return {k: _bind(v, segs) for k, v in value.items()}
    if isinstance(value, list):
        return [_bind(v, segs) for v in value]
    return value


class _HostError(Exception):
    def __init__(self, type_name: str, message: str) -> None:
        super().__init__(message)
        self.type_name = type_name


def _tool_map(
    tools: Iterable[Callable[..., Any]] | Mapping[str, Callable[..., Any]] | None,
) -> dict[str, Callable[..., Any]] | None:
    if tools is None:
        return None
    if isinstance(tools, Mapping):
        return dict(tools)
    out: dict[str, Callable[..., Any]] = {}
    for fn in tools:
        out[getattr(fn, "__snakepit_tool__", None) or fn.__name__] = fn
    return out
