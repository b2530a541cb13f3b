"use strict";
// The worker's side of the protocol (docs/protocol.md) on Node's event loop: handshake,
// calls, streams with credit, host calls and sessions, pipelining, shutdown.

const { setImmediate: nextTurn } = require("node:timers/promises");
const codec = require("./codec");
const io = require("./io");
const { collectTools, toolInfo } = require("./tools");
const { CancelledError, HostCallError, FrameTooLargeError, ProtocolError } = require("./errors");

const MAX_HOST_CALLS = 64; // outstanding host_calls the host allows per connection (§4b)
const MAX_PIPELINE_DEPTH = 16;
const MAX_TIMER_MS = 2 ** 31 - 1; // setTimeout's limit
// A stream or a collected generator lets the event loop run (to read a cancel, say) at least
// every this many items, even when nothing else makes it wait.
const YIELD_EVERY = 16;

/** A credit count from the host: a positive integer, anything else counts as none. */
function count(n) {
  return Number.isSafeInteger(n) && n > 0 ? n : 0;
}

function isThenable(v) {
  return v !== null && (typeof v === "object" || typeof v === "function") && typeof v.then === "function";
}

function describeThrown(e) {
  try {
    return String(e);
  } catch {
    return Object.prototype.toString.call(e);
  }
}

/** {type, message, traceback?} for what a tool threw. */
function errorInfo(e) {
  if (e !== null && typeof e === "object" && typeof e.message === "string") {
    const info = { type: typeof e.name === "string" && e.name ? e.name : "Error", message: e.message };
    if (typeof e.stack === "string") info.traceback = e.stack;
    return info;
  }
  return { type: "Error", message: describeThrown(e) };
}

function stackOf(e) {
  return e && typeof e.stack === "string" ? e.stack : describeThrown(e);
}

/**
 * What a tool's result streams: a generator (any tool), or with `stream: true` declared, any
 * iterable or async iterable but a string or binary data. Null for a plain result.
 */
function iterate(result, declared) {
  if (result === null || typeof result !== "object") return null;
  const tag = Object.prototype.toString.call(result);
  if (tag === "[object Generator]") return { it: result, isAsync: false };
  if (tag === "[object AsyncGenerator]") return { it: result, isAsync: true };
  if (!declared || codec.isBinary(result)) return null;
  if (typeof result[Symbol.asyncIterator] === "function") return { it: result[Symbol.asyncIterator](), isAsync: true };
  if (typeof result[Symbol.iterator] === "function") return { it: result[Symbol.iterator](), isAsync: false };
  return null;
}

/** Ends an iterator early (its `finally` blocks run); an error there is logged. */
async function closeIterator(it, isAsync) {
  if (typeof it.return !== "function") return;
  try {
    const r = it.return();
    if (isAsync || isThenable(r)) await r;
  } catch (e) {
    io.log(`closing a generator raised ${stackOf(e)}`);
  }
}

/** One `call` from its arrival to its answer. */
class Call {
  constructor(worker, msg, segs) {
    this.worker = worker;
    this.id = msg.id === undefined ? null : msg.id;
    this.idJson = JSON.stringify(this.id);
    this.cmd = msg.cmd;
    this.rawArgs = msg.args;
    this.segs = segs;
    this.sessionId = typeof msg.session === "string" ? msg.session : null;
    this.window = count(msg.stream); // 0: a plain call
    this.credit = this.window;
    this.controller = new AbortController();
    this.started = false;
    this.done = false;
    this.timer = null;
    this.creditWaiter = null;
    this.hostWaits = new Set(); // this call's pending host calls and waits for a host-call slot
  }

  get signal() {
    return this.controller.signal;
  }

  /** The tool's arguments: segments bound, null as {}. Throws BadSegment. */
  args() {
    const a = this.segs ? codec.bindSegments(this.rawArgs, this.segs) : this.rawArgs;
    return a === null || a === undefined ? {} : a;
  }

  /** Aborts ctx.signal and ends what the call waits for (host results, credit). */
  abort(reason) {
    if (this.controller.signal.aborted) return;
    this.controller.abort(reason);
    this.interrupt(reason);
  }

  /** Rejects the call's waits for host results and credit with `err`. */
  interrupt(err) {
    const w = this.creditWaiter;
    if (w) {
      this.creditWaiter = null;
      w.reject(err);
    }
    for (const h of this.hostWaits) {
      if (!h.settled) {
        h.settled = true;
        h.reject(err);
      }
    }
    this.hostWaits.clear();
  }

  addCredit(n) {
    this.credit += n;
    const w = this.creditWaiter;
    if (w && this.credit > 0) {
      this.creditWaiter = null;
      w.resolve();
    }
  }

  /** Resolves once the stream has credit; rejects when the call is cancelled or the host gone. */
  waitCredit() {
    if (this.credit > 0) return Promise.resolve();
    if (this.signal.aborted) return Promise.reject(this.signal.reason);
    if (this.worker.eof) return Promise.reject(new CancelledError("the host went away"));
    return new Promise((resolve, reject) => {
      this.creditWaiter = { resolve, reject };
    });
  }
}

/** A call's session variables, through the host (§4b). */
class Session {
  #ctx;
  constructor(ctx, id) {
    this.#ctx = ctx;
    /** The session's id. */
    this.id = id;
  }

  /** The variable's value, or null when unset. */
  get(name) {
    return this.#ctx.callHost("session.get", { name });
  }

  /** Sets the variable. */
  async set(name, value) {
    await this.#ctx.callHost("session.set", { name, value });
  }

  /** Deletes the variable; resolves to whether it existed. */
  delete(name) {
    return this.#ctx.callHost("session.delete", { name });
  }
}

/** What a tool gets as its second argument. */
class Context {
  #call;
  #session;
  constructor(call) {
    this.#call = call;
  }

  /** The host's id of the call. */
  get id() {
    return this.#call.id;
  }

  /** Aborted when the host cancels the call, its timeout_ms passes, or the host goes away. */
  get signal() {
    return this.#call.signal;
  }

  /** The call's session, or null when it runs in none. */
  get session() {
    if (this.#session === undefined) {
      this.#session = this.#call.sessionId === null ? null : new Session(this, this.#call.sessionId);
    }
    return this.#session;
  }

  /** Calls the host tool `name`; rejects with HostCallError (or CancelledError). */
  callHost(name, args = null) {
    return this.#call.worker.callHost(this.#call, name, args);
  }
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
    this.hostSeq = 0;
    this.hostCalls = new Map(); // host_call id -> wait, until its host_result
    this.hostOutstanding = 0;
    this.slotWaiters = [];
    this.draining = false; // `shutdown` came
    this.eof = false; // the protocol input ended
    this.finishing = false;
    this.out = null;
    this.outFd = null;
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
        return this.#onCancel(msg.id);
      case "credit": {
        const call = this.calls.get(msg.id);
        if (call) call.addCredit(count(msg.n));
        return;
      }
      case "host_result":
        return this.#onHostResult(msg, segs);
      case "ping":
        return this.#send(codec.messageFrame({ t: "pong", id: msg.id === undefined ? null : msg.id }));
      case "shutdown":
        this.draining = true;
        return this.#maybeFinish();
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
      this.#send(
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
    if (transport && transport.kind === "grpc") {
      io.log("the gRPC transport is not supported by the Node bridge yet (stdio only); exiting");
      process.exit(3);
    }
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
    // Pipelining (§4e): calls then wait in `queue` and run one after another. No cancel
    // signals: JavaScript cannot interrupt synchronous code; cancellation is ctx.signal.
    const offered = hello.pipeline_depth || 1;
    if (n === 1 && offered >= 2 && process.env.SNAKEPIT_BRIDGE_PIPELINE !== "0") {
      ready.pipeline_depth = Math.min(offered, MAX_PIPELINE_DEPTH);
    }
    const segments = hello.segments === true && process.env.SNAKEPIT_BRIDGE_SEGMENTS !== "0";
    if (segments) ready.segments = true;
    this.limit = n;
    this.#send(codec.messageFrame(ready));
    this.segments = segments;
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
    if (this.draining || this.finishing) {
      const id = msg.id === undefined ? null : msg.id;
      const error = { type: "ShuttingDown", message: "the worker is shutting down" };
      return this.#send(codec.messageFrame({ t: "error", id, error }));
    }
    const call = new Call(this, msg, segs);
    this.calls.set(call.id, call);
    const ms = msg.timeout_ms;
    if (typeof ms === "number" && ms >= 0 && ms <= MAX_TIMER_MS) {
      call.timer = setTimeout(() => call.abort(new CancelledError(`the call's deadline passed (timeout_ms ${ms})`)), ms);
      call.timer.unref();
    }
    this.queue.push(call);
    this.#schedule();
  }

  #onCancel(id) {
    const call = this.calls.get(id);
    if (!call) return; // answered already
    if (call.started) {
      call.abort(new CancelledError("call cancelled by the host"));
      return;
    }
    // Still queued (pipelining): answered at once, and it never runs.
    this.queue.splice(this.queue.indexOf(call), 1);
    this.#answerCancelled(call, "cancelled before it started");
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
      this.#run(call)
        .catch((e) => this.#fatal(e))
        .finally(() => {
          this.running--;
          if (this.queue.length > 0) this.#schedule();
          else this.#maybeFinish();
        });
    }
  }

  async #run(call) {
    call.started = true;
    if (call.signal.aborted) return this.#answerCancelled(call, call.signal.reason.message);
    const entry = typeof call.cmd === "string" ? this.tools.get(call.cmd) : undefined;
    if (!entry) {
      return this.#answerError(call, { type: "UnknownCommand", message: `no tool named ${JSON.stringify(call.cmd)}` });
    }
    try {
      let result = entry.fn.call(entry.self, call.args(), new Context(call));
      if (isThenable(result)) result = await result;
      const source = iterate(result, entry.stream);
      if (source && call.window) return await this.#stream(call, source);
      if (source) result = await this.#collect(call, source);
      if (!call.window) return this.#answerValue(call, result);
      // A plain tool called as a stream: one chunk, then the end.
      const chunk = this.#encodeFor(call, "chunk", "data", result);
      if (!chunk.ok) return this.#answer(call, chunk.bufs);
      this.#send(chunk.bufs);
      this.#answer(call, codec.messageFrame({ t: "end", id: call.id }));
    } catch (e) {
      this.#answerThrown(call, e);
    }
  }

  /**
   * Sends a generator's items as chunks, never beyond the credit (the initial window plus
   * every `credit`), then `end`. A cancel ends the generator (its `finally` blocks run).
   * Like the Python bridge, the next item is taken before waiting for credit, so `end` goes
   * out as soon as the generator is done.
   */
  async #stream(call, { it, isAsync }) {
    let sent = 0;
    try {
      for (;;) {
        if (call.signal.aborted) throw call.signal.reason;
        const step = isAsync ? await it.next() : it.next();
        if (step.done) break;
        if (call.signal.aborted) throw call.signal.reason;
        if (call.credit <= 0) await call.waitCredit();
        const chunk = this.#encodeFor(call, "chunk", "data", step.value);
        if (!chunk.ok) {
          await closeIterator(it, isAsync);
          return this.#answer(call, chunk.bufs);
        }
        call.credit--;
        this.#send(chunk.bufs);
        if (this.out.needsDrain) await this.out.drained();
        else if (++sent % YIELD_EVERY === 0) await nextTurn();
      }
    } catch (e) {
      await closeIterator(it, isAsync);
      return this.#answerThrown(call, e);
    }
    this.#answer(call, codec.messageFrame({ t: "end", id: call.id }));
  }

  /** A generator called without `stream`: its items, for one `result`. */
  async #collect(call, { it, isAsync }) {
    const items = [];
    try {
      for (;;) {
        if (call.signal.aborted) throw call.signal.reason;
        const step = isAsync ? await it.next() : it.next();
        if (step.done) return items;
        items.push(step.value);
        if (items.length % YIELD_EVERY === 0) await nextTurn();
      }
    } catch (e) {
      await closeIterator(it, isAsync);
      throw e;
    }
  }

  // ---- answers ----------------------------------------------------------------------------

  #send(bufs) {
    this.out.send(bufs);
  }

  /** Writes the call's last message (once) and forgets the call. */
  #answer(call, bufs) {
    if (call.done) return;
    call.done = true;
    if (call.timer) clearTimeout(call.timer);
    this.calls.delete(call.id);
    this.#send(bufs);
  }

  /**
   * A `t` message for the call carrying `value` under `key`: {ok, bufs}. When the value cannot
   * be sent (not JSON, over max_frame) bufs is the error to answer instead, and ok false.
   */
  #encodeFor(call, t, key, value) {
    let enc;
    try {
      enc = codec.encode(value, this.segments);
    } catch (e) {
      const message = `result is not JSON-serialisable: ${e && e.message}`;
      return { ok: false, bufs: this.#errorFrame(call, { type: "TypeError", message }) };
    }
    const json = `{"t":"${t}","id":${call.idJson},"${key}":${enc.json}}`;
    try {
      return { ok: true, bufs: codec.frame(json, enc.segs, this.maxFrame) };
    } catch (e) {
      if (!(e instanceof FrameTooLargeError)) throw e;
      return { ok: false, bufs: this.#errorFrame(call, { type: "FrameTooLarge", message: e.message }) };
    }
  }

  #errorFrame(call, error) {
    try {
      return codec.frame(JSON.stringify({ t: "error", id: call.id, error }), null, this.maxFrame);
    } catch (e) {
      if (!(e instanceof FrameTooLargeError)) throw e;
      return codec.messageFrame({ t: "error", id: call.id, error: { type: "FrameTooLarge", message: e.message } });
    }
  }

  #answerValue(call, value) {
    this.#answer(call, this.#encodeFor(call, "result", "ok", value).bufs);
  }

  #answerError(call, error) {
    this.#answer(call, this.#errorFrame(call, error));
  }

  #answerCancelled(call, message) {
    this.#answerError(call, { type: "Cancelled", message: message || "cancelled" });
  }

  /** Answers what a tool threw: Cancelled once the call was aborted, else the error. */
  #answerThrown(call, e) {
    if (call.signal.aborted) return this.#answerCancelled(call, call.signal.reason.message);
    if (e instanceof CancelledError) return this.#answerCancelled(call, e.message);
    this.#answerError(call, errorInfo(e));
  }

  // ---- calls to the host ------------------------------------------------------------------

  callHost(call, name, args) {
    if (typeof name !== "string") return Promise.reject(new TypeError("callHost(name, args): name must be a string"));
    if (call.done) return Promise.reject(new Error(`callHost(${JSON.stringify(name)}): the call was answered already`));
    return this.#hostCall(call, name, args);
  }

  async #hostCall(call, name, args) {
    this.#checkLive(call);
    await this.#hostSlot(call);
    const hid = ++this.hostSeq;
    let bufs;
    try {
      let enc;
      try {
        enc = codec.encode(args === undefined ? null : args, this.segments);
      } catch (e) {
        throw new TypeError(`host call arguments are not JSON-serialisable: ${e && e.message}`);
      }
      const json = `{"t":"host_call","id":${hid},"call":${call.idJson},"name":${JSON.stringify(name)},"args":${enc.json}}`;
      bufs = codec.frame(json, enc.segs, this.maxFrame);
    } catch (e) {
      this.#releaseHostSlot();
      throw e;
    }
    return new Promise((resolve, reject) => {
      const wait = { call, resolve, reject, settled: false };
      this.hostCalls.set(hid, wait);
      call.hostWaits.add(wait);
      this.#send(bufs);
    });
  }

  #checkLive(call) {
    if (call.signal.aborted) throw call.signal.reason;
    if (this.eof) throw new CancelledError("the host went away");
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

  #releaseHostSlot() {
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

  #onHostResult(msg, segs) {
    const wait = this.hostCalls.get(msg.id);
    if (!wait) return;
    this.hostCalls.delete(msg.id);
    this.#releaseHostSlot(); // counted until its result arrived, even if the call gave up on it
    wait.call.hostWaits.delete(wait);
    if (wait.settled) return;
    wait.settled = true;
    const err = msg.error;
    if (err !== undefined && err !== null) {
      const type = typeof err.type === "string" ? err.type : "Error";
      const message = typeof err.message === "string" ? err.message : "";
      return wait.reject(new HostCallError(type, message));
    }
    try {
      const ok = msg.ok === undefined ? null : msg.ok;
      wait.resolve(segs ? codec.bindSegments(ok, segs) : ok);
    } catch (e) {
      wait.reject(e); // BadSegment
    }
  }

  // ---- the end ----------------------------------------------------------------------------

  /**
   * End of input: nothing more can come. Waits for host results and credit end with
   * Cancelled. Without a `shutdown` before it (the host went away), running calls are
   * aborted as well and queued ones answered Cancelled; after one (a graceful stop), the
   * calls in flight and queued run to their end. Then the worker exits.
   */
  #onEof() {
    if (this.eof) return;
    this.eof = true;
    if (this.finishing) return;
    if (this.state !== "ready") process.exit(0); // before ready: nobody waits for anything
    const gone = new CancelledError("the host went away");
    for (const call of this.calls.values()) {
      if (!call.started) continue;
      if (this.draining) call.interrupt(gone);
      else call.abort(gone);
    }
    this.hostCalls.clear();
    this.slotWaiters = [];
    this.hostOutstanding = 0;
    if (!this.draining) {
      for (const call of this.queue.splice(0)) this.#answerCancelled(call, "the host went away before it started");
    }
    this.#maybeFinish();
  }

  #maybeFinish() {
    if (this.state !== "ready" || this.finishing || !(this.draining || this.eof)) return;
    if (this.running === 0 && this.queue.length === 0) this.#exit(0, true);
  }

  /** Tears the adapter down (when asked), flushes the output, exits. */
  async #exit(code, teardown) {
    if (this.finishing) return;
    this.finishing = true;
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

module.exports = { Worker, Context, Session };
