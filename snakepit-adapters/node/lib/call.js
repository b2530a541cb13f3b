"use strict";
// One call from its arrival to its answer, whichever transport brought it (the stdio frames
// of lib/worker.js or the gRPC server of lib/grpc.js), and what its tool sees of it (ctx).

const codec = require("./codec");

/**
 * A call's state. The transport that brought it sets `reply` (how its answer is sent: see
 * lib/invoke.js) before the worker accepts it.
 */
class Call {
  /**
   * @param {object} worker  the Worker (lib/worker.js): host calls, bookkeeping
   * @param {{id: unknown, cmd: unknown, args: unknown, segs?: Buffer[] | null, session?: string | null, streamed?: boolean}} spec
   */
  constructor(worker, { id, cmd, args, segs = null, session = null, streamed = false }) {
    this.worker = worker;
    this.id = id;
    this.cmd = cmd;
    this.rawArgs = args;
    this.segs = segs;
    this.sessionId = session;
    this.streamed = streamed; // answered with chunks (a stream), not one result
    this.reply = null;
    this.controller = new AbortController();
    this.started = false;
    this.done = false;
    this.timer = null;
    this.blocker = null; // what the call's stream waits for (credit, drain), see block()
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

  /** Aborts ctx.signal and ends what the call waits for (host results, credit, drain). */
  abort(reason) {
    if (this.controller.signal.aborted) return;
    this.controller.abort(reason);
    this.interrupt(reason);
  }

  /** Rejects the call's waits (block(), host results, host-call slots) with `err`. */
  interrupt(err) {
    const b = this.blocker;
    if (b) {
      this.blocker = null;
      b.reject(err);
    }
    for (const h of this.hostWaits) {
      if (!h.settled) {
        h.settled = true;
        h.reject(err);
        if (h.cancel) h.cancel();
      }
    }
    this.hostWaits.clear();
  }

  /** Resolves at the next unblock(); rejects when the call is aborted or interrupted first. */
  block() {
    if (this.signal.aborted) return Promise.reject(this.signal.reason);
    return new Promise((resolve, reject) => {
      this.blocker = { resolve, reject };
    });
  }

  unblock() {
    const b = this.blocker;
    if (b) {
      this.blocker = null;
      b.resolve();
    }
  }

  /** Marks the call answered (true the first time only) and forgets it. */
  settle() {
    if (this.done) return false;
    this.done = true;
    if (this.timer) clearTimeout(this.timer);
    this.worker.forget(this);
    return true;
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

/** The pool's global variables, through the `global.*` host calls (read each time). */
class Globals {
  #ctx;
  constructor(ctx) {
    this.#ctx = ctx;
  }

  /** The global's value, or null when unset. */
  get(name) {
    return this.#ctx.callHost("global.get", { name });
  }

  /** Sets the global. */
  async set(name, value) {
    await this.#ctx.callHost("global.set", { name, value });
  }

  /** Deletes the global; resolves to whether it was set. */
  delete(name) {
    return this.#ctx.callHost("global.delete", { name });
  }
}

/** What a tool gets as its second argument. */
class Context {
  #call;
  #session;
  #globals;
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

  /** The pool's global variables (pool-wide, outside any session). */
  get globals() {
    if (this.#globals === undefined) this.#globals = new Globals(this);
    return this.#globals;
  }

  /** Calls the host tool `name`; rejects with HostCallError (or CancelledError). */
  callHost(name, args = null) {
    return this.#call.worker.callHost(this.#call, name, args);
  }
}

module.exports = { Call, Context, Globals, Session };
