"use strict";
// Calls to the host and sessions (§4b), binary segments (§4c).

const assert = require("node:assert/strict");
const { test, afterEach } = require("node:test");
const { started, killAll, writeScript } = require("./host");

afterEach(killAll);

const TOOLS = writeScript(
  "hostcalls.js",
  `const { tool, serve, HostCallError } = require("snakepit-bridge");
tool("forget", async ({ name }, ctx) => ctx.session.delete(name));
tool("visit", async (_args, ctx) => {
  const n = ((await ctx.globals.get("visits")) || 0) + 1;
  await ctx.globals.set("visits", n);
  return [n, await ctx.globals.delete("other")];
});
tool("session_id", (_args, ctx) => (ctx.session ? ctx.session.id : null));
tool("fan_out", async ({ n }, ctx) => {
  const answers = await Promise.all(Array.from({ length: n }, (_, i) => ctx.callHost("double", i)));
  return answers.reduce((a, b) => a + b, 0);
});
tool("store", async ({ size }, ctx) => {
  const back = await ctx.callHost("store", { data: Buffer.alloc(size, 9), label: "blob" });
  return { isBuffer: Buffer.isBuffer(back), bytes: [...back.subarray(0, 4)], length: back.length };
});
tool("blob", ({ size }) => Buffer.alloc(size, 7));
tool("nested", () => ({ a: new Uint8Array([1, 2, 3]), b: [Buffer.from("hi"), new ArrayBuffer(2)], n: 1 }));
tool("inspect", (args) => ({ isBuffer: Buffer.isBuffer(args.data), text: args.data.toString(), more: args.more }));
tool("host_error_type", async (_args, ctx) => {
  try { await ctx.callHost("nope"); } catch (e) { return [e instanceof HostCallError, e.name, e.type, e.message]; }
});
serve();
`
);

test("ask_host: a host result, and a host error as a HostCallError", async () => {
  const host = await started();
  host.send({ t: "call", id: 1, cmd: "ask_host", args: { name: "lookup", args: { id: 7 } } });
  const hc = await host.next();
  assert.deepEqual({ ...hc, id: undefined }, { t: "host_call", id: undefined, call: 1, name: "lookup", args: { id: 7 } });
  host.send({ t: "host_result", id: hc.id, ok: { user: "ann" } });
  assert.deepEqual(await host.next(), { t: "result", id: 1, ok: { ok: { user: "ann" } } });

  host.send({ t: "call", id: 2, cmd: "ask_host", args: { name: "missing" } });
  const hc2 = await host.next();
  assert.equal(hc2.args, null);
  assert.notEqual(hc2.id, hc.id);
  host.send({ t: "host_result", id: hc2.id, error: { type: "UnknownHostTool", message: "no host tool missing" } });
  assert.deepEqual((await host.next()).ok, { error: "UnknownHostTool", message: "no host tool missing" });

  const tools = await started(TOOLS);
  tools.send({ t: "call", id: 1, cmd: "host_error_type" });
  const hc3 = await tools.next();
  tools.send({ t: "host_result", id: hc3.id, error: { type: "UnknownHostTool", message: "nope" } });
  assert.deepEqual((await tools.next()).ok, [true, "HostCallError", "UnknownHostTool", "nope"]);
});

test("sessions: set then get, delete, the session id; none outside a session", async () => {
  const host = await started();
  host.send({ t: "call", id: 1, cmd: "remember", args: { name: "k", value: 42 }, session: "s1" });
  const set = await host.next();
  assert.deepEqual([set.t, set.call, set.name, set.args], ["host_call", 1, "session.set", { name: "k", value: 42 }]);
  host.send({ t: "host_result", id: set.id, ok: null });
  const get = await host.next();
  assert.deepEqual([get.name, get.args], ["session.get", { name: "k" }]);
  host.send({ t: "host_result", id: get.id, ok: 42 });
  assert.deepEqual(await host.next(), { t: "result", id: 1, ok: 42 });

  assert.deepEqual(await host.call(2, "recall", { name: "k" }), { t: "result", id: 2, ok: null }, "no host call without a session");
  const e = await host.call(3, "remember", { name: "k", value: 1 });
  assert.deepEqual(e.error.type, "AttributeError");

  const tools = await started(TOOLS);
  tools.send({ t: "call", id: 1, cmd: "forget", args: { name: "k" }, session: "s1" });
  const del = await tools.next();
  assert.deepEqual([del.name, del.args], ["session.delete", { name: "k" }]);
  tools.send({ t: "host_result", id: del.id, ok: true });
  assert.deepEqual((await tools.next()).ok, true);
  assert.equal((await tools.call(2, "session_id", null, { session: "s9" })).ok, "s9");
  assert.equal((await tools.call(3, "session_id")).ok, null);
});

test("globals: get, set and delete as global.* host calls, in or out of a session", async () => {
  const tools = await started(TOOLS);
  for (const [id, session] of [[1, undefined], [2, "s1"]]) {
    tools.send({ t: "call", id, cmd: "visit", ...(session ? { session } : {}) });
    const get = await tools.next();
    assert.deepEqual([get.call, get.name, get.args], [id, "global.get", { name: "visits" }]);
    tools.send({ t: "host_result", id: get.id, ok: id === 1 ? null : 1 });
    const set = await tools.next();
    assert.deepEqual([set.name, set.args], ["global.set", { name: "visits", value: id }]);
    tools.send({ t: "host_result", id: set.id, ok: null });
    const del = await tools.next();
    assert.deepEqual([del.name, del.args], ["global.delete", { name: "other" }]);
    tools.send({ t: "host_result", id: del.id, ok: false });
    assert.deepEqual(await tools.next(), { t: "result", id, ok: [id, false] });
  }
});

test("at most 64 host calls are outstanding; the rest wait for results", async () => {
  const host = await started(TOOLS);
  host.send({ t: "call", id: 1, cmd: "fan_out", args: { n: 70 } });
  const calls = [];
  for (let i = 0; i < 64; i++) calls.push(await host.next());
  await host.roundTrip();
  assert.equal(host.messages.length, 0, "no 65th host_call");
  for (const hc of calls.splice(0, 3)) host.send({ t: "host_result", id: hc.id, ok: hc.args * 2 });
  for (let i = 0; i < 3; i++) calls.push(await host.next());
  await host.roundTrip();
  assert.equal(host.messages.length, 0);
  for (const hc of calls) host.send({ t: "host_result", id: hc.id, ok: hc.args * 2 });
  for (let i = 0; i < 3; i++) {
    const hc = await host.next((m) => m.t === "host_call");
    host.send({ t: "host_result", id: hc.id, ok: hc.args * 2 });
  }
  assert.deepEqual(await host.next((m) => m.t === "result"), { t: "result", id: 1, ok: 2 * ((69 * 70) / 2) });
});

test("binary segments: args become Buffers, binary results and host-call args become segments", async () => {
  const host = await started(TOOLS, { hello: { segments: true } });
  assert.equal(host.ready.segments, true);

  host.send({ t: "call", id: 1, cmd: "inspect", args: { data: { $seg: 0 }, more: [{ $seg: 1, dtype: "<u1", shape: [2] }] } }, [
    Buffer.from("hello"),
    Buffer.from([1, 2]),
  ]);
  const r1 = await host.next();
  assert.equal(r1.t, "result", JSON.stringify(r1));
  assert.equal(r1.ok.isBuffer, true);
  assert.equal(r1.ok.text, "hello");
  assert.deepEqual(r1.ok.more, [{ $seg: 0 }], "a Buffer in the result is a segment");
  assert.deepEqual([...r1.$segs[0]], [1, 2]);

  // A raw echo, small (copied into the frame) and large (written beside it).
  const showcase = await started(undefined, { hello: { segments: true } });
  for (const [id, size] of [[1, 3], [2, 300 * 1024]]) {
    const bytes = Buffer.alloc(size, id);
    bytes[0] = 0xfe;
    showcase.send({ t: "call", id, cmd: "echo", args: { $seg: 0 } }, [bytes]);
    const r = await showcase.next();
    assert.deepEqual(r.ok, { $seg: 0 });
    assert.deepEqual(r.seg, [size]);
    assert.ok(r.$segs[0].equals(bytes));
  }

  const r3 = await host.call(3, "nested");
  assert.deepEqual(r3.ok, { a: { $seg: 0 }, b: [{ $seg: 1 }, { $seg: 2 }], n: 1 });
  assert.deepEqual(r3.$segs.map((s) => [...s]), [[1, 2, 3], [104, 105], [0, 0]]);

  host.send({ t: "call", id: 4, cmd: "store", args: { size: 100000 } });
  const hc = await host.next();
  assert.equal(hc.t, "host_call");
  assert.deepEqual(hc.args, { data: { $seg: 0 }, label: "blob" });
  assert.equal(hc.$segs[0].length, 100000);
  assert.ok(hc.$segs[0].every((b) => b === 9));
  host.send({ t: "host_result", id: hc.id, ok: { $seg: 0 } }, [Buffer.from([5, 6, 7, 8, 9])]);
  assert.deepEqual((await host.next()).ok, { isBuffer: true, bytes: [5, 6, 7, 8], length: 5 });

  host.send({ t: "call", id: 6, cmd: "inspect", args: { data: { $seg: 3 } } }, [Buffer.from("x")]);
  const bad = (await host.next()).error;
  assert.deepEqual([bad.type, bad.message], ["BadSegment", "segment 3 referred to, 1 sent"]);

  const big = await host.call(7, "blob", { size: 10 });
  assert.deepEqual([big.ok, big.seg, [...big.$segs[0]]], [{ $seg: 0 }, [10], Array(10).fill(7)]);
});

test("without segments agreed, binary results are a TypeError", async () => {
  const host = await started(TOOLS);
  const e = await host.call(1, "blob", { size: 4 });
  assert.equal(e.error.type, "TypeError");
  assert.match(e.error.message, /Buffer is binary data, and binary segments were not agreed/);
});

test("a segmented frame over max_frame is FrameTooLarge", async () => {
  const host = await started(TOOLS, { hello: { segments: true, max_frame: 4096 } });
  const e = await host.call(1, "blob", { size: 8000 });
  assert.equal(e.error.type, "FrameTooLarge");
});
