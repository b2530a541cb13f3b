"""Protocol v1 over framed stdio: framing, handshake, dispatch. Standard library only."""

from __future__ import annotations

import enum
import json
import os
import select
import signal
import struct
import sys
import threading
import time
import types
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Optional, TypeVar, Union, overload

from ._version import __version__

if TYPE_CHECKING:
    import concurrent.futures
    from asyncio import AbstractEventLoop
    from collections.abc import Awaitable, Iterable, Iterator

#: A JSON value as the bridge sends and receives it (``dict``, ``list``, ``str``, numbers,
#: ``bool``, ``None``).
Json = Any
#: One protocol message (a JSON object with its type in ``"t"``).
Message = Dict[str, Any]
#: An encoder hook: returns a JSON-encodable replacement for an object the JSON encoder does
#: not know, or ``NotImplemented`` to pass it on (see ``serve(encoder=...)``).
Encoder = Callable[[Any], Any]
_F = TypeVar("_F", bound=Callable[..., Any])

PROTOCOL_VERSIONS = (1,)
BRIDGE = "python/%s (%s %s)" % (
    __version__,
    sys.implementation.name,
    ".".join(str(x) for x in sys.version_info[:3]),
)

_HDR = struct.Struct(">I")
_SEGMENTED = 1 << 31  # header bit of a segmented frame (docs/protocol.md, "Binary segments")
_TOOLS: dict[str, Callable[..., Any]] = {}
_state: dict[str, Any] = {"in_fd": None, "out_fd": None, "served": False}
# The host's shared-memory arena, when one was agreed in the handshake (`_shm.Arena`).
_arena: list[Any] = [None]
_write_lock = threading.Lock()


class ToolError(Exception):
    """Raise it from a tool to report an error with a chosen ``type`` name."""

    def __init__(self, message: str, type_name: str | None = None) -> None:
        super().__init__(message)
        self.type_name = type_name


class ProtocolError(Exception):
    """The host broke the protocol; the bridge exits."""


class Cancelled(BaseException):
    """Raised inside a tool when the host cancels its call (deadline passed, caller gone).

    A ``BaseException`` (like ``asyncio.CancelledError``), so ``except Exception`` in tool code
    does not swallow it; ``finally`` blocks and context managers run as usual.
    """


class HostCallError(Exception):
    """A call to the host failed; ``type_name`` is the host's error kind or exception type."""

    def __init__(self, type_name: str | None, message: str) -> None:
        super().__init__(message)
        self.type_name = type_name


_host_seq = [0]
_stash: list[Message] = []  # frames read while waiting for a host result that belong to someone else
# Pipelining (docs/protocol.md, "Pipelining"): frames read ahead of the one being handled, in
# order (queued calls, a `shutdown`; None for EOF), and the cancel signals by call position.
_inbox: list[Message | None] = []
_pipe_sigs: list[int] = []
_calls_read = [0]
_session_cache: dict[Any, dict[str, tuple[Json, float]]] = {}
SESSION_CACHE_TTL = 1.0


class Context:
    """What a tool that takes a ``ctx`` parameter receives: the request id, the session (if the
    call runs in one) and calls to the host."""

    def __init__(self, chan: _Channel, request_id: Any, session_id: str | None) -> None:
        self._chan = chan
        #: The host's id of the call being served.
        self.request_id = request_id
        #: The call's session (``None`` when the call runs in none).
        self.session = _SessionProxy(self, session_id) if session_id is not None else None
        #: The pool's global variables (pool-wide, outside any session; never cached).
        self.globals = _GlobalsProxy(self)

    def call_host(self, name: str, args: Json = None) -> Json:
        """Calls the host tool ``name`` and returns its result; raises ``HostCallError``."""
        return _host_call(self._chan, self.request_id, name, args)


class _SessionProxy:
    """Session variables, read through a small TTL cache (writes go through at once)."""

    def __init__(self, ctx: Context, session_id: str) -> None:
        self.id = session_id
        self._ctx = ctx
        if len(_session_cache) > 1000:
            _session_cache.clear()
        self._cache = _session_cache.setdefault(session_id, {})

    def get(self, name: str, default: Json = None) -> Json:
        """The session variable ``name`` (``default`` when unset); cached for
        ``SESSION_CACHE_TTL`` seconds."""
        now = time.monotonic()
        hit = self._cache.get(name)
        if hit is not None and hit[1] > now:
            value = hit[0]
        else:
            value = self._ctx.call_host("session.get", {"name": name})
            self._cache[name] = (value, now + SESSION_CACHE_TTL)
        return default if value is None else value

    def set(self, name: str, value: Json) -> None:
        """Sets the session variable ``name`` (written through to the host at once)."""
        self._ctx.call_host("session.set", {"name": name, "value": value})
        self._cache[name] = (value, time.monotonic() + SESSION_CACHE_TTL)

    def delete(self, name: str) -> Json:
        """Deletes the session variable ``name``; returns what the host answered."""
        self._cache.pop(name, None)
        return self._ctx.call_host("session.delete", {"name": name})


class _GlobalsProxy:
    """The pool's global variables, through the ``global.*`` host calls (read each time: other
    workers and the host write them)."""

    def __init__(self, ctx: Context) -> None:
        self._ctx = ctx

    def get(self, name: str, default: Json = None) -> Json:
        """The global ``name`` (``default`` when unset)."""
        value = self._ctx.call_host("global.get", {"name": name})
        return default if value is None else value

    def set(self, name: str, value: Json) -> None:
        """Sets the global ``name``."""
        self._ctx.call_host("global.set", {"name": name, "value": value})

    def delete(self, name: str) -> Json:
        """Deletes the global ``name``; returns whether it was set."""
        return self._ctx.call_host("global.delete", {"name": name})


def _host_call(chan: _Channel, rid: Any, name: str, args: Json) -> Json:
    T = _threaded[0]
    if T is not None:
        return T.host_call(rid, name, args)
    _host_seq[0] += 1
    hid = _host_seq[0]
    chan.send({"t": "host_call", "id": hid, "call": rid, "name": name, "args": args})
    m = _await_frame(chan, rid, lambda m: m.get("t") == "host_result" and m.get("id") == hid)
    err = m.get("error")
    if err is not None:
        raise HostCallError(err.get("type"), err.get("message", ""))
    segs = m.get("$segs")
    return m.get("ok") if segs is None else _bind_segments(m.get("ok"), segs)


def _await_frame(chan: _Channel, rid: Any, wanted: Callable[[Message], bool]) -> Message:
    """Reads frames while call `rid` runs (serial mode: nothing else reads the pipe) until one
    satisfies `wanted`, and returns it. Meanwhile answers pings, raises Cancelled on a cancel
    for `rid` (or EOF), and keeps `credit` frames for `_stashed_credit`. A cancel signal waits
    until the frame read is handled (a frame lost here could be a queued call)."""
    while True:
        _run.atomic += 1
        try:
            m = _next_message(chan)
            got = m is not None and wanted(m)
            if m is not None and not got:
                t = m.get("t")
                if t == "cancel" and m.get("id") == rid:
                    raise Cancelled("call cancelled by the host")
                if t == "credit" and m.get("id") == rid:
                    _stash.append(m)  # credit for this call's own stream, taken when it next yields
                else:
                    _route(chan, m)
        finally:
            _run.atomic -= 1
        if _run.pending:
            _frame_boundary()
        if m is None:
            raise Cancelled("the host went away")
        if got:
            return m


def _route(chan: _Channel, m: Message) -> None:
    """Handles a frame read ahead of its turn (while a call runs, or before the next one
    starts): answers a ping, answers a call waiting in the inbox that the host cancels (it
    never runs), and keeps calls and `shutdown` in the inbox, in order. Credit and cancels
    for calls already answered are dropped."""
    t = m.get("t")
    if t == "ping":
        chan.send({"t": "pong", "id": m.get("id")})
    elif t == "cancel":
        rid = m.get("id")
        for i, q in enumerate(_inbox):
            if q is not None and q.get("t") == "call" and q.get("id") == rid:
                del _inbox[i]
                _cancel_queued(chan, q)
                return
    elif t == "call" or t == "shutdown":
        _inbox.append(m)
    elif t != "credit":
        _log("ignoring %r while a call runs" % t)


def _cancel_queued(chan: _Channel, msg: Message) -> None:
    """Answers a call the host cancelled while it waited in the pipeline: `Cancelled`, and
    it never ran."""
    rid = msg.get("id")
    reply = {"t": "error", "id": rid, "error": {"type": "Cancelled", "message": "cancelled before it started"}}
    body: Body | None = _dumps(reply)
    maps = msg.pop("$maps", None)
    if maps is not None:
        body = _let_go(msg, body, maps)
    if body is not None:
        chan.write(body)


def _read_ahead(chan: _Channel) -> None:
    """Before a pipelined call starts: takes the frames the host has already sent, so that a
    `cancel` for that call (or one behind it) is honoured before it would run."""
    while chan.ready():
        m = _next_message(chan, wait=False)
        if m is _NOTHING:
            return  # only a `release` was there
        if m is None:
            _inbox.append(None)
            return
        _route(chan, m)


def _stashed_credit(rid: Any) -> int:
    n = 0
    keep = []
    for m in _stash:
        if m.get("t") == "credit" and m.get("id") == rid:
            n += _count(m.get("n"))
        else:
            keep.append(m)
    _stash[:] = keep
    return n


def _count(n: Any) -> int:
    """A credit count from the host (an unsigned integer; anything else counts as none)."""
    return n if type(n) is int and n > 0 else 0


_WANTS_CTX: dict[Any, bool] = {}


def _wants_ctx(fn: Callable[..., Any]) -> bool:
    """Whether a tool takes a `ctx` argument (cached per tool)."""
    try:
        return _WANTS_CTX[fn]
    except (KeyError, TypeError):
        pass
    code = getattr(getattr(fn, "__func__", fn), "__code__", None)
    wants = False
    if code is not None:
        n = code.co_argcount + code.co_kwonlyargcount
        wants = "ctx" in code.co_varnames[:n]
    try:
        _WANTS_CTX[fn] = wants
    except TypeError:
        pass
    return wants


_threaded: list[_Threaded | None] = [None]


# The most host calls the host lets one worker have outstanding (docs/protocol.md).
MAX_HOST_CALLS = 64


def _clear_async_exc() -> None:
    """Clears an asynchronous exception sent to this thread that has not fired yet."""
    import ctypes

    ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(threading.get_ident()), None)


class _Threaded:
    """Thread profile: the main thread reads frames and dispatches; calls run on a thread pool
    (sync tools) or on one event loop thread (async tools).

    A cancel reaches a sync tool as an asynchronous ``Cancelled`` raised in its thread, but
    only while that thread runs the tool's own code (the call is *exposed*: the tool function,
    a sync generator's ``next``): never while it writes a frame (which would cut it in half),
    formats an error, or waits on a host result, credit or a coroutine. Those waits watch
    ``cancelled`` themselves, and a cancel that came while the call was not exposed is raised
    when it is exposed again. A coroutine is cancelled through its task, and its call is
    answered once the coroutine has ended."""

    def __init__(self, chan: _Channel, n: int) -> None:
        self.chan = chan
        self.n = n
        self.lock = threading.Lock()
        self.seq = 0
        self.host_waiters: dict[int, list[Any]] = {}  # host call id -> [Event, reply, request id]
        self.credit: dict[Any, list[Any]] = {}  # stream request id -> [Condition, credit]
        # request id -> ident of the thread running it (None: received, not yet taken up)
        self.running: dict[Any, int | None] = {}
        # gRPC: cancels of calls not received yet (the Cancel RPC can overtake the call's own
        # RPC), most recent last; bounded.
        self.early: dict[Any, None] = {}
        self.exposed: dict[Any, int] = {}  # request id -> ident of the thread running its tool code
        self.injected: set[Any] = set()  # request ids whose thread was sent an async Cancelled
        self.tasks: dict[Any, Any] = {}  # request id -> asyncio task of its coroutine
        # request id -> future of a gRPC host call (cancelled with the call)
        self.async_futs: dict[Any, Any] = {}
        self.cancelled: set[Any] = set()
        self.draining = False  # `shutdown` received: no new calls, keep reading until EOF
        self.eof = False  # the host closed the pipe: no host result or credit will come
        self.loop: AbstractEventLoop | None = None
        # gRPC mode: calls to the host go to its Host service
        self.grpc_host: Callable[[Any, str, Json], Json] | None = None
        # The host allows at most 64 outstanding host calls per worker (a 65th is a protocol
        # violation): threads beyond that wait here for their turn.
        self.host_slots = threading.BoundedSemaphore(MAX_HOST_CALLS)

    def event_loop(self) -> AbstractEventLoop:
        with self.lock:
            if self.loop is None:
                import asyncio

                self.loop = asyncio.new_event_loop()
                threading.Thread(target=self.loop.run_forever, name="snakepit-asyncio", daemon=True).start()
            return self.loop

    def stop(self) -> None:
        """Stops the event loop thread, if one was started (an in-process bridge ends)."""
        with self.lock:
            loop, self.loop = self.loop, None
        if loop is not None:
            loop.call_soon_threadsafe(loop.stop)

    def expose(self, rid: Any) -> None:
        """The calling thread is about to run call `rid`'s tool code: a cancel from now on is
        raised in it. Raises Cancelled at once if the call was cancelled already."""
        with self.lock:
            if rid in self.cancelled:
                raise Cancelled("call cancelled by the host")
            self.exposed[rid] = threading.get_ident()

    def unexpose(self, rid: Any) -> bool:
        """The calling thread leaves call `rid`'s tool code (idempotent): a cancel is only
        recorded from now on. A cancel injected just before either fires here (as `Cancelled`,
        which the callers handle) or, if it has not fired by the time the lock is held, is
        cleared. Returns whether the thread was exposed for `rid`."""
        me = threading.get_ident()
        with self.lock:
            was = self.exposed.get(rid) == me
            if was:
                del self.exposed[rid]
            if rid in self.injected and self.running.get(rid) == me:
                self.injected.discard(rid)
                _clear_async_exc()
        return was

    def run_async(self, awaitable: Awaitable[Any], cancellable: bool = True) -> Any:
        """Runs `awaitable` on the event loop thread and waits for it. A cancel of the call
        cancels its task; the wait lasts until the coroutine has ended (its `finally` blocks
        ran), so the call is answered only then."""
        import asyncio
        import concurrent.futures

        rid = getattr(_tls, "rid", None)
        was = self.unexpose(rid)
        try:

            async def runner() -> Any:
                task = asyncio.current_task()
                with self.lock:
                    pre = cancellable and rid in self.cancelled
                    if cancellable and not pre:
                        self.tasks[rid] = task
                if pre:
                    close = getattr(awaitable, "close", None)
                    if close is not None:
                        close()  # never awaited: no "coroutine was never awaited" warning
                    raise asyncio.CancelledError()
                try:
                    return await awaitable
                finally:
                    if cancellable:
                        with self.lock:
                            if self.tasks.get(rid) is task:
                                del self.tasks[rid]

            fut = asyncio.run_coroutine_threadsafe(runner(), self.event_loop())
            try:
                return fut.result()
            except concurrent.futures.CancelledError:
                raise Cancelled("call cancelled by the host")
        finally:
            if was:
                self.expose(rid)

    def host_call(self, rid: Any, name: str, args: Json) -> Json:
        # Called from the tool's code: the wait is not exposed (it watches `cancelled`).
        was = self.unexpose(rid)
        try:
            while not self.host_slots.acquire(timeout=0.05):
                if rid in self.cancelled or self.eof:
                    raise Cancelled("call cancelled by the host" if not self.eof else "the host went away")
            try:
                if self.grpc_host is not None:
                    return self.grpc_host(rid, name, args)
                return self._host_call_on_pipe(rid, name, args)
            finally:
                self.host_slots.release()
        finally:
            if was:
                self.expose(rid)

    def _host_call_on_pipe(self, rid: Any, name: str, args: Json) -> Json:
        ev = threading.Event()
        with self.lock:
            if rid in self.cancelled or self.eof:
                raise Cancelled("call cancelled by the host" if not self.eof else "the host went away")
            self.seq += 1
            hid = self.seq
            slot: list[Any] = [ev, None, rid]
            self.host_waiters[hid] = slot
        try:
            self.chan.send({"t": "host_call", "id": hid, "call": rid, "name": name, "args": args})
            ev.wait()
        finally:
            with self.lock:
                self.host_waiters.pop(hid, None)
        m = slot[1]
        if m is None:
            raise Cancelled("call cancelled by the host" if not self.eof else "the host went away")
        err = m.get("error")
        if err is not None:
            raise HostCallError(err.get("type"), err.get("message", ""))
        segs = m.get("$segs")
        return m.get("ok") if segs is None else _bind_segments(m.get("ok"), segs)

    def deliver_host(self, m: Message) -> None:
        with self.lock:
            slot = self.host_waiters.get(m.get("id"))  # type: ignore[arg-type]  # any id: no match
        if slot is not None:
            slot[1] = m
            slot[0].set()

    def wait_credit(self, rid: Any) -> int:
        """Blocks until stream `rid` has credit; returns it (and takes it)."""
        with self.lock:
            entry = self.credit.setdefault(rid, [threading.Condition(self.lock), 0])
            while entry[1] <= 0 and rid not in self.cancelled and not self.eof:
                entry[0].wait()
            if rid in self.cancelled:
                raise Cancelled("stream cancelled by the host")
            if entry[1] <= 0:
                raise Cancelled("the host went away")
            n: int = entry[1]
            entry[1] = 0
            return n

    def add_credit(self, rid: Any, n: int) -> None:
        with self.lock:
            entry = self.credit.setdefault(rid, [threading.Condition(self.lock), 0])
            entry[1] += n
            entry[0].notify_all()

    def host_gone(self) -> None:
        """The host closed the pipe: calls waiting on a host result or on credit (now or
        later) raise Cancelled; calls that only compute run to their end."""
        with self.lock:
            self.eof = True
            for slot in self.host_waiters.values():
                slot[0].set()
            for entry in self.credit.values():
                entry[0].notify_all()

    def cancel(self, rid: Any) -> None:
        with self.lock:
            if rid in self.cancelled:
                return  # one cancel per call (so at most one injected exception)
            if rid not in self.running:
                if self.grpc_host is not None:  # gRPC: maybe a call not received yet
                    self.early[rid] = None
                    if len(self.early) > 1024:
                        del self.early[next(iter(self.early))]
                return  # already answered
            self.cancelled.add(rid)
            for slot in self.host_waiters.values():
                if slot[2] == rid:
                    slot[0].set()
            entry = self.credit.get(rid)
            if entry is not None:
                entry[0].notify_all()
            fut = self.async_futs.get(rid)
            if fut is not None:
                fut.cancel()
            task = self.tasks.get(rid)
            if task is not None and self.loop is not None:
                self.loop.call_soon_threadsafe(task.cancel)
            tid = self.exposed.get(rid)
            if tid is None:
                return  # not in the tool's code: raised when it next is, or seen by its wait
            self.injected.add(rid)
            # Raised in the tool at its next bytecode (not inside a blocking C call).
            import ctypes

            ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(tid), ctypes.py_object(Cancelled))

    def finish(self, rid: Any) -> None:
        """Forgets call `rid` once answered (in its own thread)."""
        with self.lock:
            self.running.pop(rid, None)
            self.cancelled.discard(rid)
            self.credit.pop(rid, None)
            self.exposed.pop(rid, None)
            self.tasks.pop(rid, None)
            injected = rid in self.injected
            self.injected.discard(rid)
            if injected:
                # A Cancelled sent to this thread that has not fired yet must not fire in the
                # next call it runs.
                _clear_async_exc()
        _tls.rid = None

    def accept(self, rid: Any) -> None:
        """Call `rid` was received: a cancel for it from now on is kept, even before a thread
        has taken it up (its first `expose` then raises it)."""
        with self.lock:
            self.running[rid] = None
            if rid in self.early:
                self.early.pop(rid)
                self.cancelled.add(rid)

    def run_call(self, tools: dict[str, Callable[..., Any]], msg: Message) -> None:
        rid = msg.get("id")
        with self.lock:
            self.running[rid] = threading.get_ident()
        _tls.rid = rid
        try:
            try:
                _call(self.chan, tools, msg)
            finally:
                self.finish(rid)
        except Cancelled:
            pass  # arrived after the call was answered: nothing left to cancel
        except BaseException:
            _log("call %r failed outside its tool:\n%s" % (rid, _format_exc()))


_tls = threading.local()


async def _as_coro(awaitable: Awaitable[Any]) -> Any:
    return await awaitable


def _format_exc() -> str:
    import traceback

    return traceback.format_exc()


_NOTHING: Message = {}  # `_next_message(wait=False)`: no message without waiting


def _next_message(chan: _Channel, wait: bool = True) -> Message | None:
    """The next message from the host as a dict (with its type in "t"), or None at EOF. A
    segmented frame's segments are in the message's "$segs" (memoryviews over the frame).
    `release` messages are handled here; with `wait=False`, `_NOTHING` when no other message
    is there without waiting."""
    while True:
        body = chan.read()
        if body is None:
            return None
        try:
            if chan.segmented:
                msg = _split_segments(body)
            else:
                msg = _loads(body)
            if type(msg) is not dict or type(msg.get("t")) is not str:
                raise ValueError("not a JSON object with a string `t`")
        except ValueError as e:
            raise ProtocolError("malformed message from host: %s" % e)
        t = msg["t"]
        if t != "release":
            if _pipe_sigs and t == "call":
                msg["$pos"] = _calls_read[0]  # its place on the connection, for the cancel signal
                _calls_read[0] += 1
            return msg
        # The host copied our regions out: taken here, whoever reads.
        arena = _arena[0]
        if arena is not None:
            _run.atomic += 1  # a cancel must not cut the release short: its regions would be lost
            try:
                arena.release(msg.get("shm"))
            finally:
                _run.atomic -= 1
            if _run.pending:
                _frame_boundary()
        if not wait and not chan.ready():
            return _NOTHING


def _split_segments(body: bytes | bytearray) -> Any:
    """A segmented frame's message, with "$segs": its segments as read-only memoryviews over
    the frame or, for `[offset, length]` entries, over the shared-memory arena (no copy; their
    mappings in "$maps", to be let go of once the call is answered). Raises ValueError when
    the lengths do not add up or a region is out of range."""
    size = len(body)
    if size < 4:
        raise ValueError("segmented frame shorter than its JSON length")
    (jl,) = _HDR.unpack_from(body)
    at = 4 + jl
    if at > size:
        raise ValueError("segmented frame: JSON length %d over the frame" % jl)
    msg = _loads(body[4:at])
    table = msg.get("seg") if type(msg) is dict else None
    if type(table) is not list:
        raise ValueError("segmented frame without a valid `seg` table: %r" % (table,))
    view = memoryview(body).toreadonly()
    segs = []
    lease = None
    for n in table:
        if type(n) is list and len(n) == 2 and _arena[0] is not None:
            if lease is None:
                lease = _arena[0].lease()
                msg["$maps"] = [lease]
            segs.append(_arena[0].view(lease, n[0], n[1]))
            continue
        if type(n) is not int or n < 0:
            raise ValueError("segmented frame without a valid `seg` table: %r" % (table,))
        end = at + n
        if end > size:
            raise ValueError("segment table %r runs past the frame (%d bytes)" % (table, size))
        segs.append(view[at:end])
        at = end
    if at != size:
        raise ValueError("%d bytes past the segments listed in %r" % (len(body) - at, table))
    msg["$segs"] = segs
    return msg


def _loop_threaded(chan: _Channel, tools: dict[str, Callable[..., Any]], n: int, T: _Threaded | None = None) -> None:
    from concurrent.futures import ThreadPoolExecutor

    if T is None:
        T = _Threaded(chan, n)
    _threaded[0] = T
    pool = ThreadPoolExecutor(max_workers=n, thread_name_prefix="snakepit-call")
    try:
        while True:
            msg = _next_message(chan)
            if msg is None:
                T.host_gone()  # calls waiting on the host end; the others finish
                return
            t = msg["t"]
            if t == "call":
                if T.draining:
                    chan.send(
                        {
                            "t": "error",
                            "id": msg.get("id"),
                            "error": {"type": "ShuttingDown", "message": "the worker is shutting down"},
                        }
                    )
                    continue
                T.accept(msg.get("id"))
                pool.submit(T.run_call, tools, msg)
            elif t == "ping":
                chan.send({"t": "pong", "id": msg.get("id")})
            elif t == "host_result":
                T.deliver_host(msg)
            elif t == "credit":
                T.add_credit(msg.get("id"), _count(msg.get("n")))
            elif t == "cancel":
                T.cancel(msg.get("id"))
            elif t == "shutdown":
                # Calls in flight finish; they may still need host results and credit, so
                # reading goes on until the host closes the pipe (which it does next).
                T.draining = True
            else:
                _log("ignoring unknown message type %r" % t)
    finally:
        pool.shutdown(wait=True)


class _Running:
    """Which call the main thread is running (for the cancel signal)."""

    id: Any = None
    signum: int | None = None
    # Pipelining: the signal that cancels the running call (by its position); another one is
    # for a call that has already ended.
    sig: int | None = None
    # The task running the call's coroutine on the bridge's event loop (serial profile): the
    # cancel signal cancels it instead of raising inside asyncio's own code.
    task: tuple[AbstractEventLoop, Any] | None = None
    # > 0 while a frame is being read or written: a cancel then waits for the frame boundary,
    # so the protocol stream is never cut mid-frame.
    atomic = 0
    pending = False


_run = _Running()


def _on_cancel_signal(signum: int, frame: types.FrameType | None) -> None:
    # The host sends the cancel signal only while a call it cancelled has not been answered,
    # and (without pipelining) sends the next call only after that answer: so the running call
    # is the cancelled one. With pipelining, the signal names the call's position: one meant
    # for a call that ended as the host sent it is not this call's.
    if _run.id is None or (_run.sig is not None and signum != _run.sig):
        return
    if _run.atomic:
        _run.pending = True
        return
    if _run.task is not None:
        loop, task = _run.task
        if task.done():
            _run.pending = True  # raised by `_loop_run` once it has let go of the task
            return
        loop.call_soon_threadsafe(task.cancel)
        if sys.modules["asyncio"].current_task(loop) is None:
            # In the event loop's own code, between task steps: raising here would be lost in
            # asyncio (it logs and carries on). The task's cancel raises in the coroutine at
            # its next await.
            _run.id = None
            return
        # Within a task's step: the coroutine's code (the call's task, or a child task it
        # waits on through gather/wait_for) is on the stack; raise there too, so a coroutine
        # that blocks the loop is interrupted as well.
    _run.id = None
    raise Cancelled("call cancelled by the host")


def _frame_boundary() -> None:
    """Raises a cancel that arrived while a frame was in transit, now that it is whole."""
    if _run.pending and _run.id is not None and not _run.atomic:
        _run.pending = False
        _run.id = None
        raise Cancelled("call cancelled by the host")


def _cancel_signum() -> int | None:
    """The cancel signal's number: SIGUSR1 unless SNAKEPIT_CANCEL_SIGNAL names another or
    'none'."""
    name = os.environ.get("SNAKEPIT_CANCEL_SIGNAL", "SIGUSR1")
    signum = getattr(signal, name, None) if name.lower() != "none" else None
    return int(signum) if signum is not None else None


def _install_cancel_signal() -> int | None:
    """Installs the cancel signal handler (see `_cancel_signum`), unless the user's code
    already handles that signal. Returns its number."""
    signum = _cancel_signum()
    if signum is None or threading.current_thread() is not threading.main_thread():
        return None
    if signal.getsignal(signum) not in (signal.SIG_DFL, None):
        return None
    signal.signal(signum, _on_cancel_signal)
    return int(signum)


MAX_PIPELINE_DEPTH = 16


def _pipeline_depth(hello: Message) -> int:
    """The pipeline depth to accept: what `hello` offers, at most MAX_PIPELINE_DEPTH; 1 (none)
    when SNAKEPIT_BRIDGE_PIPELINE=0."""
    offered = hello.get("pipeline_depth")
    if type(offered) is not int or offered < 2 or os.environ.get("SNAKEPIT_BRIDGE_PIPELINE", "1") == "0":
        return 1
    return min(offered, MAX_PIPELINE_DEPTH)


def _install_pipeline_signals(n: int) -> list[int]:
    """Installs the cancel handler on `n` real-time signals (the highest ones), one per
    position in the pipe modulo `n`; none if user code handles any of them."""
    top = getattr(signal, "SIGRTMAX", None)
    if top is None or threading.current_thread() is not threading.main_thread():
        return []
    sigs = [int(top) - k for k in range(n)]
    if any(signal.getsignal(x) not in (signal.SIG_DFL, None, _on_cancel_signal) for x in sigs):
        _log("pipelining off: user code handles a real-time signal among %s" % sigs)
        return []
    for x in sigs:
        signal.signal(x, _on_cancel_signal)
    return sigs


@overload
def tool(fn: _F, *, name: str | None = None) -> _F: ...


@overload
def tool(fn: None = None, *, name: str | None = None) -> Callable[[_F], _F]: ...


def tool(fn: _F | None = None, *, name: str | None = None) -> _F | Callable[[_F], _F]:
    """Marks a function (or an adapter method) as a tool callable from the host.

    ``@tool`` or ``@tool(name="other_name")``. Module-level functions are registered at once;
    methods are collected from their ``BaseAdapter`` subclass when it is served. The function
    is returned unchanged.

    How a call's ``args`` reach it: a JSON object as keyword arguments, an array as positional
    arguments, ``null`` as no argument, anything else as the one positional argument. A
    parameter named ``ctx`` receives a :class:`Context`. A generator (sync or async) is a
    streaming tool; a coroutine function runs on the bridge's event loop.
    """

    def mark(f: _F) -> _F:
        tool_name = name or f.__name__
        setattr(f, "__snakepit_tool__", tool_name)
        parts = f.__qualname__.split(".")
        is_method = len(parts) > 1 and parts[-2] != "<locals>"
        if not is_method:
            _TOOLS[tool_name] = f
        return f

    return mark(fn) if fn is not None else mark


class BaseAdapter:
    """Base class for stateful workers: mark methods with ``@tool``.

    ``setup()`` runs once before the worker reports ready (load models there; the host's
    handshake timeout bounds it). ``self.config`` is the worker config the host sent.
    ``encode()`` teaches the bridge how to send the adapter's own result types. ``preload()``
    loads what every worker shares, once per zygote (gunicorn's ``--preload``).
    """

    @classmethod
    def preload(cls) -> None:
        """Loads what every worker may share, before ``setup()``: store it on the class
        (``cls.model = load(...)``). With a zygote (``Zygote(...)`` / ``--zygote``) it runs
        once, in the zygote, before any worker is forked, and every forked worker inherits
        the result, shared copy-on-write; a cold worker runs it itself, before ``setup()``.

        Fork safety: it must leave no thread running (BLAS or OpenMP pools started from Python
        threads, gRPC channels, event loops, executors): a forked child gets a copy of every
        lock such a thread held, and not the thread. The zygote checks
        ``threading.active_count() == 1`` after it and refuses to start otherwise, naming the
        threads. Per-process resources (sockets, files, threads) belong in ``setup()``.
        """

    def __init__(self, config: Json = None) -> None:
        #: The worker configuration the host sent in ``hello`` (``{}`` when it sent none).
        self.config: Json = config if config is not None else {}

    def setup(self) -> None:
        """Called once, before ``ready``."""

    def teardown(self) -> None:
        """Called once when the worker stops normally."""

    def encode(self, obj: Any) -> Any:
        """Returns a JSON-encodable stand-in for ``obj``, a result (or part of one) that the
        JSON encoder does not know, or ``NotImplemented`` to leave it to ``serve(encoder=...)``
        and then to :func:`default_encoder`. The stand-in may itself contain such objects."""
        return NotImplemented


def served() -> bool:
    """Whether ``serve()`` has run in this process."""
    return bool(_state["served"])


def claim_stdio() -> None:
    """Moves the protocol to private fds and points fd 1 at stderr, fd 0 at /dev/null.

    Idempotent. Called by the bootstrap before any user code is imported.
    """
    if _state["in_fd"] is not None:
        return
    try:
        sys.stdout.flush()
    except Exception:
        pass
    in_fd = os.dup(0)  # non-inheritable by default (PEP 446): children never see the protocol
    out_fd = os.dup(1)
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)
    os.dup2(2, 1)
    try:
        sys.stdout.reconfigure(line_buffering=True)  # type: ignore[union-attr]  # may be replaced
    except Exception:
        pass
    _state["in_fd"] = in_fd
    _state["out_fd"] = out_fd


def _log(msg: str) -> None:
    try:
        sys.stderr.write("snakepit_bridge: %s\n" % msg)
        sys.stderr.flush()
    except Exception:
        pass


class _BusyReader:
    """Heartbeats while busy (`hello.busy_ping`, serial profile): a thread that answers the
    host's pings while the main thread runs one call for long. It reads only while the same
    call has run for `LONG` seconds and the host has sent something, under the channel's lock
    (the main thread holds it whenever it reads); it answers pings and keeps every other frame,
    in order, for the main thread (`_Channel._early`), which handles them as if it had read
    them itself. A tool that holds the GIL keeps this thread from running: its pings go
    unanswered, which is what the host's busy heartbeat detects."""

    LONG = 0.05

    def __init__(self, chan: _Channel) -> None:
        self.chan = chan
        self.stop = threading.Event()
        chan.lock = threading.Lock()
        self.thread = threading.Thread(target=self.run, name="snakepit-busy-ping", daemon=True)
        self.thread.start()

    def run(self) -> None:
        chan = self.chan
        lock = chan.lock
        assert lock is not None
        poller = select.poll()
        poller.register(chan.in_fd, select.POLLIN)
        seen: Any = None
        since = 0.0
        while not self.stop.is_set():
            if not poller.poll(200):
                continue  # nothing sent (and the stop flag is looked at again)
            rid = _run.id
            now = time.monotonic()
            if rid is None or rid != seen:
                # No call, or a new one: the main thread reads between calls.
                seen, since = rid, now
                self.stop.wait(self.LONG)
                continue
            if now - since < self.LONG or not lock.acquire(blocking=False):
                self.stop.wait(self.LONG)
                continue
            try:
                while _run.id == rid and chan._ready():
                    body = chan._read()
                    if body is None:
                        return  # EOF: the main thread meets it too
                    if not chan.segmented and body.startswith(b'{"t":"ping"'):
                        try:
                            m = _loads(body)
                            _pong_raw(chan, m.get("id") if type(m) is dict else None)
                            continue
                        except ValueError:
                            pass
                    chan._early.append((body, chan.segmented))
            except (OSError, ProtocolError):
                return  # the main thread meets the same trouble on its next read
            finally:
                lock.release()


def _pong_raw(chan: _Channel, pid: Any) -> None:
    """Writes a `pong` from another thread than the main one (no cancel-signal bookkeeping)."""
    body = _dumps({"t": "pong", "id": pid})
    with _write_lock:
        chan._write_all(_HDR.pack(len(body)) + body)


_busy: list[_BusyReader | None] = [None]


class _Channel:
    def __init__(self, in_fd: int, out_fd: int) -> None:
        self.in_fd = in_fd
        # Our own input buffer (not a BufferedReader): pipelining asks whether a whole frame
        # is already here before it polls the pipe.
        self._buf = b""
        self._at = 0
        self._ready_poll: select.poll | None = None
        self.out_fd = out_fd
        self.max_frame = 64 * 1024 * 1024
        self._spin = 0.0
        self._poll: select.poll | None = None
        self.segments = False  # binary segments agreed in the handshake
        self.segmented = False  # whether the last frame read was segmented
        # Heartbeats while busy (`_BusyReader`): frames it read while a call ran, for the main
        # thread, in order, and the lock that keeps the two readers apart (None: no such thread).
        self._early: list[tuple[bytes | bytearray, bool]] = []
        self.lock: threading.Lock | None = None

    def read(self) -> bytes | bytearray | None:
        """Returns the next frame body, or None at EOF. Never cut short by the cancel signal,
        which does not raise here either: a frame read must not be lost (`_await_frame` raises
        it once the frame is handled)."""
        _run.atomic += 1
        try:
            lock = self.lock
            if lock is None:
                return self._read()
            with lock:
                if self._early:
                    body, self.segmented = self._early.pop(0)
                    return body
                return self._read()
        finally:
            _run.atomic -= 1

    def busy_poll(self, seconds: float) -> None:
        """Polls the input for up to `seconds` before each blocking read (hello's busy_poll_us):
        a process that sleeps between calls pays the CPU's wake-up latency on the next one. Off
        when this process may only run on one CPU (polling would keep the host off it)."""
        try:
            cpus = len(os.sched_getaffinity(0))
        except (AttributeError, OSError):
            cpus = os.cpu_count() or 1
        if seconds > 0 and cpus > 1:
            self._poll = select.poll()
            self._poll.register(self.in_fd, select.POLLIN)
            self._spin = seconds

    def ready(self) -> bool:
        """Whether a frame can be read without waiting for the host: it is whole in the
        buffer, or the pipe has bytes (or is at EOF)."""
        lock = self.lock
        if lock is None:
            return self._ready()
        with lock:
            return bool(self._early) or self._ready()

    def _ready(self) -> bool:
        buf = self._buf
        at = self._at
        if len(buf) - at >= 4:
            (n,) = _HDR.unpack_from(buf, at)
            if len(buf) - at - 4 >= n & ~_SEGMENTED:
                return True
        poll = self._ready_poll
        if poll is None:
            poll = self._ready_poll = select.poll()
            poll.register(self.in_fd, select.POLLIN)
        return bool(poll.poll(0))

    def _read(self) -> bytes | bytearray | None:
        buf = self._buf
        at = self._at
        if len(buf) - at < 4:
            poll = self._poll
            if poll is not None and self._spin and not poll.poll(0):
                until = time.perf_counter() + self._spin
                while not poll.poll(0) and time.perf_counter() < until:
                    os.sched_yield()  # lets the host run first when both share a CPU
            rest = buf[at:]
            while len(rest) < 4:
                chunk = os.read(self.in_fd, 65536)
                if not chunk:
                    self._buf, self._at = b"", 0
                    return None
                rest = rest + chunk if rest else chunk
            buf = self._buf = rest
            at = 0
        (n,) = _HDR.unpack_from(buf, at)
        self.segmented = n >= _SEGMENTED
        if self.segmented:
            if not self.segments:
                raise ProtocolError("a segmented frame, and binary segments were not agreed")
            n -= _SEGMENTED
        if n > self.max_frame:
            raise ProtocolError("inbound frame of %d bytes exceeds max_frame %d" % (n, self.max_frame))
        start = at + 4
        end = start + n
        if end <= len(buf):
            self._at = end
            return buf[start:end]
        # Not all here yet: the rest goes straight into the body's own buffer.
        body = bytearray(n)
        got = len(buf) - start
        body[:got] = memoryview(buf)[start:]
        self._buf, self._at = b"", 0
        view = memoryview(body)
        while got < n:
            k = os.readv(self.in_fd, [view[got:]])
            if k == 0:
                return None
            got += k
        return body

    def write(self, body: bytes | tuple[bytes, list[memoryview]]) -> None:
        """Writes one frame (a segmented one for a `(json, segments)` pair); never cut short by
        the cancel signal (nor, in the thread profile, by a cancel: those are raised only in the
        tool's own code)."""
        if type(body) is not bytes:
            self.write_segmented(*body)
            return
        n = len(body)
        _run.atomic += 1
        try:
            with _write_lock:
                if n < 65536:
                    data = _HDR.pack(n) + body
                    m = os.write(self.out_fd, data)
                    if m != len(data):  # a short write (the pipe was nearly full): the rest
                        self._write_all(memoryview(data)[m:])
                else:
                    self._write_all(_HDR.pack(n))
                    self._write_all(body)
        finally:
            _run.atomic -= 1
        if _run.pending:
            _frame_boundary()

    def write_raw(self, data: bytes) -> None:
        """Writes bytes that already hold whole frames, like `write` does a frame."""
        _run.atomic += 1
        try:
            with _write_lock:
                self._write_all(data)
        finally:
            _run.atomic -= 1
        if _run.pending:
            _frame_boundary()

    def _write_all(self, data: bytes | memoryview) -> None:
        n = os.write(self.out_fd, data)
        if n == len(data):
            return
        view = memoryview(data)[n:]
        while view:
            n = os.write(self.out_fd, view)
            view = view[n:]

    def send(self, msg: Message) -> None:
        try:
            body = _dumps(msg)
        except _NeedSegments:
            # Placed in the arena, then written, with no cancel in between: its regions would
            # be lost with the frame.
            _run.atomic += 1
            try:
                json_body, segs, _, placed = _place(*_dumps_segments(msg))
                try:
                    self.write_segmented(json_body, segs)
                except FrameTooLarge:
                    _unplace(placed)
                    raise
            finally:
                _run.atomic -= 1
            if _run.pending:
                _frame_boundary()
            return
        self.write(body)

    def write_segmented(self, json_body: bytes, segments: list[memoryview]) -> None:
        """Writes one segmented frame: header (with the segmented bit), JSON length, JSON,
        then the segments straight from their buffers (``writev``: no copy)."""
        seg_bytes = 0
        for seg in segments:
            seg_bytes += seg.nbytes
        n = 4 + len(json_body) + seg_bytes
        if n > self.max_frame:
            raise FrameTooLarge(n, self.max_frame)
        head = _HDR.pack(n | _SEGMENTED) + _HDR.pack(len(json_body)) + json_body
        if seg_bytes < 65536:
            # Small: one buffer and one write (cheaper than writev's bookkeeping).
            self.write_raw(head + b"".join(segments))
            return
        parts: list[Any] = [head]
        parts.extend(segments)
        _run.atomic += 1
        try:
            with _write_lock:
                while parts:
                    k = os.writev(self.out_fd, parts[:1024])
                    while parts and k >= memoryview(parts[0]).nbytes:
                        k -= memoryview(parts[0]).nbytes
                        parts.pop(0)
                    if k:
                        parts[0] = memoryview(parts[0])[k:]
        finally:
            _run.atomic -= 1
        if _run.pending:
            _frame_boundary()


def default_encoder(obj: Any) -> Any:
    """The bridge's built-in conversions for results the JSON encoder does not know; returns
    ``NotImplemented`` for anything else. Applied after the adapter's ``encode()`` and
    ``serve(encoder=...)``; call it from your own encoder to fall back on it.

    ========================================  =============================================
    type                                      sent as
    ========================================  =============================================
    dataclass instance                        object of its fields (``dataclasses.fields``)
    ``enum.Enum`` member                      its ``value``
    ``datetime``, ``date``, ``time``          ISO 8601 string (``isoformat()``)
    ``timedelta``                             seconds (float)
    ``uuid.UUID``                             string
    ``decimal.Decimal``                       string (no precision lost)
    ``set``, ``frozenset``                    array, sorted when the items can be
    numpy array / numpy scalar                ``tolist()`` / ``item()``
    numpy ``datetime64`` (scalar or array)    ISO 8601 string(s)
    pydantic model (v2)                       ``model_dump(mode="json")``
    ``os.PathLike``                           ``os.fspath()``
    other ``collections.abc.Mapping``         object
    ========================================  =============================================

    Tuples (and lists, dicts, str, int, float, bool, None) are JSON already. NaN and infinities
    are refused wherever they occur, as JSON has no such numbers.
    """
    t = type(obj)
    if isinstance(obj, enum.Enum):
        return obj.value
    fields = getattr(t, "__dataclass_fields__", None)
    if fields is not None:
        import dataclasses

        return {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)}
    if isinstance(obj, (set, frozenset)):
        try:
            return sorted(obj)
        except TypeError:
            return list(obj)
    mod = sys.modules
    dt = mod.get("datetime")
    if dt is not None:
        if isinstance(obj, (dt.datetime, dt.date, dt.time)):
            return obj.isoformat()
        if isinstance(obj, dt.timedelta):
            return obj.total_seconds()
    uuid = mod.get("uuid")
    if uuid is not None and isinstance(obj, uuid.UUID):
        return str(obj)
    decimal = mod.get("decimal")
    if decimal is not None and isinstance(obj, decimal.Decimal):
        return str(obj)
    np = mod.get("numpy")
    if np is not None:
        if isinstance(obj, (np.ndarray, np.datetime64)) and obj.dtype.kind == "M":
            return np.datetime_as_string(obj).tolist()  # ISO 8601 at the value's precision
        if isinstance(obj, np.ndarray):
            return obj.tolist()
        if isinstance(obj, np.generic):
            return obj.item()
    dump = getattr(obj, "model_dump", None)
    if dump is not None and hasattr(t, "model_fields"):
        return dump(mode="json")
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    import collections.abc

    if isinstance(obj, collections.abc.Mapping):
        return dict(obj)
    return NotImplemented


# The encoder hooks of the worker being served, most specific first (the adapter's `encode`,
# then `serve(encoder=...)`); `default_encoder` comes after them.
_hooks: list[Encoder] = []


class _NeedSegments(Exception):
    """The value holds binary data (and segments are agreed): encode it with segments."""


class FrameTooLarge(Exception):
    """A message over the host's ``max_frame``."""

    def __init__(self, size: int, limit: int) -> None:
        super().__init__("message of %d bytes exceeds max_frame %d" % (size, limit))


# Whether binary segments were agreed with the host (set by the handshake).
_segments_on = [False]


def _as_segment(obj: Any, segs: list[memoryview]) -> Any:
    """A segment reference for a binary object (appending its buffer to `segs`), or
    NotImplemented. numpy arrays keep their dtype and shape beside the reference."""
    t = type(obj)
    np = sys.modules.get("numpy")
    if np is not None and t is not bytes:
        if isinstance(obj, np.generic):
            return NotImplemented  # a scalar: a number, by default_encoder
        if isinstance(obj, np.ndarray):
            if obj.dtype.hasobject:
                return NotImplemented
            arr = np.ascontiguousarray(obj)  # no copy when it already is
            ref = {"$seg": len(segs), "dtype": arr.dtype.str, "shape": list(arr.shape)}
            segs.append(memoryview(arr.reshape(-1)).cast("B") if arr.size else memoryview(b""))
            return ref
    if t is str:
        return NotImplemented
    try:
        mv = memoryview(obj)
    except TypeError:
        return NotImplemented
    if not mv.c_contiguous:
        mv = memoryview(mv.tobytes())
    if mv.ndim != 1 or mv.format != "B":
        mv = mv.cast("B") if mv.nbytes else memoryview(b"")
    segs.append(mv)
    return {"$seg": len(segs) - 1}


def _dumps_segments(msg: Json) -> tuple[bytes, list[memoryview]]:
    """`msg` as JSON whose binary parts are segment references, and the segments (`_place`
    adds the segment table of a segmented frame)."""
    prev = getattr(_tls, "segs", None)
    segs: list[memoryview] = []
    _tls.segs = segs
    try:
        body = _dumps_std(msg)
    finally:
        _tls.segs = prev
    return body, segs


def _place(json_body: bytes, segs: list[memoryview]) -> tuple[bytes, list[memoryview], int, list[int]]:
    """A segmented frame's message: `json_body` (an object) with its segment table appended.
    Segments of at least the arena's threshold are copied into the shared-memory arena while
    it has room, and listed as `[offset, length]`; the others travel in the frame. Returns the
    message, the segments for the frame, the frame body's size and the arena offsets taken."""
    arena = _arena[0]
    entries = []
    inline = segs
    placed: list[int] = []
    n = 0
    if arena is not None and any(s.nbytes >= arena.threshold for s in segs):
        inline = []
        for s in segs:
            off = arena.put(s) if s.nbytes >= arena.threshold else None
            if off is None:
                entries.append(str(s.nbytes))
                inline.append(s)
                n += s.nbytes
            else:
                entries.append("[%d,%d]" % (off, s.nbytes))
                placed.append(off)
    else:
        for s in segs:
            entries.append(str(s.nbytes))
            n += s.nbytes
    body = json_body[:-1] + b',"seg":[' + ",".join(entries).encode() + b"]}"
    return body, inline, 4 + len(body) + n, placed


def _unplace(placed: list[int]) -> None:
    """Frees arena regions `_place` took for a frame that is not sent."""
    if placed and _arena[0] is not None:
        _arena[0].release(placed)


def _default(obj: Any) -> Any:
    """The JSON encoder's fallback: the hooks, then (segments agreed) binary objects as
    segments, then `default_encoder`, else TypeError."""
    for hook in _hooks:
        value = hook(obj)
        if value is not NotImplemented:
            return value
    if _segments_on[0]:
        segs = getattr(_tls, "segs", None)
        if segs is None:
            if _is_binary(obj):
                raise _NeedSegments()
        else:
            value = _as_segment(obj, segs)
            if value is not NotImplemented:
                return value
    value = default_encoder(obj)
    if value is not NotImplemented:
        return value
    hint = ""
    if isinstance(obj, (bytes, bytearray, memoryview)):
        hint = " (bytes are not JSON: send a str, e.g. base64, or a list of ints)"
    raise TypeError(
        "Object of type %s is not JSON serializable%s; convert it in the tool, or teach the bridge "
        "with serve(encoder=...) or BaseAdapter.encode" % (_type_name(obj), hint)
    )


def _is_binary(obj: Any) -> bool:
    """Whether `obj` would travel as a segment (bytes-like, a buffer, a numpy array)."""
    t = type(obj)
    if t is bytes or t is bytearray or t is memoryview:
        return True
    np = sys.modules.get("numpy")
    if np is not None:
        if isinstance(obj, np.generic):
            return False
        if isinstance(obj, np.ndarray):
            return not obj.dtype.hasobject
    if t is str:
        return False
    try:
        memoryview(obj)
    except TypeError:
        return False
    return True


def _type_name(obj: Any) -> str:
    """The qualified name of ``obj``'s type, as error messages show it."""
    t = type(obj)
    mod = getattr(t, "__module__", None)
    return t.__qualname__ if mod in (None, "builtins") else "%s.%s" % (mod, t.__qualname__)


# The C encoder and scanner, built once: `json.dumps` and `json.loads` rebuild them (and run
# regexes) on every call, which costs more than the encoding itself for small messages.
try:
    from json.encoder import c_encode_basestring as _c_str  # type: ignore[attr-defined]
    from json.encoder import c_make_encoder as _c_make_encoder  # type: ignore[attr-defined]
    from json.scanner import c_make_scanner as _c_make_scanner  # type: ignore[attr-defined]
except ImportError:  # pragma: no cover - interpreters without the _json accelerator
    _c_make_encoder = _c_make_scanner = _c_str = None
# NaN and infinities are refused (allow_nan=False): they are not JSON and the host rejects them.
_encode = (
    _c_make_encoder(None, _default, _c_str, None, ":", ",", False, False, False)
    if _c_make_encoder is not None and _c_str is not None
    else None
)
_scan = _c_make_scanner(json.JSONDecoder()) if _c_make_scanner is not None else None


def _dumps_any(value: Json) -> tuple[bytes, list[memoryview]]:
    """`value` as JSON, and the segments its binary parts became (none when segments are not
    agreed: then binary parts are a TypeError, or lists for numpy)."""
    try:
        return _dumps(value), []
    except _NeedSegments:
        return _dumps_segments(value)


# orjson, when installed (and not refused with SNAKEPIT_BRIDGE_ORJSON=0), encodes and parses
# first; whatever it refuses or might write differently goes to the stdlib codec, so results
# are the same with it or without it (see `_dumps`, `_loads`).
# Imported at the first message, not with this module: the bootstrap imports this module with
# bytecode writing on (for the bridge's own cache), which must not reach orjson's package.
_orjson: Any = None
_orjson_opts = 0
_orjson_looked = False


def _find_orjson() -> None:
    global _orjson, _orjson_opts, _orjson_looked
    _orjson_looked = True
    if os.environ.get("SNAKEPIT_BRIDGE_ORJSON", "1") == "0":
        return
    try:
        import orjson
    except ImportError:
        return
    _orjson = orjson
    # datetimes and dataclasses go to the hooks and `default_encoder`, as with the stdlib encoder.
    _orjson_opts = orjson.OPT_PASSTHROUGH_DATETIME | orjson.OPT_PASSTHROUGH_DATACLASS


def _dumps(msg: Json) -> bytes:
    """Compact UTF-8 JSON. Raises TypeError/ValueError (incl. RecursionError for a cycle) when
    `msg` cannot be encoded.

    With orjson: used only when no encoder hook is set (it encodes enums and UUIDs itself, so a
    hook would not be asked), and its output kept only when it holds no ``null`` (it writes NaN
    and infinities as ``null``, which the stdlib encoder refuses). Anything it refuses (integers
    past 64 bits, non-string keys, what ``default`` refused, binary data to go as segments) is
    encoded again by the stdlib encoder, which raises what it raises without orjson."""
    if not _orjson_looked:
        _find_orjson()
    if _orjson is not None and not _hooks:
        try:
            out: bytes = _orjson.dumps(msg, default=_default, option=_orjson_opts)
        except Exception:
            pass
        else:
            if b"null" not in out:
                return out
    return _dumps_std(msg)


def _dumps_std(msg: Json) -> bytes:
    """`_dumps` with the stdlib encoder only (what `_dumps_segments` uses: its `_default`
    collects each binary object's buffer once, in order)."""
    if _encode is not None:
        return "".join(_encode(msg, 0)).encode("utf-8")
    return json.dumps(msg, separators=(",", ":"), ensure_ascii=False, allow_nan=False, default=_default).encode(
        "utf-8"
    )


def _loads(body: bytes | bytearray) -> Json:
    """Parses one frame body (UTF-8 JSON, no surrounding whitespace); raises ValueError.
    orjson parses first when installed; what it refuses (NaN, integers past 64 bits, lone
    surrogates) goes to the stdlib parser, which accepts or reports it as without orjson."""
    if not _orjson_looked:
        _find_orjson()
    if _orjson is not None:
        try:
            return _orjson.loads(body)
        except Exception:
            pass
    if _scan is not None:
        try:
            text = body.decode("utf-8")
            value, end = _scan(text, 0)
            if end == len(text):
                return value
        except (StopIteration, UnicodeDecodeError):
            pass
    return json.loads(body)  # the slow path gives the precise error, or accepts odd whitespace


#: What ``serve(adapter=...)`` takes: a ``BaseAdapter`` subclass, an instance, or a class name.
AdapterSpec = Union["type[BaseAdapter]", BaseAdapter, str, None]


def _find_adapter(
    adapter: AdapterSpec, namespace: dict[str, Any] | None
) -> type[BaseAdapter] | BaseAdapter | None:
    if adapter is None and namespace is not None:
        modname = namespace.get("__name__")
        found = [
            v
            for v in namespace.values()
            if isinstance(v, type)
            and issubclass(v, BaseAdapter)
            and v is not BaseAdapter
            and v.__module__ == modname
        ]
        if len(found) > 1:
            raise RuntimeError(
                "several BaseAdapter subclasses found (%s); choose one with --adapter"
                % ", ".join(c.__name__ for c in found)
            )
        return found[0] if found else None
    if isinstance(adapter, str):
        if namespace is None or adapter not in namespace:
            raise RuntimeError("adapter class %r not found" % adapter)
        found_cls: type[BaseAdapter] = namespace[adapter]
        return found_cls
    return adapter


def _collect_tools(
    instance: BaseAdapter | None, base: dict[str, Callable[..., Any]] | None = None
) -> dict[str, Callable[..., Any]]:
    tools = dict(_TOOLS if base is None else base)
    if instance is not None:
        for attr in dir(type(instance)):
            fn = getattr(type(instance), attr, None)
            name = getattr(fn, "__snakepit_tool__", None)
            if name is not None:
                tools[name] = getattr(instance, attr)
    return tools


def _tool_info(name: str, fn: Callable[..., Any]) -> Message:
    code = getattr(getattr(fn, "__func__", fn), "__code__", None)
    flags = getattr(code, "co_flags", 0)
    # CO_GENERATOR = 0x20, CO_ASYNC_GENERATOR = 0x200
    return {"name": name, "doc": _doc(fn), "stream": bool(flags & 0x220)}


def _doc(fn: Callable[..., Any]) -> str | None:
    """The cleaned docstring of `fn` (like inspect.getdoc, without importing inspect: it costs
    several milliseconds of every worker's start-up)."""
    doc = getattr(fn, "__doc__", None)
    if not isinstance(doc, str):
        return None
    lines = doc.expandtabs().split("\n")
    rest = [len(line) - len(line.lstrip()) for line in lines[1:] if line.strip()]
    margin = min(rest) if rest else 0
    out = [lines[0].strip()] + [line[margin:].rstrip() for line in lines[1:]]
    return "\n".join(out).strip() or None


def _invoke(fn: Callable[..., Any], args: Json, ctx: Context | None = None) -> Any:
    kw = {"ctx": ctx} if ctx is not None else {}
    if args is None:
        return fn(**kw)
    if isinstance(args, dict):
        if kw:
            args = dict(args, **kw)
        return fn(**args)
    if not isinstance(args, list):
        args = [args]
    if kw:
        # A positional `ctx` parameter (`def f(ctx, x)`) takes its place among the arguments.
        pos = _ctx_position(fn)
        if 0 <= pos <= len(args):
            return fn(*args[:pos], ctx, *args[pos:])
    return fn(*args, **kw)


def _ctx_position(fn: Callable[..., Any]) -> int:
    """The index of `fn`'s `ctx` among its positional parameters (past `self`), or -1."""
    code = getattr(getattr(fn, "__func__", fn), "__code__", None)
    if code is None:
        return -1
    names: tuple[str, ...] = code.co_varnames[: code.co_argcount]
    if "ctx" not in names:
        return -1
    return names.index("ctx") - (1 if hasattr(fn, "__self__") else 0)


def _error(exc: BaseException) -> Message:
    import traceback  # only on the error path: it costs ~2 ms of start-up

    type_name = getattr(exc, "type_name", None) or type(exc).__name__
    return {
        "type": type_name,
        "message": str(exc),
        "traceback": traceback.format_exc(),
    }


def _our_versions() -> tuple[int, ...]:
    override = os.environ.get("SNAKEPIT_BRIDGE_VERSIONS")
    return tuple(int(v) for v in override.split(",")) if override else PROTOCOL_VERSIONS


def _pick_version(offered: list[Any]) -> tuple[int | None, tuple[int, ...]]:
    ours = _our_versions()
    common = [v for v in offered if v in ours]
    return (max(common), ours) if common else (None, ours)


def serve(
    adapter: AdapterSpec = None,
    namespace: dict[str, Any] | None = None,
    *,
    encoder: Encoder | None = None,
) -> None:
    """Runs the worker loop until the host closes stdin or sends ``shutdown``.

    ``adapter`` may be a ``BaseAdapter`` subclass, an instance, or a class name in ``namespace``;
    by default the one subclass defined in the calling script is used, if any. Module-level
    ``@tool`` functions are always served.

    ``encoder`` converts result types the JSON encoder does not know: it gets the object and
    returns a JSON-encodable stand-in (which may itself hold such objects) or ``NotImplemented``.
    The adapter's ``encode()`` is asked first, then ``encoder``, then :func:`default_encoder`;
    what none of them converts is answered with a worker error of type ``TypeError`` naming the
    object's type.
    """
    _state["served"] = True
    claim_stdio()
    if _state.get("zygote"):
        from . import _zygote

        _state["zygote"] = False
        _preload_in_zygote(adapter, namespace)
        _zygote.run(_state)  # returns only in a forked worker, holding its own protocol fds
    if namespace is None and adapter is None:
        main = sys.modules.get("__main__")
        namespace = vars(main) if main is not None else None
    chan = _Channel(_state["in_fd"], _state["out_fd"])
    try:
        _serve(chan, adapter, namespace, encoder=encoder)
    except ProtocolError as e:
        _log("protocol error: %s; exiting" % e)
        sys.exit(2)


def _preload_in_zygote(adapter: AdapterSpec, namespace: dict[str, Any] | None) -> None:
    """Zygote mode: runs the adapter's ``preload()`` once, before any fork (the forked workers
    then skip it), and refuses to fork when a thread is alive: its locks would be copied into
    every worker, held by nobody."""
    if namespace is None and adapter is None:
        main = sys.modules.get("__main__")
        namespace = vars(main) if main is not None else None
    cls = _find_adapter(adapter, namespace)
    target = cls if isinstance(cls, type) else type(cls) if cls is not None else None
    if target is not None and getattr(target, "preload", None) is not None:
        target.preload()
    _state["preloaded"] = True
    if threading.active_count() != 1:
        names = sorted(t.name for t in threading.enumerate() if t is not threading.main_thread())
        _log(
            "zygote: %d thread(s) alive before the first fork (%s): a forked worker would inherit "
            "their locks without them. Start threads in setup(), which runs in each worker, not "
            "at import or in preload()" % (len(names), ", ".join(names))
        )
        sys.exit(78)


def _watch_parent() -> None:
    """Exits the worker if its parent changes (the host or its shepherd died): a fallback for
    PDEATHSIG, which the host arms but which a worker cannot count on everywhere."""
    parent = os.getppid()
    stop = threading.Event()

    def run() -> None:
        # The host's cancel signal must reach the main thread, which runs the calls of the
        # serial profile: a process-directed signal goes to any thread that does not block it,
        # and one taken by this thread would not interrupt the main thread's blocking wait
        # (`select` in an event loop, `time.sleep` in a tool), so the cancel would sit unseen.
        signum = _cancel_signum()
        if signum is not None:
            signal.pthread_sigmask(signal.SIG_BLOCK, {signum})
        while not stop.wait(1.0):
            if os.getppid() != parent:
                _log("parent process %d is gone; exiting" % parent)
                os._exit(70)

    t = threading.Thread(target=run, name="snakepit-parent-watch", daemon=True)
    t.start()


def _package_dir() -> str:
    return os.path.dirname(os.path.abspath(__file__))


def _read_hello(chan: _Channel) -> Message | None:
    """The host's `hello` (None at EOF); a ProtocolError if it is anything else or malformed."""
    msg = _next_message(chan)
    if msg is None:
        return None
    if msg["t"] != "hello":
        raise ProtocolError("expected hello, got %r" % msg["t"])
    for key, kind in (("max_frame", int), ("max_in_flight", int), ("busy_poll_us", (int, float))):
        value = msg.get(key)
        if value is not None and (not isinstance(value, kind) or isinstance(value, bool) or value < 0):
            raise ProtocolError("hello: %s is %r, not a non-negative number" % (key, value))
    versions = msg.get("versions")
    if not isinstance(versions, list):
        raise ProtocolError("hello: versions is %r, not a list" % (versions,))
    transport = msg.get("transport")
    if transport is not None and not isinstance(transport, dict):
        raise ProtocolError("hello: transport is %r, not an object" % (transport,))
    return msg


def _serve(
    chan: _Channel,
    adapter: AdapterSpec,
    namespace: dict[str, Any] | None,
    *,
    encoder: Encoder | None = None,
    tools: dict[str, Callable[..., Any]] | None = None,
    watch_parent: bool = True,
) -> None:
    """Handshake, then the dispatch loop, on `chan`. `tools` replaces the module-level
    registry (in-process hosts); the per-serve state is reset on the way out."""
    try:
        _serve_inner(chan, adapter, namespace, encoder, tools, watch_parent)
    finally:
        T = _threaded[0]
        _threaded[0] = None
        if T is not None:
            T.stop()
        B = _busy[0]
        _busy[0] = None
        if B is not None:
            B.stop.set()
            B.thread.join(1)
        del _hooks[:]
        del _stash[:]
        _segments_on[0] = False
        _arena[0] = None
        _session_cache.clear()
        _run.id = None
        _run.pending = False
        _run.task = None
        _run.sig = None
        del _inbox[:]
        del _pipe_sigs[:]
        _calls_read[0] = 0


def _serve_inner(
    chan: _Channel,
    adapter: AdapterSpec,
    namespace: dict[str, Any] | None,
    encoder: Encoder | None,
    base_tools: dict[str, Callable[..., Any]] | None,
    watch_parent: bool,
) -> None:
    if watch_parent:
        _watch_parent()
    hello = _read_hello(chan)
    if hello is None:
        return
    chan.max_frame = int(hello.get("max_frame") or chan.max_frame)
    chan.busy_poll(min(float(hello.get("busy_poll_us") or 0), 10_000.0) / 1e6)
    version, ours = _pick_version(hello["versions"])
    if version is None:
        chan.send(
            {
                "t": "refuse",
                "reason": "snakepit_bridge %s (%s) speaks protocol versions %s, the host offered %s"
                % (__version__, _package_dir(), list(ours), hello.get("versions")),
                "versions": list(ours),
                "bridge": BRIDGE,
            }
        )
        return
    config = hello.get("config")
    cls = _find_adapter(adapter, namespace)
    instance = None
    if cls is not None:
        preload = getattr(cls if isinstance(cls, type) else type(cls), "preload", None)
        if preload is not None and not _state.get("preloaded"):
            preload()  # a cold worker
        instance = cls(config) if isinstance(cls, type) else cls
        if config is not None:
            instance.config = config
        instance.setup()
    if instance is not None and type(instance).encode is not BaseAdapter.encode:
        _hooks.append(instance.encode)
    if encoder is not None:
        _hooks.append(encoder)
    tools = _collect_tools(instance, base_tools)
    n = max(1, int(hello.get("max_in_flight") or 1))
    transport = hello.get("transport") or {}
    server = None
    ready: Message = {
        "t": "ready",
        "version": version,
        "pid": os.getpid(),
        "tools": [_tool_info(n_, f) for n_, f in sorted(tools.items())],
        "max_in_flight": n,
        "bridge": BRIDGE,
    }
    if hello.get("segments") is True and os.environ.get("SNAKEPIT_BRIDGE_SEGMENTS", "1") != "0":
        ready["segments"] = True
    T = None
    if transport.get("kind") == "grpc":
        try:
            from . import _grpc
        except ImportError as e:
            _log(
                "the gRPC transport needs grpcio and protobuf (%s); run `cargo xtask setup` and use "
                "the repository's .venv/bin/python, or pip install grpcio protobuf" % e
            )
            sys.exit(3)
        T = _Threaded(chan, n)
        _threaded[0] = T
        server = _grpc.start(tools, transport, n + 4, chan.max_frame, T)
        ready["address"] = "unix:" + transport["socket"]
        if hello.get("busy_ping") is True:
            ready["busy_ping"] = True  # the main loop reads the pipe whatever the calls do
    else:
        _run.signum = _install_cancel_signal() if n == 1 else None
        ready["cancel_signal"] = _run.signum
        depth = _pipeline_depth(hello) if n == 1 else 1
        if depth > 1 and _run.signum is not None:
            # The running call must stay interruptible: a signal per position modulo depth + 1
            # (a signal sent for a call just as it is answered may land in any of the `depth`
            # calls sent after it; they all have other signals).
            sigs = _install_pipeline_signals(depth + 1)
            if sigs:
                ready["cancel_signals"] = sigs
                _pipe_sigs[:] = sigs
            else:
                depth = 1
        if depth > 1:
            ready["pipeline_depth"] = depth
        if hello.get("busy_ping") is True and os.environ.get("SNAKEPIT_BRIDGE_BUSY_PING", "1") != "0":
            # The thread profile's main loop reads the pipe whatever the calls do; the serial
            # one needs a reader for the time a call runs.
            ready["busy_ping"] = True
            if n == 1:
                _busy[0] = _BusyReader(chan)
    offer = hello.get("shm")
    if offer is not None and ready.get("segments"):
        _map_arena(offer, ready)
    elif offer is not None:
        _close_arena_fd(offer)  # segments refused: the arena is of no use
    chan.send(ready)
    if ready.get("segments"):
        chan.segments = True
        _segments_on[0] = True
    try:
        if T is not None:
            _loop_threaded(chan, tools, n, T)
        elif n > 1:
            _loop_threaded(chan, tools, n)
        else:
            _loop(chan, tools, pipelined=ready.get("pipeline_depth", 1) > 1)
    finally:
        if server is not None:
            # Calls in flight get a second to finish, then are aborted; wait (bounded) until
            # their handlers have returned, before the serve state is reset under them.
            server.stop(1).wait(5)
        if instance is not None:
            try:
                instance.teardown()
            except Exception:
                _log("teardown failed:\n" + _format_exc())


def _map_arena(offer: Any, ready: Message) -> None:
    """Maps the shared-memory arena `hello.shm` offers (a forked worker got its descriptor
    from the zygote); announces it in `ready`. Any trouble: logged, and segments take the pipe."""
    fd = _state.get("shm_fd")
    if fd is None and type(offer) is dict:
        fd = offer.get("fd")
    try:
        if type(offer) is not dict:
            raise ValueError("hello.shm is %r, not an object" % (offer,))
        if os.environ.get("SNAKEPIT_BRIDGE_SHM", "1") == "0":
            raise ValueError("SNAKEPIT_BRIDGE_SHM=0")
        from . import _shm

        _arena[0] = _shm.Arena(fd, offer.get("size"), offer.get("split"), offer.get("threshold"))
        ready["shm"] = True
    except (ValueError, OSError, ImportError) as e:
        _log("shared memory not used: %s" % e)
        _close_arena_fd(offer)


def _close_arena_fd(offer: Any) -> None:
    """Closes the offered arena's descriptor when the bridge does not map it. Only if it is a
    memfd: `hello.shm.fd` is the host's word, and a wrong number must not close our own pipes."""
    fd = _state.get("shm_fd")
    if fd is None and type(offer) is dict:
        fd = offer.get("fd")
    if type(fd) is not int or fd < 0:
        return
    try:
        if not os.readlink("/proc/self/fd/%d" % fd).startswith("/memfd:snakepit-arena"):
            return
        os.close(fd)
    except OSError:
        pass


def _loop(chan: _Channel, tools: dict[str, Callable[..., Any]], pipelined: bool = False) -> None:
    inbox = _inbox
    while True:
        msg = inbox.pop(0) if inbox else _next_message(chan)
        if msg is None:
            return
        t = msg["t"]
        if t == "call":
            if pipelined:
                # A cancel for this call may be right behind it: read what the host has sent
                # with the call back at the head of the inbox, where a cancel finds it.
                inbox.insert(0, msg)
                _read_ahead(chan)
                if not inbox or inbox[0] is not msg:
                    continue  # cancelled while it waited, and answered so
                del inbox[0]
            _call(chan, tools, msg)
        elif t == "ping":
            chan.send({"t": "pong", "id": msg.get("id")})
        elif t == "shutdown":
            return
        elif t in ("cancel", "credit"):
            pass  # calls run one at a time: these are for a call already answered
        else:
            _log("ignoring unknown message type %r" % t)


_wakeup: list[Any] = []  # the write end of the serial event loop's signal wakeup socket


def _new_loop() -> AbstractEventLoop:
    """The serial profile's event loop, with a socket pair whose read end it watches (drained
    and ignored): written to by the C signal handler, it wakes the loop for the Python one."""
    import asyncio
    import socket

    loop = asyncio.new_event_loop()
    r, w = socket.socketpair()
    r.setblocking(False)
    w.setblocking(False)

    def drain() -> None:
        try:
            while r.recv(4096):
                pass
        except OSError:
            pass

    loop.add_reader(r.fileno(), drain)
    _wakeup.append(w)
    _wakeup.append(r)  # kept alive with the loop
    return loop


_GEN_TYPES = (types.GeneratorType,)
_AGEN_TYPES = (types.AsyncGeneratorType,)
_event_loop: list[AbstractEventLoop] = []


def _loop_run(awaitable: Awaitable[Any], cancellable: bool = True) -> Any:
    """Runs an awaitable on the bridge's event loop (created on first use: asyncio is only
    imported by workers that have async tools). A cancel of the call cancels it (unless not
    `cancellable`: a generator's `aclose()` must run to its end)."""
    T = _threaded[0]
    if T is not None:
        return T.run_async(awaitable, cancellable)
    import asyncio

    if not _event_loop:
        _event_loop.append(_new_loop())
    loop = _event_loop[0]
    task = loop.create_task(_as_coro(awaitable))
    if cancellable:
        _run.task = (loop, task)
    # A signal that lands just before the loop blocks in `select` would only set Python's flag
    # and go unseen until something else woke the loop: its wakeup fd wakes it (a classic
    # race; asyncio's own signal handling does the same).
    wakeup = _wakeup[0] if _wakeup and threading.current_thread() is threading.main_thread() else None
    old = signal.set_wakeup_fd(wakeup.fileno(), warn_on_full_buffer=False) if wakeup is not None else None
    try:
        result = loop.run_until_complete(task)
    except asyncio.CancelledError:
        raise Cancelled("call cancelled by the host")
    finally:
        if wakeup is not None and old is not None:
            signal.set_wakeup_fd(old)
        if cancellable:
            _run.task = None
    if _run.pending:
        _frame_boundary()  # a cancel signal that came as the task ended
    return result


def _is_stream(value: Any) -> bool:
    return isinstance(value, _GEN_TYPES) or isinstance(value, _AGEN_TYPES)


def _next_item(gen: Any) -> Any:
    """The next item of a sync or async generator; raises StopIteration at the end."""
    if isinstance(gen, _AGEN_TYPES):
        try:
            return _loop_run(gen.__anext__())
        except StopAsyncIteration:
            raise StopIteration
    T = _threaded[0]
    if T is None:
        return next(gen)
    rid = getattr(_tls, "rid", None)
    T.expose(rid)  # the generator's own code runs now
    try:
        return next(gen)
    finally:
        T.unexpose(rid)


def _close(gen: Any) -> None:
    try:
        if isinstance(gen, _AGEN_TYPES):
            _loop_run(gen.aclose(), cancellable=False)
        else:
            gen.close()
    except BaseException as e:  # a finally block that raises must not take the worker down
        _log("closing a generator raised %r" % (e,))


def _collect(gen: Any) -> list[Any]:
    out = []
    while True:
        try:
            out.append(_next_item(gen))
        except StopIteration:
            return out


def _not_json(rid: Any, e: BaseException) -> bytes:
    """The `error` for `rid` whose result could not be encoded (`e` says why)."""
    if isinstance(e, RecursionError):
        detail = "it is nested too deeply or contains a reference cycle"
    else:
        detail = str(e)
    return _dumps(
        {
            "t": "error",
            "id": rid,
            "error": {"type": "TypeError", "message": "result is not JSON-serialisable: %s" % detail},
        }
    )


#: A frame body: JSON bytes, or (JSON bytes, segments) for a segmented frame.
Body = Union[bytes, "tuple[bytes, list[memoryview]]"]


def _too_large(rid: Any, size: int, limit: int) -> bytes:
    return _dumps(
        {
            "t": "error",
            "id": rid,
            "error": {"type": "FrameTooLarge", "message": "message of %d bytes exceeds max_frame %d" % (size, limit)},
        }
    )


def _encode_reply(chan: _Channel, reply: Message, rid: Any) -> tuple[Body, bool]:
    """Encodes a message for `rid`; returns (body, ok). When the message cannot be sent (not
    JSON-serialisable, over max_frame), body is an `error` for `rid` instead and ok is False.
    A message holding binary data (segments agreed) is a segmented body."""
    try:
        body = _dumps(reply)
    except _NeedSegments:
        try:
            json_body, segs = _dumps_segments(reply)
        except Exception as e:
            return _not_json(rid, e), False
        json_body, segs, size, placed = _place(json_body, segs)
        if size > chan.max_frame:
            _unplace(placed)
            return _too_large(rid, size, chan.max_frame), False
        return (json_body, segs), True
    except Exception as e:  # TypeError, ValueError (NaN), RecursionError, or an encoder hook's
        return _not_json(rid, e), False
    if len(body) > chan.max_frame:
        return _too_large(rid, len(body), chan.max_frame), False
    return body, True


def _call(chan: _Channel, tools: dict[str, Callable[..., Any]], msg: Message) -> None:
    body = _answer(chan, tools, msg)
    maps = msg.pop("$maps", None)
    if maps is not None:
        body = _let_go(msg, body, maps)
    if body is not None:
        chan.write(body)


def _let_go(msg: Message, body: Body | None, maps: list[Any]) -> Body | None:
    """Lets go of a call's argument mappings in the arena before its last message goes out.
    That message's segments that travel in the frame are copied first (they may be views of
    the arguments); a mapping something still views makes the message say `keep`, and the
    host then never reuses its region."""
    msg.pop("$segs", None)
    json_body: bytes | None = None
    copies: list[memoryview] | None = None  # a segmented frame's segments (maybe none inline)
    if isinstance(body, tuple):
        json_body = body[0]
        copies = [memoryview(s.tobytes()) for s in body[1]]
    elif body is not None:
        json_body = body
    body = None  # our last reference to the segments as the tool returned them
    keep = _arena[0] is not None and not _arena[0].let_go(maps)
    if json_body is None:
        return None
    if keep:
        json_body = json_body[:-1] + b',"keep":true}'
    return json_body if copies is None else (json_body, copies)


def _answer(chan: _Channel, tools: dict[str, Callable[..., Any]], msg: Message) -> Body | None:
    """Runs a call; returns its last message (None: already written). Chunks of a stream are
    written as they come."""
    rid = msg.get("id")
    cmd = msg.get("cmd")
    window = msg.get("stream")
    fn = tools.get(cmd) if type(cmd) is str else None
    if fn is None:
        reply = {
            "t": "error",
            "id": rid,
            "error": {"type": "UnknownCommand", "message": "no tool named %r" % (cmd,)},
        }
        return _encode_reply(chan, reply, rid)[0]
    T = _threaded[0]
    try:
        _run.pending = False
        if _pipe_sigs:
            pos = msg.get("$pos")
            _run.sig = _pipe_sigs[pos % len(_pipe_sigs)] if type(pos) is int else -1
        _run.id = rid
        try:
            args = msg.get("args")
            segs = msg.get("$segs")
            if segs is not None:
                args = _bind_segments(args, segs)
            wants_ctx = _wants_ctx(fn)
            if T is not None:
                T.expose(rid)  # the tool's own code runs now: a cancel is raised in it
            try:
                if type(args) is dict and not wants_ctx:
                    result = fn(**args)  # the common case, without _invoke's generality
                elif not wants_ctx and args is not None and type(args) is not list:
                    result = fn(args)  # one value (raw bytes, say): what _invoke would do
                else:
                    ctx = Context(chan, rid, msg.get("session")) if wants_ctx else None
                    result = _invoke(fn, args, ctx)
            finally:
                if T is not None:
                    T.unexpose(rid)
            streaming = False
            if type(result) not in _PLAIN:  # one set lookup rules out coroutines and generators
                if isinstance(result, types.CoroutineType):
                    result = _loop_run(result)
                streaming = _is_stream(result)
            if streaming:
                if window:
                    return _stream(chan, rid, result, _count(window))
                result = _collect(result)
            elif window:
                # A plain tool called as a stream: one chunk, then the end.
                failed = _write_chunk(chan, rid, result)
                return failed if failed is not None else _dumps({"t": "end", "id": rid})
        finally:
            _run.id = None
        body = _result_body(chan, rid, result)
    except Cancelled as e:
        if T is not None:
            T.unexpose(rid)  # in case the Cancelled fired before the `finally` above did
        reply = {"t": "error", "id": rid, "error": {"type": "Cancelled", "message": str(e) or "cancelled"}}
        body = _encode_reply(chan, reply, rid)[0]
    except Exception as e:
        body = _encode_reply(chan, {"t": "error", "id": rid, "error": _error(e)}, rid)[0]
    return body


def _bind_segments(value: Any, segs: list[memoryview]) -> Any:
    """`value` with each segment reference `{"$seg": i}` replaced by segment `i` (a read-only
    memoryview over the frame: no copy), or by a numpy array over it when the reference
    carries `dtype` and `shape` and numpy is installed."""
    if type(value) is dict:
        i = value.get("$seg")
        if type(i) is int:
            if not 0 <= i < len(segs):
                raise BadSegment("segment %d referred to, %d sent" % (i, len(segs)))
            if "dtype" in value and "shape" in value:
                try:
                    import numpy as np
                except ImportError:
                    return segs[i]
                return np.frombuffer(segs[i], dtype=value["dtype"]).reshape(value["shape"])
            return segs[i]
        return {k: _bind_segments(v, segs) for k, v in value.items()}
    if type(value) is list:
        return [_bind_segments(v, segs) for v in value]
    return value


class BadSegment(ValueError):
    """A segment reference to a segment the message does not carry."""


# Result types that are neither coroutines nor generators (checked first: it is one set lookup).
_PLAIN = frozenset((dict, list, str, int, float, bool, type(None), tuple, bytes, bytearray, memoryview))


def _result_body(chan: _Channel, rid: Any, result: Any) -> Body:
    """The `result` message for `rid`, its envelope written by hand around the encoded result
    (an integer id, the usual case); `_encode_reply` otherwise, and for its error cases."""
    if type(rid) is int:
        t = type(result)
        if (t is memoryview or t is bytes or t is bytearray) and _segments_on[0] and not _hooks:
            # Raw bytes (`execute_bytes`): the envelope by hand, the buffer as the one segment.
            mv = memoryview(result)
            if mv.c_contiguous and mv.format == "B" and mv.ndim == 1:
                arena = _arena[0]
                if arena is None or mv.nbytes < arena.threshold:
                    json_body = b'{"t":"result","id":%d,"ok":{"$seg":0},"seg":[%d]}' % (rid, mv.nbytes)
                    if 4 + len(json_body) + mv.nbytes <= chan.max_frame:
                        return (json_body, [mv])
                else:
                    json_body, segs, size, placed = _place(b'{"t":"result","id":%d,"ok":{"$seg":0}}' % rid, [mv])
                    if size <= chan.max_frame:
                        return (json_body, segs)
                    _unplace(placed)
        try:
            body = b'{"t":"result","id":%d,"ok":%s}' % (rid, _dumps(result))
        except _NeedSegments:
            try:
                ok, segs = _dumps_segments(result)
            except Exception as e:
                return _not_json(rid, e)
            json_body, segs, size, placed = _place(b'{"t":"result","id":%d,"ok":%s}' % (rid, ok), segs)
            if size > chan.max_frame:
                _unplace(placed)
                return _too_large(rid, size, chan.max_frame)
            return (json_body, segs)
        except Exception as e:  # not JSON: an error (without running the encoders again)
            return _not_json(rid, e)
        if len(body) <= chan.max_frame:
            return body
    return _encode_reply(chan, {"t": "result", "id": rid, "ok": result}, rid)[0]


def _write_chunk(chan: _Channel, rid: Any, item: Any) -> Body | None:
    """Writes one `chunk` and returns None; when it cannot be sent, returns the `error` for
    `rid` to send in its place as the call's last message (not written yet). Encoding (which
    may put segments in the arena) and writing happen with no cancel in between: placed
    regions would be lost with an unsent frame."""
    _run.atomic += 1
    try:
        body, ok = _encode_reply(chan, {"t": "chunk", "id": rid, "data": item}, rid)
        if ok:
            chan.write(body)
    finally:
        _run.atomic -= 1
    if _run.pending:
        _frame_boundary()
    return None if ok else body


def _stream(chan: _Channel, rid: Any, gen: Any, credit: int) -> Body:
    """Sends a generator's items as `chunk`s, never more than the host's credit ahead; returns
    the last message (`end`, or an `error`). The host grants more credit as its consumer takes
    chunks; `cancel` (or the cancel signal) closes the generator, so its `finally` blocks
    run."""
    T = _threaded[0]
    try:
        while True:
            try:
                item = _next_item(gen)
            except StopIteration:
                break
            credit += _stashed_credit(rid)
            if credit <= 0 and T is not None:
                credit += T.wait_credit(rid)
            while credit <= 0:
                m = _await_frame(chan, rid, lambda m: m.get("t") == "credit" and m.get("id") == rid)
                credit += _count(m.get("n"))
            failed = _write_chunk(chan, rid, item)
            if failed is not None:
                _close(gen)
                return failed
            credit -= 1
        return _dumps({"t": "end", "id": rid})
    except Cancelled as e:
        if T is not None:
            T.unexpose(rid)  # in case the Cancelled fired before `_next_item`'s `finally` did
        _close(gen)
        return _dumps({"t": "error", "id": rid, "error": {"type": "Cancelled", "message": str(e) or "cancelled"}})
    except Exception as e:
        _close(gen)
        return _encode_reply(chan, {"t": "error", "id": rid, "error": _error(e)}, rid)[0]


def protocol_fd() -> int:
    """The real protocol output fd (for fault-injection tests only)."""
    fd: int = _state["out_fd"]
    return fd
