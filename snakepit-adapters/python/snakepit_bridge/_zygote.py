"""The zygote: imports the worker's code once, then forks a fresh worker per request.

Started by the host as ``python -m snakepit_bridge --zygote (--script PATH | --module NAME)``
with fd 0 a ``SOCK_SEQPACKET`` control socket. Each packet is one JSON message:

host -> zygote
    ``{"op": "fork", "worker": "3.1", "env": {...}}`` with three descriptors attached
    (SCM_RIGHTS): the new worker's protocol input, protocol output, and stderr.
    ``{"op": "shutdown"}`` (or EOF): exit; the workers die with us (PDEATHSIG).
zygote -> host
    ``{"op": "ready", "pid": P}`` once the user's code is imported;
    ``{"op": "forked", "worker": W, "pid": P}`` or ``{"op": "fork_failed", "worker": W, "error": E}``;
    ``{"op": "exited", "pid": P, "code": C}`` / ``{"op": "exited", "pid": P, "signal": S}``
    when a worker ends (the zygote is its parent, so only the zygote can reap it).

Fork safety: the zygote is single-threaded and forks from its main loop, before any thread,
event loop or gRPC object exists in it. Code imported at module level is shared copy-on-write
by every worker; it must not start threads (BLAS thread pools, gRPC channels) at import time.
``setup()`` still runs in each worker, after the fork; the adapter's ``preload()`` runs once,
here, before the first fork (``_core._preload_in_zygote``), and the zygote refuses to start while
a Python thread is alive.

No orphans: every worker gets its own process group, ``PR_SET_PDEATHSIG(SIGKILL)`` tied to the
zygote, and becomes a child subreaper, so its orphaned descendants stay in its subtree while it
lives. The zygote is a subreaper too: whatever a dead worker leaves behind is re-parented to it
and killed at once (a live worker's descendants never reach it). The host supervises the zygote
itself under a shepherd, like any worker.
"""

from __future__ import annotations

import ctypes
import gc
import json
import os
import select
import signal
import socket
import sys
from typing import Any

PR_SET_PDEATHSIG = 1
PR_SET_CHILD_SUBREAPER = 36
_MAX_PACKET = 1 << 20

_libc: ctypes.CDLL | None = None


def _prctl(option: int, arg: int) -> None:
    if _libc is None:
        raise RuntimeError("libc is not loaded: run() loads it before any prctl")
    if _libc.prctl(option, arg, 0, 0, 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, "prctl(%d): %s" % (option, os.strerror(err)))


def _send(ctrl: socket.socket, msg: dict[str, Any]) -> None:
    ctrl.send(json.dumps(msg, separators=(",", ":")).encode("utf-8"))


def _children() -> list[int]:
    try:
        with open("/proc/self/task/%d/children" % os.getpid()) as f:
            return [int(p) for p in f.read().split()]
    except OSError:
        return []


def _reap(ctrl: socket.socket, workers: dict[int, Any]) -> None:
    """Reaps every exited child, reports the workers among them, and kills any stray: a
    process re-parented to us from a dead worker's subtree."""
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            break
        except InterruptedError:
            continue
        if pid == 0:
            break
        if workers.pop(pid, None) is not None:
            msg: dict[str, Any] = {"op": "exited", "pid": pid}
            if os.WIFSIGNALED(status):
                msg["signal"] = os.WTERMSIG(status)
            else:
                msg["code"] = os.waitstatus_to_exitcode(status)
            _send(ctrl, msg)
    for pid in _children():
        if pid not in workers:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def run(state: dict[str, Any]) -> None:
    """Runs the zygote loop. Returns only in a freshly forked worker, with ``state["in_fd"]``
    and ``state["out_fd"]`` set to its own protocol descriptors; never returns in the zygote."""
    global _libc
    _libc = ctypes.CDLL(None, use_errno=True)
    _prctl(PR_SET_CHILD_SUBREAPER, 1)
    ctrl = socket.socket(fileno=state["in_fd"])
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_r, False)
    os.set_blocking(wake_w, False)
    signal.signal(signal.SIGCHLD, lambda *_: None)
    signal.set_wakeup_fd(wake_w)
    workers: dict[int, Any] = {}  # pid -> the host's worker name
    me = os.getpid()
    # Objects that exist now are never collected: the collector then leaves their pages alone
    # and the workers keep sharing them.
    gc.collect()
    gc.freeze()
    _send(ctrl, {"op": "ready", "pid": me})
    poller = select.poll()
    poller.register(ctrl.fileno(), select.POLLIN)
    poller.register(wake_r, select.POLLIN)
    while True:
        try:
            events = poller.poll()
        except InterruptedError:
            continue
        for fd, _ in events:
            if fd == wake_r:
                try:
                    while os.read(wake_r, 512):
                        pass
                except BlockingIOError:
                    pass
                _reap(ctrl, workers)
                continue
            try:
                data, fds, _, _ = socket.recv_fds(ctrl, _MAX_PACKET, 8)
            except InterruptedError:
                continue
            except OSError:
                data, fds = b"", []
            if not data:
                os._exit(0)  # the host is gone or stopping us: our workers die with us
            try:
                req = json.loads(data)
            except ValueError:
                req = {}
            op = req.get("op")
            if op == "shutdown":
                os._exit(0)
            if op != "fork" or len(fds) not in (3, 4):
                for f in fds:
                    os.close(f)
                _send(ctrl, {"op": "fork_failed", "worker": req.get("worker"), "error": "bad fork request"})
                continue
            sys.stdout.flush()
            sys.stderr.flush()
            try:
                pid = os.fork()
            except OSError as e:
                for f in fds:
                    os.close(f)
                _send(ctrl, {"op": "fork_failed", "worker": req.get("worker"), "error": str(e)})
                continue
            if pid == 0:
                _become_worker(state, ctrl, (wake_r, wake_w), fds, req, me)
                return
            for f in fds:
                os.close(f)
            workers[pid] = req.get("worker")
            _send(ctrl, {"op": "forked", "worker": req.get("worker"), "pid": pid})


def _become_worker(
    state: dict[str, Any],
    ctrl: socket.socket,
    wake: tuple[int, int],
    fds: list[int],
    req: dict[str, Any],
    zygote: int,
) -> None:
    signal.set_wakeup_fd(-1)
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    try:
        os.setpgid(0, 0)
        _prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() != zygote:
            os._exit(70)  # the zygote died between fork and prctl
        _prctl(PR_SET_CHILD_SUBREAPER, 1)
    except OSError:
        os._exit(71)
    in_fd, out_fd, err_fd = fds[:3]
    if len(fds) == 4:
        state["shm_fd"] = fds[3]  # the shared-memory arena (hello.shm names the host's number)
    os.dup2(err_fd, 2)
    os.dup2(2, 1)
    os.close(err_fd)
    ctrl.close()
    for f in wake:
        os.close(f)
    os.set_inheritable(in_fd, False)
    os.set_inheritable(out_fd, False)
    state["in_fd"] = in_fd
    state["out_fd"] = out_fd
    for k, v in (req.get("env") or {}).items():
        os.environ[str(k)] = str(v)
