"use strict";
// Calls: results, errors, cancellation, concurrency, heartbeats, shutdown and end of input.

const assert = require("node:assert/strict");
const fs = require("node:fs");
const { test, afterEach } = require("node:test");
const { Host, started, killAll, writeScript, tempPath } = require("./host");

afterEach(killAll);

const ODD = writeScript(
  "odd.js",
  `const { tool, serve } = require("snakepit-bridge");
tool("big_int", () => 10n);
tool("cycle", () => { const o = { a: 1 }; o.self = o; return o; });
tool("nothing", () => undefined);
tool("args", (args) => ({ args, type: Array.isArray(args) ? "array" : typeof args }));
tool("throw_string", () => { throw "a plain string"; });
tool("throw_object", () => { throw { code: 7 }; });
tool("reject", async () => { throw new RangeError("out of range"); });
tool("thenable", () => ({ then(ok) { ok("from a thenable"); } }));
tool("collections", () => ({ m: new Map([["k", 1]]), s: new Set([1, 2]), d: new Date(0), u: undefined, f() {} }));
tool("ignores_abort", async (_args, ctx) => {
  await new Promise((resolve) => ctx.signal.addEventListener("abort", resolve));
  return "finished anyway";
});
serve();
`
);

test("results: add, echo, ping, undefined as null, args as sent (null as {})", async () => {
  const host = await started(ODD);
  assert.deepEqual(await host.call(1, "args", null), { t: "result", id: 1, ok: { args: {}, type: "object" } });
  assert.deepEqual((await host.call(2, "args", [1, 2])).ok, { args: [1, 2], type: "array" });
  assert.deepEqual((await host.call(3, "args", "text")).ok, { args: "text", type: "string" });
  assert.deepEqual((await host.call(4, "args", 0)).ok, { args: 0, type: "number" });
  assert.deepEqual(await host.call(5, "nothing"), { t: "result", id: 5, ok: null });
  assert.equal((await host.call(6, "thenable")).ok, "from a thenable");
  assert.deepEqual((await host.call(7, "collections")).ok, { m: { k: 1 }, s: [1, 2], d: "1970-01-01T00:00:00.000Z" });

  const showcase = await started();
  assert.deepEqual(await showcase.call(1, "add", { a: 1, b: 2 }), { t: "result", id: 1, ok: 3 });
  assert.deepEqual((await showcase.call(2, "echo", { x: [1, "two"] })).ok, { x: [1, "two"] });
  assert.equal((await showcase.call(3, "echo", "mine")).ok, "mine");
  assert.equal((await showcase.call(4, "echo", 1)).ok, 1);
  assert.deepEqual((await showcase.call(5, "echo", null)).ok, {}, "null arguments arrive as {}");
  assert.equal((await showcase.call(6, "ping")).ok, "pong");
  assert.equal((await showcase.call(7, "adouble", { x: 21 })).ok, 42);
  assert.equal((await showcase.call(8, "cpu", { n: 100 })).ok, 25);
  assert.equal((await showcase.call(9, "pid")).ok, showcase.pid);
  assert.equal((await showcase.call(10, "big", { bytes: 5 })).ok, "xxxxx");
  assert.equal((await showcase.call(11, "env", { name: "SNAKEPIT_PROTOCOL_FDS" })).ok, "3,4");
  assert.deepEqual((await showcase.call(12, "journal", { entry: "a" })).ok, ["a"]);
  assert.deepEqual((await showcase.call(13, "journal")).ok, ["a"]);
});

test("errors: an Error's name, message and stack; other thrown values; a rejected promise", async () => {
  const showcase = await started();
  const e = await showcase.call(1, "fail", { type: "KeyError", message: "nope" });
  assert.equal(e.t, "error");
  assert.equal(e.error.type, "KeyError");
  assert.equal(e.error.message, "nope");
  assert.match(e.error.traceback, /^KeyError: nope\n\s+at /);
  assert.equal((await showcase.call(2, "fail")).error.type, "ValueError");

  const host = await started(ODD);
  assert.deepEqual((await host.call(1, "throw_string")).error, { type: "Error", message: "a plain string" });
  assert.deepEqual((await host.call(2, "throw_object")).error, { type: "Error", message: "[object Object]" });
  const r = await host.call(3, "reject");
  assert.equal(r.error.type, "RangeError");
  assert.equal(r.error.message, "out of range");
});

test("a result JSON cannot hold is a TypeError, and the worker keeps serving", async () => {
  const host = await started(ODD);
  const big = await host.call(1, "big_int");
  assert.equal(big.error.type, "TypeError");
  assert.match(big.error.message, /^result is not JSON-serialisable: .*BigInt/);
  const cycle = await host.call(2, "cycle");
  assert.equal(cycle.error.type, "TypeError");
  assert.match(cycle.error.message, /circular/);
  assert.deepEqual(await host.call(3, "nothing"), { t: "result", id: 3, ok: null });
});

test("unknown command; a result over max_frame is FrameTooLarge", async () => {
  const host = await started(undefined, { hello: { max_frame: 1000 } });
  assert.deepEqual((await host.call(1, "nope")).error, { type: "UnknownCommand", message: 'no tool named "nope"' });
  const e = await host.call(2, "big", { bytes: 5000 });
  assert.equal(e.error.type, "FrameTooLarge");
  assert.match(e.error.message, /exceeds max_frame 1000/);
  assert.equal((await host.call(3, "big", { bytes: 10 })).ok, "xxxxxxxxxx");
});

test("ping is answered with pong", async () => {
  const host = await started();
  host.send({ t: "ping", id: 77 });
  assert.deepEqual(await host.next(), { t: "pong", id: 77 });
});

test("concurrency: max_in_flight 4 runs four sleeps at once (they end in reverse order)", async () => {
  const host = await started(undefined, { hello: { max_in_flight: 4 } });
  assert.equal(host.ready.max_in_flight, 4);
  assert.equal(host.ready.pipeline_depth, undefined);
  const ms = [800, 600, 400, 200];
  ms.forEach((m, i) => host.send({ t: "call", id: i + 1, cmd: "sleep", args: { ms: m } }));
  const order = [];
  for (let i = 0; i < 4; i++) {
    const m = await host.next();
    assert.equal(m.t, "result");
    order.push(m.id);
  }
  assert.deepEqual(order, [4, 3, 2, 1], "run one at a time, they would end 1, 2, 3, 4");
});

test("cancel of a running async tool aborts ctx.signal: answered Cancelled", async () => {
  const host = await started();
  host.send({ t: "call", id: 1, cmd: "sleep", args: { ms: 60000 } });
  await host.roundTrip();
  host.send({ t: "cancel", id: 1 });
  assert.deepEqual(await host.next(), { t: "error", id: 1, error: { type: "Cancelled", message: "call cancelled by the host" } });
  // A cancel for a call already answered is ignored.
  host.send({ t: "cancel", id: 1 });
  assert.equal((await host.call(2, "add", { a: 1, b: 1 })).ok, 2);
});

test("cancel: finally blocks run before the answer; a busy loop in slices notices it", async () => {
  const host = await started();
  const started_ = tempPath("started");
  const done = tempPath("done");
  host.send({ t: "call", id: 1, cmd: "sleep_then_touch", args: { ms: 60000, path: done, started: started_ } });
  await host.roundTrip();
  host.send({ t: "cancel", id: 1 });
  assert.equal((await host.next()).error.type, "Cancelled");
  assert.ok(fs.existsSync(started_) && fs.existsSync(done), "the tool ran, and its finally block before the answer");

  host.send({ t: "call", id: 2, cmd: "spin", args: { seconds: 60 } });
  host.send({ t: "ping", id: 3 });
  assert.deepEqual(await host.next(), { t: "pong", id: 3 }, "the event loop runs between slices");
  host.send({ t: "cancel", id: 2 });
  assert.equal((await host.next()).error.type, "Cancelled");
});

test("a cancel right behind a call, read with it, answers it Cancelled before it starts", async () => {
  const host = await started();
  const ran = tempPath("ran");
  host.sendAll([
    { t: "call", id: 1, cmd: "touch", args: { path: ran } },
    { t: "cancel", id: 1 },
  ]);
  assert.deepEqual((await host.next()).error, { type: "Cancelled", message: "cancelled before it started" });
  assert.equal(fs.existsSync(ran), false);
});

test("a tool that ignores the abort and resolves is answered with its result", async () => {
  const host = await started(ODD);
  host.send({ t: "call", id: 1, cmd: "ignores_abort" });
  await host.roundTrip();
  host.send({ t: "cancel", id: 1 });
  assert.deepEqual(await host.next(), { t: "result", id: 1, ok: "finished anyway" });
});

test("timeout_ms aborts ctx.signal when it passes", async () => {
  const host = await started();
  const r = await host.call(1, "asleep", { ms: 60000 }, { timeout_ms: 30 });
  assert.deepEqual(r.error, { type: "Cancelled", message: "the call's deadline passed (timeout_ms 30)" });
  assert.equal((await host.call(2, "asleep", { ms: 1 }, { timeout_ms: 60000 })).ok, 1);
});

test("shutdown: calls in flight finish, later calls get ShuttingDown, then exit 0", async () => {
  const host = await started(undefined, { hello: { max_in_flight: 2 } });
  const gate = tempPath("gate");
  host.send({ t: "call", id: 1, cmd: "wait_for", args: { path: gate } });
  host.send({ t: "shutdown" });
  const late = await host.call(2, "add", { a: 1, b: 2 });
  assert.deepEqual(late.error, { type: "ShuttingDown", message: "the worker is shutting down" });
  fs.writeFileSync(gate, "");
  assert.deepEqual(await host.next(), { t: "result", id: 1, ok: true });
  assert.deepEqual(await host.exit(), { code: 0, signal: null });
});

test("shutdown of an idle worker exits 0", async () => {
  const host = await started();
  host.send({ t: "shutdown" });
  assert.deepEqual(await host.exit(), { code: 0, signal: null });
});

test("shutdown then end of input (a graceful stop): the running call still finishes", async () => {
  const host = await started();
  const gate = tempPath("gate");
  host.send({ t: "call", id: 1, cmd: "wait_for", args: { path: gate } });
  host.send({ t: "shutdown" });
  host.closeInput();
  fs.writeFileSync(gate, "");
  assert.deepEqual(await host.next(), { t: "result", id: 1, ok: true });
  assert.deepEqual(await host.exit(), { code: 0, signal: null });
});

test("end of input exits 0; a call waiting for the host ends Cancelled, a running one is aborted", async () => {
  const idle = await started();
  idle.closeInput();
  assert.deepEqual(await idle.exit(), { code: 0, signal: null });

  const host = await started(undefined, { hello: { max_in_flight: 2 } });
  host.send({ t: "call", id: 1, cmd: "ask_host", args: { name: "lookup" } });
  assert.equal((await host.next()).t, "host_call");
  host.send({ t: "call", id: 2, cmd: "sleep", args: { ms: 60000 } });
  await host.roundTrip(); // call 2 has started
  host.closeInput();
  const answers = [await host.next(), await host.next()].sort((a, b) => a.id - b.id);
  assert.deepEqual(answers, [
    { t: "error", id: 1, error: { type: "Cancelled", message: "the host went away" } },
    { t: "error", id: 2, error: { type: "Cancelled", message: "the host went away" } },
  ]);
  assert.deepEqual(await host.exit(), { code: 0, signal: null });
});

test("crash exits with its code; print_stdout goes to stderr", async () => {
  const host = await started();
  assert.equal((await host.call(1, "print_stdout", { text: "printed text" })).ok, 12);
  await host.stderrMatches(/printed text\n[^]*printed text\n/);
  host.send({ t: "call", id: 2, cmd: "crash", args: { code: 3 } });
  assert.deepEqual(await host.exit(), { code: 3, signal: null });
  await host.stderrMatches(/showcase: crashing with exit code 3/);
});

test("garbage writes to the real protocol fd", async () => {
  const host = await started();
  host.send({ t: "call", id: 1, cmd: "garbage", args: { kind: "json" } });
  assert.deepEqual(await host.next(), { t: "$raw", body: "not json!" });
  assert.deepEqual(await host.next(), { t: "result", id: 1, ok: "json" });
});
