"use strict";
// The gRPC transport (docs/protocol.md §7): the worker serves `snakepit.v1.Worker` on the Unix
// socket the host chose and calls the host's `snakepit.v1.Host` for ctx.callHost; the protocol
// pipe stays the control channel (handshake, ping, shutdown, end of input: lib/worker.js).
// Calls run exactly as over the pipe (lib/invoke.js); only how they arrive and how they are
// answered differs. Needs @grpc/grpc-js and @grpc/proto-loader (optional peer dependencies:
// the stdio transport needs nothing), found through Node's resolution (NODE_PATH included).

const crypto = require("node:crypto");
const path = require("node:path");
const codec = require("./codec");
const io = require("./io");
const { Call } = require("./call");
const { encodeValue } = require("./invoke");
const { CancelledError, HostCallError, FrameTooLargeError, ProtocolError } = require("./errors");

const TOKEN_HEADER = "x-snakepit-token";
const PROTO = path.join(__dirname, "..", "proto", "snakepit", "v1", "snakepit.proto");
// How long a stop waits for the host to close its connections before they are cut.
const STOP_GRACE_MS = 2000;
// Cancels for calls not seen yet (a Cancel RPC may overtake its call) are kept, this many.
const EARLY_CANCELS = 1024;

/** Requires `name`, or says how to install it and exits 1 (before `ready`: startup_failed). */
function requirePackage(name) {
  try {
    return require(name);
  } catch (e) {
    const why = String((e && e.message) || e).split("\n")[0];
    io.log(
      `the gRPC transport needs ${name}, which cannot be loaded (${why}): run \`cargo xtask setup\` ` +
        "(npm ci in snakepit-adapters/node), or `npm install @grpc/grpc-js @grpc/proto-loader` and set " +
        "SNAKEPIT_NODE_PATH to that node_modules directory; exiting"
    );
    process.exit(1);
  }
}

/**
 * Bytes of a length-delimited protobuf field (tag, length, bytes) of `n` bytes: messages are
 * sized exactly as grpc-js will check them against max_frame.
 */
function fieldSize(n) {
  let varint = 1;
  for (let v = n; v >= 0x80; v = Math.floor(v / 0x80)) varint++;
  return 1 + varint + n;
}

function constantTimeEqual(a, b) {
  return a.length === b.length && crypto.timingSafeEqual(a, b);
}

/**
 * hello.transport for gRPC, checked (a ProtocolError when malformed), with the packages and
 * the protocol loaded: a transport to start().
 */
function prepare(transport) {
  const { socket, host_socket: hostSocket, token } = transport;
  if (typeof socket !== "string" || socket === "") {
    throw new ProtocolError(`hello: transport.socket is ${JSON.stringify(socket)}, not a path`);
  }
  if (hostSocket !== undefined && hostSocket !== null && typeof hostSocket !== "string") {
    throw new ProtocolError(`hello: transport.host_socket is ${JSON.stringify(hostSocket)}, not a path`);
  }
  if (typeof token !== "string") throw new ProtocolError("hello: transport.token is not a string");
  const grpc = requirePackage("@grpc/grpc-js");
  const protoLoader = requirePackage("@grpc/proto-loader");
  let proto;
  try {
    // ids and timeouts are below 2^53 (§2): plain numbers.
    const def = protoLoader.loadSync(PROTO, { keepCase: true, longs: Number, defaults: true, oneofs: true });
    proto = grpc.loadPackageDefinition(def).snakepit.v1;
  } catch (e) {
    io.log(`cannot load the gRPC protocol ${PROTO}: ${e && e.message}; exiting`);
    process.exit(1);
  }
  return new GrpcTransport(grpc, proto, socket, hostSocket || null, token);
}

class GrpcTransport {
  constructor(grpc, proto, socket, hostSocket, token) {
    this.grpc = grpc;
    this.proto = proto;
    this.socket = socket;
    this.hostSocket = hostSocket;
    this.token = token;
    this.tokenBytes = Buffer.from(token, "utf8");
    /** What `ready.address` says. */
    this.address = `unix:${socket}`;
    this.server = null;
    /** Host calls over `Host.Call` (null without a host_socket: they take the pipe). */
    this.hostLink = null;
    this.worker = null;
    this.early = new Set(); // ids of Cancel RPCs that found no call (yet)
  }

  /** Serves the Worker service on the socket; exits 1 when it cannot listen. */
  async start(worker) {
    this.worker = worker;
    const { grpc } = this;
    const options = {
      "grpc.max_receive_message_length": worker.maxFrame,
      "grpc.max_send_message_length": worker.maxFrame,
    };
    const server = new grpc.Server(options);
    server.addService(this.proto.Worker.service, {
      Execute: (rpc, respond) => this.#execute(rpc, respond),
      Stream: (rpc) => this.#stream(rpc),
      Cancel: (rpc, respond) => this.#unary(rpc, respond, () => this.#cancel(rpc.request.id)),
      Ping: (rpc, respond) => this.#unary(rpc, respond, () => {}),
      // The control channel's `shutdown`, as an RPC: the calls in flight finish, then the
      // worker exits (the reply goes out first).
      Shutdown: (rpc, respond) => this.#unary(rpc, respond, () => setImmediate(() => worker.drain())),
    });
    await new Promise((resolve) => {
      server.bindAsync(this.address, grpc.ServerCredentials.createInsecure(), (err) => {
        if (err) {
          io.log(`cannot serve gRPC on ${this.address} (${err.message}); exiting`);
          process.exit(1);
        }
        resolve();
      });
    });
    this.server = server;
    if (this.hostSocket) this.hostLink = new GrpcHostLink(this, options);
  }

  /** Stops serving: waits (a little) for the host to finish its RPCs and close, then cuts. */
  stop() {
    if (this.hostLink) this.hostLink.close();
    const server = this.server;
    if (!server) return Promise.resolve();
    return new Promise((resolve) => {
      const timer = setTimeout(() => {
        server.forceShutdown();
        resolve();
      }, STOP_GRACE_MS);
      server.tryShutdown(() => {
        clearTimeout(timer);
        resolve();
      });
    });
  }

  // ---- the Worker service -----------------------------------------------------------------

  /** Whether the RPC carries the worker's token (compared in constant time). */
  #authorized(rpc) {
    const values = rpc.metadata.get(TOKEN_HEADER);
    if (values.length !== 1 || typeof values[0] !== "string") return false;
    return constantTimeEqual(Buffer.from(values[0], "utf8"), this.tokenBytes);
  }

  #unauthenticated() {
    return { code: this.grpc.status.UNAUTHENTICATED, details: "missing or wrong snakepit token" };
  }

  #unary(rpc, respond, act) {
    if (!this.#authorized(rpc)) return respond(this.#unauthenticated());
    act();
    respond(null, {});
  }

  #execute(rpc, respond) {
    if (!this.#authorized(rpc)) return respond(this.#unauthenticated());
    const call = this.#newCall(rpc.request, false);
    call.reply = new ExecuteReply(this, call, respond);
    this.#accept(call, rpc);
  }

  #stream(rpc) {
    if (!this.#authorized(rpc)) {
      rpc.emit("error", this.#unauthenticated());
      return;
    }
    const call = this.#newCall(rpc.request, true);
    call.reply = new StreamReply(this, call, rpc);
    this.#accept(call, rpc);
  }

  #newCall(req, streamed) {
    return new Call(this.worker, {
      id: req.id,
      cmd: req.command,
      args: null,
      segs: req.segments.length ? req.segments : null,
      session: req.session === "" ? null : req.session,
      streamed,
    });
  }

  #accept(call, rpc) {
    const req = rpc.request;
    if (req.args.length) {
      try {
        call.rawArgs = JSON.parse(req.args.toString("utf8"));
      } catch (e) {
        return call.reply.error({ type: "BadRequest", message: `the call's args are not JSON: ${e.message}` });
      }
    }
    // The host gave up on the RPC (its caller went away, the deadline passed, the connection
    // closed): as a cancel. grpc-js says "cancelled" at every RPC's end; an answered call
    // ignores it.
    rpc.on("cancelled", () => this.worker.cancelCall(call, "the host cancelled the RPC"));
    this.worker.accept(call, req.timeout_ms > 0 ? req.timeout_ms : undefined);
    if (this.early.delete(call.id)) this.worker.cancel(call.id);
  }

  #cancel(id) {
    if (this.worker.cancel(id)) return;
    // Not seen (yet): the Cancel may have overtaken its call, on another HTTP/2 stream.
    this.early.add(id);
    if (this.early.size > EARLY_CANCELS) this.early.delete(this.early.values().next().value);
  }

  // ---- encoding ---------------------------------------------------------------------------

  /**
   * {[key]: JSON bytes, segments} for a value; {error} instead when it cannot be sent (not
   * JSON: TypeError; its message over max_frame: FrameTooLarge, which grpc would otherwise
   * turn into a failed RPC).
   */
  payload(key, value) {
    const worker = this.worker;
    const enc = encodeValue(value, worker.segments);
    if (!enc.ok) return { error: this.workerError(enc.error) };
    const body = Buffer.from(enc.json, "utf8");
    const segments = enc.segs || [];
    let size = fieldSize(body.length);
    for (const s of segments) size += fieldSize(s.length);
    if (size > worker.maxFrame) {
      const message = `message of ${size} bytes exceeds max_frame ${worker.maxFrame}`;
      return { error: this.workerError({ type: "FrameTooLarge", message }) };
    }
    return { [key]: body, segments };
  }

  /** A WorkerError message; FrameTooLarge when the error itself would be over max_frame. */
  workerError(info) {
    const err = { type: String(info.type), message: String(info.message), traceback: info.traceback || "" };
    let inner = 0;
    for (const text of [err.type, err.message, err.traceback]) if (text) inner += fieldSize(Buffer.byteLength(text));
    const size = fieldSize(inner);
    if (size <= this.worker.maxFrame) return err;
    const message = `message of ${size} bytes exceeds max_frame ${this.worker.maxFrame}`;
    return { type: "FrameTooLarge", message, traceback: "" };
  }
}

/** An Execute RPC's answer (the `reply` of lib/invoke.js): one CallReply. */
class ExecuteReply {
  constructor(transport, call, respond) {
    this.transport = transport;
    this.call = call;
    this.respond = respond;
  }

  result(value) {
    if (this.call.settle()) this.respond(null, this.transport.payload("ok", value));
  }

  error(info) {
    if (this.call.settle()) this.respond(null, { error: this.transport.workerError(info) });
  }

  chunk() {
    throw new Error("internal: a chunk for an Execute RPC");
  }

  end() {
    throw new Error("internal: the end of an Execute RPC's stream");
  }
}

/** A Stream RPC's answers: StreamItems, held back by grpc-js's write()/drain (HTTP/2 flow control). */
class StreamReply {
  constructor(transport, call, rpc) {
    this.transport = transport;
    this.call = call;
    this.rpc = rpc;
  }

  async chunk(value) {
    if (this.rpc.destroyed) throw new CancelledError("the host cancelled the RPC");
    const item = this.transport.payload("chunk", value);
    if (item.error) {
      this.#final(item);
      return false;
    }
    if (!this.rpc.write(item)) await this.#drained();
    return true;
  }

  /** Resolves on 'drain'; rejects when the call is aborted first (the RPC cancelled, say). */
  #drained() {
    const { call, rpc } = this;
    const onDrain = () => call.unblock();
    rpc.once("drain", onDrain);
    return call.block().finally(() => rpc.removeListener("drain", onDrain));
  }

  end() {
    if (this.call.settle() && !this.rpc.destroyed) this.rpc.end();
  }

  error(info) {
    this.#final({ error: this.transport.workerError(info) });
  }

  #final(item) {
    if (!this.call.settle() || this.rpc.destroyed) return;
    this.rpc.write(item);
    this.rpc.end();
  }
}

/** ctx.callHost over `Host.Call` on the host's socket. */
class GrpcHostLink {
  constructor(transport, options) {
    this.transport = transport;
    this.worker = transport.worker;
    const { grpc } = transport;
    this.status = grpc.status;
    // A plain :authority: some HTTP/2 servers reject a socket path there.
    this.client = new transport.proto.Host(`unix:${transport.hostSocket}`, grpc.credentials.createInsecure(), {
      ...options,
      "grpc.default_authority": "localhost",
    });
  }

  /**
   * Calls the host for `call` (which holds a host-call slot); the promise settles with the
   * reply, and the slot is freed then. Throws at once when the arguments cannot be sent.
   */
  call(call, name, args) {
    const worker = this.worker;
    let enc;
    try {
      enc = codec.encode(args, worker.segments);
    } catch (e) {
      throw new TypeError(`host call arguments are not JSON-serialisable: ${e && e.message}`);
    }
    const body = Buffer.from(enc.json, "utf8");
    const segments = enc.segs || [];
    const token = this.transport.token;
    let size = 11 + fieldSize(Buffer.byteLength(name)) + fieldSize(body.length) + fieldSize(Buffer.byteLength(token));
    for (const s of segments) size += fieldSize(s.length);
    if (size > worker.maxFrame) throw new FrameTooLargeError(size, worker.maxFrame);
    const request = { call: Number.isSafeInteger(call.id) && call.id >= 0 ? call.id : 0, name, args: body, token, segments };
    return new Promise((resolve, reject) => {
      const wait = { call, resolve, reject, settled: false, cancel: null };
      const rpc = this.client.Call(request, (err, reply) => {
        worker.releaseHostSlot();
        call.hostWaits.delete(wait);
        if (wait.settled) return; // the call was cancelled meanwhile (then so was this RPC)
        wait.settled = true;
        if (err) {
          const code = this.status[err.code] !== undefined ? this.status[err.code] : err.code;
          return reject(new HostCallError("HostUnavailable", `${code}: ${err.details}`));
        }
        if (reply.outcome === "error") {
          return reject(new HostCallError(reply.error.type || "Error", reply.error.message));
        }
        try {
          let ok = reply.ok && reply.ok.length ? JSON.parse(reply.ok.toString("utf8")) : null;
          if (reply.segments.length) ok = codec.bindSegments(ok, reply.segments);
          resolve(ok);
        } catch (e) {
          reject(e); // not JSON, BadSegment
        }
      });
      wait.cancel = () => rpc.cancel();
      call.hostWaits.add(wait);
    });
  }

  close() {
    this.client.close();
  }
}

module.exports = { prepare, TOKEN_HEADER };
