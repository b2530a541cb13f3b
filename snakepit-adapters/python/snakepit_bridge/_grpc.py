"""gRPC mode of the bridge: serves ``snakepit.v1.Worker`` on the Unix socket the host chose.

Needs ``grpcio`` and ``protobuf`` (``cargo xtask setup`` installs them into the repository's
``.venv``). The stdio pipe stays the control channel (handshake, ping, shutdown, host calls).
"""

import hmac
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
        self.token = token.encode("utf-8")
        self.T = threaded

    def _auth(self, context):
        presented = dict(context.invocation_metadata()).get(TOKEN_HEADER)
        if isinstance(presented, str):
            presented = presented.encode("utf-8", "surrogateescape")
        # Constant time: a wrong guess must not tell how many leading characters were right.
        if not isinstance(presented, bytes) or not hmac.compare_digest(presented, self.token):
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


def _host_caller(host_socket, token, threaded, opts):
    """Calls to the host through its ``snakepit.v1.Host`` service; cancellable."""
    # A plain :authority (grpcio would send the socket path, which HTTP/2 servers reject).
    copts = opts + [("grpc.default_authority", "localhost")]
    stub = pbg.HostStub(grpc.insecure_channel("unix:" + host_socket, options=copts))

    def call(rid, name, args):
        req = pb.HostCallRequest(call=rid or 0, name=name, args=_core._dumps(args), token=token)
        fut = stub.Call.future(req)
        with threaded.lock:
            if rid in threaded.cancelled:
                fut.cancel()
            threaded.async_futs[rid] = fut
        try:
            reply = fut.result()
        except grpc.FutureCancelledError:
            raise _core.Cancelled("call cancelled by the host")
        except grpc.RpcError as e:
            raise _core.HostCallError("HostUnavailable", "%s: %s" % (e.code(), e.details()))
        finally:
            with threaded.lock:
                threaded.async_futs.pop(rid, None)
        if reply.WhichOneof("outcome") == "error":
            raise _core.HostCallError(reply.error.type, reply.error.message)
        return json.loads(reply.ok) if reply.ok else None

    return call


def start(tools, transport, threads, max_frame, threaded):
    """Starts the gRPC server; returns it (the caller stops it)."""
    opts = [("grpc.max_receive_message_length", max_frame), ("grpc.max_send_message_length", max_frame)]
    from concurrent.futures import ThreadPoolExecutor

    socket, token = transport["socket"], transport["token"]
    if transport.get("host_socket"):
        threaded.grpc_host = _host_caller(transport["host_socket"], token, threaded, opts)
    server = grpc.server(ThreadPoolExecutor(max_workers=threads, thread_name_prefix="snakepit-grpc"), options=opts)
    pbg.add_WorkerServicer_to_server(_Servicer(tools, token, threaded), server)
    if server.add_insecure_port("unix:" + socket) == 0:
        raise RuntimeError("cannot listen on unix:%s" % socket)
    server.start()
    return server
