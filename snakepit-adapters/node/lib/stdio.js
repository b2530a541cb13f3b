"use strict";
// Calls over the protocol pipe (docs/protocol.md §4, §4a, §4b): a call's answers as frames
// (result, chunks within the host's credit, end, error) and host calls as host_call frames.

const codec = require("./codec");
const { encodeValue } = require("./invoke");
const { CancelledError, HostCallError, FrameTooLargeError } = require("./errors");

/** A `call` frame's answers (the `reply` of lib/invoke.js). */
class StdioReply {
  /**
   * @param {import("./worker").Worker} worker
   * @param {import("./call").Call} call
   * @param {number} window  the initial credit of a streamed call (0: a plain call)
   */
  constructor(worker, call, window) {
    this.worker = worker;
    this.call = call;
    this.idJson = JSON.stringify(call.id);
    this.credit = window;
  }

  /** A `credit` frame: the consumer took `n` more chunks. */
  addCredit(n) {
    this.credit += n;
    if (this.credit > 0) this.call.unblock();
  }

  result(value) {
    if (this.call.settle()) this.worker.send(this.#encode("result", "ok", value).bufs);
  }

  /** Waits for credit, then sends the chunk; never beyond the credit. */
  async chunk(value) {
    while (this.credit <= 0) {
      if (this.worker.eof) throw new CancelledError("the host went away");
      await this.call.block();
    }
    const chunk = this.#encode("chunk", "data", value);
    if (!chunk.ok) {
      this.#final(chunk.bufs);
      return false;
    }
    this.credit--;
    const out = this.worker.out;
    out.send(chunk.bufs);
    if (out.needsDrain) await out.drained();
    return true;
  }

  end() {
    this.#final(codec.messageFrame({ t: "end", id: this.call.id }));
  }

  error(info) {
    if (this.call.settle()) this.worker.send(this.#errorFrame(info));
  }

  #final(bufs) {
    if (this.call.settle()) this.worker.send(bufs);
  }

  /**
   * A `t` message for the call carrying `value` under `key`: {ok, bufs}. When the value cannot
   * be sent (not JSON, over max_frame) bufs is the error to answer instead, and ok false.
   */
  #encode(t, key, value) {
    const enc = encodeValue(value, this.worker.segments);
    if (!enc.ok) return { ok: false, bufs: this.#errorFrame(enc.error) };
    const json = `{"t":"${t}","id":${this.idJson},"${key}":${enc.json}}`;
    try {
      return { ok: true, bufs: codec.frame(json, enc.segs, this.worker.maxFrame) };
    } catch (e) {
      if (!(e instanceof FrameTooLargeError)) throw e;
      return { ok: false, bufs: this.#errorFrame({ type: "FrameTooLarge", message: e.message }) };
    }
  }

  #errorFrame(error) {
    const id = this.call.id;
    try {
      return codec.frame(JSON.stringify({ t: "error", id, error }), null, this.worker.maxFrame);
    } catch (e) {
      if (!(e instanceof FrameTooLargeError)) throw e;
      return codec.messageFrame({ t: "error", id, error: { type: "FrameTooLarge", message: e.message } });
    }
  }
}

/** Host calls as host_call frames, answered by host_result frames (§4b). */
class StdioHostLink {
  constructor(worker) {
    this.worker = worker;
    this.seq = 0;
    this.pending = new Map(); // host_call id -> wait, until its host_result
  }

  /**
   * Sends a host_call for `call` (which holds a host-call slot); the promise settles with its
   * host_result, which frees the slot. Throws at once when the arguments cannot be sent.
   */
  call(call, name, args) {
    const worker = this.worker;
    let enc;
    try {
      enc = codec.encode(args, worker.segments);
    } catch (e) {
      throw new TypeError(`host call arguments are not JSON-serialisable: ${e && e.message}`);
    }
    const hid = ++this.seq;
    const head = `{"t":"host_call","id":${hid},"call":${JSON.stringify(call.id)},"name":${JSON.stringify(name)}`;
    const json = `${head},"args":${enc.json}}`;
    const bufs = codec.frame(json, enc.segs, worker.maxFrame);
    return new Promise((resolve, reject) => {
      const wait = { call, resolve, reject, settled: false };
      this.pending.set(hid, wait);
      call.hostWaits.add(wait);
      worker.send(bufs);
    });
  }

  onResult(msg, segs) {
    const wait = this.pending.get(msg.id);
    if (!wait) return;
    this.pending.delete(msg.id);
    this.worker.releaseHostSlot(); // counted until its result arrived, even if the call gave up on it
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

  /**
   * End of input: no host_result can come any more. The waits still pending reject with `err`;
   * returns how many host-call slots that frees.
   */
  dropAll(err) {
    const n = this.pending.size;
    for (const wait of this.pending.values()) {
      wait.call.hostWaits.delete(wait);
      if (!wait.settled) {
        wait.settled = true;
        wait.reject(err);
      }
    }
    this.pending.clear();
    return n;
  }
}

module.exports = { StdioReply, StdioHostLink };
