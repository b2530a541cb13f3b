"use strict";
// The worker's side of the protocol (docs/protocol.md) on Node's event loop: the protocol
// pipe (handshake, calls, streams with credit, host calls and sessions, pipelining, ping,
// shutdown, end of input), and the scheduling of calls whichever transport brought them. With
// the gRPC transport (§7, lib/grpc.js) calls come over gRPC and the pipe is the control
// channel.

const codec = require("./codec");
const io = require("./io");
const { Call } = require("./call");
const { runCall, answerCancelled, stackOf } = require("./invoke");
const { StdioReply, StdioHostLink } = require("./stdio");
const { collectTools, toolInfo } = require("./tools");
const { CancelledError, ProtocolError } = require("./errors");

const MAX_HOST_CALLS = 64; // outstanding host calls the host allows per connection (§4b, §7)
const MAX_PIPELINE_DEPTH = 16;
const MAX_TIMER_MS = 2 ** 31 - 1; // setTimeout's limit
/** How long after a call's `timeout_ms` the bridge's own deadline timer fires (see accept). */
const DEADLINE_MARGIN_MS = 250;

/** A credit count from the host: a positive integer, anything else counts as none. */
function count(n) {
  return Number.isSafeInteger(n) && n > 0 ? n : 0;
}

class Worker {
  /**
   * @param {Function | object | null} adapter  an adapter class, an instance, or null
   * @param {{concurrency?: number}} options
   * @param {{bridge: string, refusal: (ours: number[], offered: unknown[]) => string, versions: () => number[]}} meta
   */
  constructor(adapter, options, meta) {
    this.adapter = adapter;
    this.options = options;
    this.meta = meta;
    this.state = "hello"; // then "setup" (hello read, setup() running), then "ready"
    this.inbox = []; // frames that came during setup
    this.maxFrame = codec.DEFAULT_MAX_FRAME;
    this.segments = false;
    this.instance = null;
    this.tools = new Map();
    this.limit = 1; // calls run at once
    this.calls = new Map(); // id -> Call, from arrival to answer
    this.queue = []; // calls not started yet, in arrival order
    this.running = 0;
    this.pumpPending = false;
    this.stdioHost = new StdioHostLink(this);
    this.hostLink = this.stdioHost; // where ctx.callHost goes (the gRPC transport's Host client)
    this.hostOutstanding = 0;
    this.slotWaiters = [];
    this.draining = false; // `shutdown` came
    this.eof = false; // the protocol input ended
    this.finishing = false;
    this.out = null;
    this.outFd = null;
    this.grpc = null; // the gRPC transport's server (lib/grpc.js), when hello asked for it
  }

  start() {
    const { input, output, outFd } = io.openProtocol();
    this.out = output;
    this.outFd = outFd;
    this.reader = new codec.FrameReader((body, segmented) => this.#onFrame(body, segmented));
    input.on("data", (chunk) => {
      try {
        this.reader.push(chunk);
      } catch (e) {
        this.#fatal(e);
      }
    });
    input.on("end", () => this.#onEof());
    input.on("error", (e) => {
      io.log(`protocol input failed (${e.code || e.message})`);
      this.#onEof();
    });
    output.stream.on("error", (e) => {
      io.log(`protocol output failed (${e.code || e.message}); exiting`);
      process.exit(1);
    });
    io.watchParent((parent) => {
      io.log(`parent process ${parent} is gone; exiting`);
      process.exit(70);
    });
  }

  // ---- input ------------------------------------------------------------------------------

  #onFrame(body, segmented) {
    let msg;
    let segs = null;
    if (segmented) ({ msg, segs } = codec.splitSegmented(body));
    else msg = codec.parseMessage(body);
    if (this.state === "ready") {
      this.#dispatch(msg, segs);
    } else if (this.state === "hello") {
      if (msg.t !== "hello") throw new ProtocolError(`expected hello, got ${JSON.stringify(msg.t)}`);
      this.state = "setup";
      this.#hello(msg).catch((e) => this.#fatal(e));
    } else {
      this.inbox.push([msg, segs]);
    }
  }

  #fatal(e) {
    if (e instanceof ProtocolError) {
      io.log(`protocol error: ${e.message}; exiting`);
      process.exit(2);
    }
    io.log(`internal error: ${stackOf(e)}`);
    process.exit(1);
  }

  #dispatch(msg, segs) {
    switch (msg.t) {
      case "call":
        return this.#onCall(msg, segs);
      case "cancel":
        return this.cancel(msg.id);
      case "credit": {
        const call = this.calls.get(msg.id);
        if (call && call.reply instanceof StdioReply) call.reply.addCredit(count(msg.n));
        return;
      }
      case "host_result":
        return this.stdioHost.onResult(msg, segs);
      case "ping":
        return this.send(codec.messageFrame({ t: "pong", id: msg.id === undefined ? null : msg.id }));
      case "shutdown":
        return this.drain();
      case "release": // shared-memory regions: never agreed here
        return;
      default:
        io.log(`ignoring unknown message type ${JSON.stringify(msg.t)}`);
    }
  }

  // ---- handshake --------------------------------------------------------------------------

  async #hello(hello) {
    for (const key of ["max_frame", "max_in_flight", "pipeline_depth"]) {
      const v = hello[key];
      if (v !== undefined && v !== null && !(Number.isSafeInteger(v) && v >= 0)) {
        throw new ProtocolError(`hello: ${key} is ${JSON.stringify(v)}, not a non-negative integer`);
      }
    }
    if (!Array.isArray(hello.versions)) {
      throw new ProtocolError(`hello: versions is ${JSON.stringify(hello.versions)}, not a list`);
    }
    this.maxFrame = hello.max_frame || codec.DEFAULT_MAX_FRAME;
    this.reader.maxFrame = this.maxFrame;

    const ours = this.meta.versions();
    const common = hello.versions.filter((v) => ours.includes(v));
    if (common.length === 0) {
      this.send(
        codec.messageFrame({
          t: "refuse",
          reason: this.meta.refusal(ours, hello.versions),
          versions: ours,
          bridge: this.meta.bridge,
        })
      );
      return this.#exit(0, false);
    }
    const transport = hello.transport;
    if (transport !== undefined && transport !== null && typeof transport !== "object") {
      throw new ProtocolError(`hello: transport is ${JSON.stringify(transport)}, not an object`);
    }
    // gRPC (§7): the packages are loaded now (a missing one ends the worker with status 1 and
    // a line saying how to install it), the server starts once the tools are known.
    const grpc = transport && transport.kind === "grpc" ? require("./grpc").prepare(transport) : null;
    // Shared memory (§4d) needs mmap, which Node's core lacks: never announced; the arena's
    // descriptor is closed so it does not linger.
    io.closeArenaFd(hello.shm);

    try {
      this.instance = this.#makeAdapter(hello.config);
      if (this.instance && typeof this.instance.setup === "function") await this.instance.setup();
    } catch (e) {
      io.log(`setup failed:\n${stackOf(e)}`);
      process.exit(1);
    }
    this.tools = collectTools(this.instance);

    const n = Math.max(1, Math.min(hello.max_in_flight || 1, this.options.concurrency || Infinity));
    const ready = {
      t: "ready",
      version: Math.max(...common),
      pid: process.pid,
      tools: toolInfo(this.tools),
      max_in_flight: n,
      bridge: this.meta.bridge,
    };
    const segments = hello.segments === true && process.env.SNAKEPIT_BRIDGE_SEGMENTS !== "0";
    if (segments) ready.segments = true;
    this.limit = n;
    this.segments = segments;
    if (grpc) {
      // Calls come over gRPC from now on (the host connects once it reads `ready`).
      await grpc.start(this);
      this.grpc = grpc;
      if (grpc.hostLink) this.hostLink = grpc.hostLink;
      ready.address = grpc.address;
    } else {
      // Pipelining (§4e): calls then wait in `queue` and run one after another. No cancel
      // signals: JavaScript cannot interrupt synchronous code; cancellation is ctx.signal.
      const offered = hello.pipeline_depth || 1;
      if (n === 1 && offered >= 2 && process.env.SNAKEPIT_BRIDGE_PIPELINE !== "0") {
        ready.pipeline_depth = Math.min(offered, MAX_PIPELINE_DEPTH);
      }
    }
    this.send(codec.messageFrame(ready));
    this.reader.segments = segments;
    this.state = "ready";
    for (const [msg, segs] of this.inbox.splice(0)) this.#dispatch(msg, segs);
  }

  #makeAdapter(config) {
    const spec = this.adapter;
    if (!spec) return null;
    const cfg = config === undefined || config === null ? {} : config;
    const instance = typeof spec === "function" ? new spec(cfg) : spec;
    instance.config = cfg;
    return instance;
  }

  // ---- calls ------------------------------------------------------------------------------

  #onCall(msg, segs) {
    const call = new Call(this, {
      id: msg.id === undefined ? null : msg.id,
      cmd: msg.cmd,
      args: msg.args,
      segs,
      session: typeof msg.session === "string" ? msg.session : null,
      streamed: count(msg.stream) > 0, // a zero or missing `stream`: a plain call
    });
    call.reply = new StdioReply(this, call, count(msg.stream));
    this.accept(call, msg.timeout_ms);
  }

  /**
   * Takes a call (its `reply` set) to run once a slot is free, in arrival order; `timeoutMs`
   * (when a number) aborts its signal when it passes. After `shutdown` it is answered
   * ShuttingDown instead, after the end of input Cancelled.
   */
  accept(call, timeoutMs) {
    if (this.eof && !this.draining) return answerCancelled(call, "the host went away");
    if (this.draining || this.finishing) {
      return call.reply.error({ type: "ShuttingDown", message: "the worker is shutting down" });
    }
    this.calls.set(call.id, call);
    if (typeof timeoutMs === "number" && timeoutMs >= 0 && timeoutMs <= MAX_TIMER_MS - DEADLINE_MARGIN_MS) {
      // A backstop: the host enforces the deadline itself (its caller sees `timeout`, then it
      // sends `cancel`). Firing a little after it keeps this timer from answering Cancelled
      // first, which the caller would see instead of its timeout.
      const why = `the call's deadline passed (timeout_ms ${timeoutMs})`;
      call.timer = setTimeout(() => call.abort(new CancelledError(why)), timeoutMs + DEADLINE_MARGIN_MS);
      call.timer.unref();
    }
    this.queue.push(call);
    this.#schedule();
  }

  /** Called by call.settle(): the call is answered. */
  forget(call) {
    if (this.calls.get(call.id) === call) this.calls.delete(call.id);
  }

  /** Cancels call `id` (if it is not answered yet); says whether there was one. */
  cancel(id, why = "call cancelled by the host") {
    const call = this.calls.get(id);
    if (call) this.cancelCall(call, why);
    return call !== undefined;
  }

  /**
   * A running call's signal is aborted (what it throws from then on is answered Cancelled); a
   * queued one (pipelining, or all slots busy) is answered Cancelled at once and never runs.
   */
  cancelCall(call, why) {
    if (call.done) return;
    if (call.started) {
      call.abort(new CancelledError(why));
      return;
    }
    const i = this.queue.indexOf(call);
    if (i >= 0) this.queue.splice(i, 1);
    answerCancelled(call, "cancelled before it started");
    this.#maybeFinish();
  }

  // Calls start from the check phase, after the frames already read are handled: a cancel
  // that follows a queued call closely is seen before the call would start.
  #schedule() {
    if (this.pumpPending) return;
    this.pumpPending = true;
    setImmediate(() => {
      this.pumpPending = false;
      this.#pump();
    });
  }

  #pump() {
    while (this.running < this.limit && this.queue.length > 0) {
      const call = this.queue.shift();
      this.running++;
      runCall(call, this.tools)
        .catch((e) => this.#fatal(e))
        .finally(() => {
          this.running--;
          if (this.queue.length > 0) this.#schedule();
          else this.#maybeFinish();
        });
    }
  }

  /** Writes a frame (its buffers) to the protocol output. */
  send(bufs) {
    this.out.send(bufs);
  }

  // ---- calls to the host ------------------------------------------------------------------

  callHost(call, name, args) {
    if (typeof name !== "string") return Promise.reject(new TypeError("callHost(name, args): name must be a string"));
    if (call.done) return Promise.reject(new Error(`callHost(${JSON.stringify(name)}): the call was answered already`));
    return this.#hostCall(call, name, args === undefined ? null : args);
  }

  async #hostCall(call, name, args) {
    if (call.signal.aborted) throw call.signal.reason;
    // After the end of input the host can answer nothing on the pipe (over gRPC it still can,
    // during a graceful stop).
    if (this.eof && this.hostLink === this.stdioHost) throw new CancelledError("the host went away");
    await this.#hostSlot(call);
    try {
      return this.hostLink.call(call, name, args);
    } catch (e) {
      this.releaseHostSlot();
      throw e;
    }
  }

  /** Takes one of the 64 host-call slots, waiting for one to free up when all are taken. */
  #hostSlot(call) {
    if (this.hostOutstanding < MAX_HOST_CALLS) {
      this.hostOutstanding++;
      return undefined;
    }
    return new Promise((resolve, reject) => {
      const wait = { call, resolve, reject, settled: false };
      this.slotWaiters.push(wait);
      call.hostWaits.add(wait);
    });
  }

  /** A host call is over (its answer came, or it failed): its slot goes to the next waiter. */
  releaseHostSlot() {
    this.hostOutstanding--;
    while (this.slotWaiters.length > 0 && this.hostOutstanding < MAX_HOST_CALLS) {
      const wait = this.slotWaiters.shift();
      if (wait.settled) continue; // its call was cancelled meanwhile
      wait.settled = true;
      wait.call.hostWaits.delete(wait);
      this.hostOutstanding++;
      wait.resolve();
    }
  }

  // ---- the end ----------------------------------------------------------------------------

  /** `shutdown`: the calls in flight and queued finish, new ones are refused, then the worker exits. */
  drain() {
    this.draining = true;
    this.#maybeFinish();
  }

  /**
   * End of input: nothing more can come. Waits for host results and credit end with
   * Cancelled. Without a `shutdown` before it (the host went away), running calls are
   * aborted as well and queued ones answered Cancelled; after one (a graceful stop), the
   * calls in flight and queued run to their end (gRPC calls keep their host calls and their
   * stream: those travel over gRPC). Then the worker exits.
   */
  #onEof() {
    if (this.eof) return;
    this.eof = true;
    if (this.finishing) return;
    if (this.state !== "ready") process.exit(0); // before ready: nobody waits for anything
    const gone = new CancelledError("the host went away");
    for (const call of this.calls.values()) {
      if (!call.started) continue;
      if (!this.draining) call.abort(gone);
      else if (call.reply instanceof StdioReply) call.interrupt(gone);
    }
    for (let n = this.stdioHost.dropAll(gone); n > 0; n--) this.releaseHostSlot();
    if (!this.draining) {
      for (const call of this.queue.splice(0)) answerCancelled(call, "the host went away before it started");
    }
    this.#maybeFinish();
  }

  #maybeFinish() {
    if (this.state !== "ready" || this.finishing || !(this.draining || this.eof)) return;
    if (this.running === 0 && this.queue.length === 0) this.#exit(0, true);
  }

  /** Stops the gRPC server, tears the adapter down (when asked), flushes the output, exits. */
  async #exit(code, teardown) {
    if (this.finishing) return;
    this.finishing = true;
    if (this.grpc) await this.grpc.stop();
    if (teardown && this.instance && typeof this.instance.teardown === "function") {
      try {
        await this.instance.teardown();
      } catch (e) {
        io.log(`teardown failed:\n${stackOf(e)}`);
      }
    }
    let timer;
    const limit = new Promise((resolve) => {
      timer = setTimeout(resolve, 5000);
    });
    await Promise.race([this.out.flushed(), limit]);
    clearTimeout(timer);
    process.exit(code);
  }
}

module.exports = { Worker };
