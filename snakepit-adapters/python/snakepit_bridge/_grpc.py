"""gRPC mode of the bridge: serves ``snakepit.v1.Worker`` on the Unix socket the host chose.

Needs ``grpcio`` and ``protobuf`` (``cargo xtask setup`` installs them into the repository's
``.venv``). The stdio pipe stays the control channel (handshake, ping, shutdown, host calls).
"""

import json
import os
import sys
import threading
import types

_PROTO = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_proto")
if _PROTO not in sys.path:
    sys.path.insert(0, _PROTO)

import grpc  # noqa: E402
from snakepit.v1 import snakepit_pb2 as pb  # noqa: E402
from snakepit.v1 import snakepit_pb2_grpc as pbg  # noqa: E402

from . import _core  # noqa: E402

TOKEN_HEADER = "x-snakepit-token"


class _NoTool(Exception):
    """No tool by that name (kept apart from the tools' own LookupErrors)."""


def _werr(d):
    return pb.WorkerError(type=d.get("type") or "", message=d.get("message") or "", traceback=d.get("traceback") or "")


class _Servicer(pbg.WorkerServicer):
    def __init__(self, tools, token, threaded):
        self.tools = tools
        self.token = token
        self.T = threaded

    def _auth(self, context):
        if dict(context.invocation_metadata()).get(TOKEN_HEADER) != self.token:
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong snakepit token")

    def _enter(self, rid):
        with self.T.lock:
            self.T.running[rid] = threading.get_ident()
        _core._tls.rid = rid

    def _leave(self, rid):
        with self.T.lock:
            self.T.running.pop(rid, None)
            self.T.cancelled.discard(rid)

    def _start(self, request):
        fn = self.tools.get(request.command)
        if fn is None:
            raise _NoTool("no tool named %r" % request.command)
        args = json.loads(request.args) if request.args else None
        ctx = _core.Context(self.T.chan, request.id, request.session or None) if _core._wants_ctx(fn) else None
        result = _core._invoke(fn, args, ctx)
        if isinstance(result, types.CoroutineType):
            result = _core._loop_run(result)
        return result

    def Execute(self, request, context):
        self._auth(context)
        rid = request.id
        try:
            self._enter(rid)
            try:
                try:
                    result = self._start(request)
                except _NoTool as e:
                    return pb.CallReply(error=pb.WorkerError(type="UnknownCommand", message=str(e)))
                if _core._is_stream(result):
                    result = _core._collect(result)
                return pb.CallReply(ok=_core._dumps(result))
            finally:
                self._leave(rid)
        except _core.Cancelled as e:
            return pb.CallReply(error=pb.WorkerError(type="Cancelled", message=str(e) or "cancelled"))
        except Exception as e:
            return pb.CallReply(error=_werr(_core._error(e)))

    def Stream(self, request, context):
        self._auth(context)
        rid = request.id
        gen = None
        try:
            self._enter(rid)
            try:
                result = self._start(request)
            except _NoTool as e:
                yield pb.StreamItem(error=pb.WorkerError(type="UnknownCommand", message=str(e)))
                return
            if not _core._is_stream(result):
                yield pb.StreamItem(chunk=_core._dumps(result))
                return
            gen = result
            while True:
                try:
                    item = _core._next_item(gen)
                except StopIteration:
                    return
                yield pb.StreamItem(chunk=_core._dumps(item))
        except GeneratorExit:
            # The host cancelled the RPC (dropped its stream): close the tool's generator.
            if gen is not None:
                _core._close(gen)
            raise
        except _core.Cancelled as e:
            if gen is not None:
                _core._close(gen)
            yield pb.StreamItem(error=pb.WorkerError(type="Cancelled", message=str(e) or "cancelled"))
        except Exception as e:
            if gen is not None:
                _core._close(gen)
            yield pb.StreamItem(error=_werr(_core._error(e)))
        finally:
            self._leave(rid)

    def Cancel(self, request, context):
        self._auth(context)
        self.T.cancel(request.id)
        return pb.Empty()

    def Ping(self, request, context):
        self._auth(context)
        return pb.Empty()

    def Shutdown(self, request, context):
        self._auth(context)
        return pb.Empty()


def start(tools, socket, token, threads, max_frame, threaded):
    """Starts the gRPC server; returns it (the caller stops it)."""
    opts = [("grpc.max_receive_message_length", max_frame), ("grpc.max_send_message_length", max_frame)]
    from concurrent.futures import ThreadPoolExecutor

    server = grpc.server(ThreadPoolExecutor(max_workers=threads, thread_name_prefix="snakepit-grpc"), options=opts)
    pbg.add_WorkerServicer_to_server(_Servicer(tools, token, threaded), server)
    if server.add_insecure_port("unix:" + socket) == 0:
        raise RuntimeError("cannot listen on unix:%s" % socket)
    server.start()
    return server
