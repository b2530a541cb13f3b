"use strict";
// Running a call's tool to its answer, the same for every transport. How the answer travels
// is the call's `reply` (lib/worker.js: frames on the protocol pipe; lib/grpc.js: gRPC):
//
//   reply.result(value)       the answer of a plain call (a value that cannot be sent, not JSON
//                             or over max_frame, is answered with that error instead)
//   reply.chunk(value)        one item of a streamed call: waits until the item may go (credit,
//                             the transport's backpressure; rejects once the call is aborted),
//                             sends it, resolves true; or answers the error and resolves false
//                             when the item cannot be sent (the stream is then over)
//   reply.end()               a streamed call is complete
//   reply.error(info)         answers {type, message, traceback?}
//
// result, end and error answer at most once (call.settle()).

const { setImmediate: nextTurn } = require("node:timers/promises");
const codec = require("./codec");
const io = require("./io");
const { Context } = require("./call");
const { CancelledError } = require("./errors");

// A stream or a collected generator lets the event loop run (to read a cancel, say) at least
// every this many items, even when nothing else makes it wait.
const YIELD_EVERY = 16;

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
 * A value to send, as JSON text and segments: {ok: true, json, segs} or, for a value JSON
 * cannot hold (a BigInt, a cycle, binary data without segments agreed), {ok: false, error}
 * with a TypeError worker error.
 */
function encodeValue(value, withSegments) {
  try {
    const { json, segs } = codec.encode(value, withSegments);
    return { ok: true, json, segs };
  } catch (e) {
    return { ok: false, error: { type: "TypeError", message: `result is not JSON-serialisable: ${e && e.message}` } };
  }
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

function answerCancelled(call, message) {
  call.reply.error({ type: "Cancelled", message: message || "cancelled" });
}

/** Answers what a tool threw: Cancelled once the call was aborted, else the error. */
function answerThrown(call, e) {
  if (call.signal.aborted) return answerCancelled(call, call.signal.reason.message);
  if (e instanceof CancelledError) return answerCancelled(call, e.message);
  call.reply.error(errorInfo(e));
}

/**
 * Runs the call's tool (from `tools`, by name) and answers it: its value, the items of a
 * streamed call, or its error. Resolves once answered.
 */
async function runCall(call, tools) {
  call.started = true;
  if (call.signal.aborted) return answerCancelled(call, call.signal.reason.message);
  const entry = typeof call.cmd === "string" ? tools.get(call.cmd) : undefined;
  if (!entry) {
    return call.reply.error({ type: "UnknownCommand", message: `no tool named ${JSON.stringify(call.cmd)}` });
  }
  try {
    let result = entry.fn.call(entry.self, call.args(), new Context(call));
    if (isThenable(result)) result = await result;
    const source = iterate(result, entry.stream);
    if (source && call.streamed) return await stream(call, source);
    if (source) result = await collect(call, source);
    if (!call.streamed) return call.reply.result(result);
    // A plain tool called as a stream: one chunk, then the end.
    if (await call.reply.chunk(result)) call.reply.end();
  } catch (e) {
    answerThrown(call, e);
  }
}

/**
 * Sends a generator's items as chunks, as fast as the reply lets them go, then the end. A
 * cancel ends the generator (its `finally` blocks run). Like the Python bridge, the next item
 * is taken before waiting to send, so the end goes out as soon as the generator is done.
 */
async function stream(call, { it, isAsync }) {
  let sent = 0;
  try {
    for (;;) {
      if (call.signal.aborted) throw call.signal.reason;
      const step = isAsync ? await it.next() : it.next();
      if (step.done) break;
      if (call.signal.aborted) throw call.signal.reason;
      if (!(await call.reply.chunk(step.value))) {
        await closeIterator(it, isAsync);
        return;
      }
      if (++sent % YIELD_EVERY === 0) await nextTurn();
    }
  } catch (e) {
    await closeIterator(it, isAsync);
    return answerThrown(call, e);
  }
  call.reply.end();
}

/** A generator called without streaming: its items, for one result. */
async function collect(call, { it, isAsync }) {
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

module.exports = { runCall, answerCancelled, encodeValue, errorInfo, stackOf };
