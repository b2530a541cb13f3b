"use strict";
// Streaming (docs/protocol.md §4a): credit, end, errors, cancellation, the mixed cases.

const assert = require("node:assert/strict");
const fs = require("node:fs");
const { test, afterEach } = require("node:test");
const { started, killAll, writeScript, tempPath } = require("./host");

afterEach(killAll);

test("chunks never go beyond the credit; more flow as credit comes; then end", async () => {
  const host = await started();
  host.send({ t: "call", id: 1, cmd: "count", args: { n: 6 }, stream: 2 });
  const seen = [];
  const take = async (k) => {
    for (let j = 0; j < k; j++) {
      const m = await host.next();
      assert.equal(m.t, "chunk", JSON.stringify(m));
      seen.push(m.data.i);
    }
    // Nothing more was sent before the worker answered this ping: it waits for credit.
    host.send({ t: "ping", id: `after-${seen.length}` });
    assert.deepEqual(await host.next(), { t: "pong", id: `after-${seen.length}` });
  };
  await take(2);
  host.send({ t: "credit", id: 1, n: 1 });
  await take(1);
  host.send({ t: "credit", id: 1, n: 2 });
  await take(2);
  host.send({ t: "credit", id: 1, n: 10 });
  assert.deepEqual(await host.next(), { t: "chunk", id: 1, data: { i: 5 } });
  assert.deepEqual(await host.next(), { t: "end", id: 1 });
  assert.deepEqual(seen, [0, 1, 2, 3, 4]);
});

test("a large window streams everything at once; pads travel", async () => {
  const host = await started();
  host.send({ t: "call", id: 1, cmd: "count", args: { n: 100, size: 1000 }, stream: 100 });
  for (let i = 0; i < 100; i++) {
    const m = await host.next();
    assert.equal(m.t, "chunk");
    assert.equal(m.data.i, i);
    assert.equal(m.data.pad.length, 1000);
  }
  assert.deepEqual(await host.next(), { t: "end", id: 1 });
});

test("cancel of a stream waiting for credit: the generator's finally runs, then Cancelled", async () => {
  const host = await started();
  const done = tempPath("finally");
  host.send({ t: "call", id: 1, cmd: "count", args: { n: 1000000, path: done }, stream: 1 });
  assert.deepEqual(await host.next(), { t: "chunk", id: 1, data: { i: 0 } });
  assert.equal(fs.existsSync(done), false);
  host.send({ t: "cancel", id: 1 });
  assert.deepEqual((await host.next()).error, { type: "Cancelled", message: "call cancelled by the host" });
  assert.ok(fs.existsSync(done), "the finally block ran before the answer");
});

test("the finally block also runs when a stream ends normally", async () => {
  const host = await started();
  const done = tempPath("finally");
  host.send({ t: "call", id: 1, cmd: "count", args: { n: 2, path: done }, stream: 8 });
  assert.equal((await host.next()).t, "chunk");
  assert.equal((await host.next()).t, "chunk");
  assert.deepEqual(await host.next(), { t: "end", id: 1 });
  assert.ok(fs.existsSync(done));
});

test("a plain tool called as a stream answers one chunk and end", async () => {
  const host = await started();
  host.send({ t: "call", id: 1, cmd: "add", args: { a: 2, b: 3 }, stream: 4 });
  assert.deepEqual(await host.next(), { t: "chunk", id: 1, data: 5 });
  assert.deepEqual(await host.next(), { t: "end", id: 1 });
});

test("a generator called without stream answers the list of its items", async () => {
  const host = await started();
  assert.deepEqual((await host.call(1, "count", { n: 3 })).ok, [{ i: 0 }, { i: 1 }, { i: 2 }]);
  assert.deepEqual((await host.call(2, "acount", { n: 40 })).ok, Array.from({ length: 40 }, (_, i) => i));
  assert.deepEqual((await host.call(3, "count", { n: 0 })).ok, []);
  const e = await host.call(4, "fail_after", { n: 2 });
  assert.equal(e.error.type, "ValueError");
});

test("an async generator streams; a generator that throws ends the stream with its error", async () => {
  const host = await started();
  host.send({ t: "call", id: 1, cmd: "acount", args: { n: 3 }, stream: 2 });
  assert.deepEqual(await host.next(), { t: "chunk", id: 1, data: 0 });
  assert.deepEqual(await host.next(), { t: "chunk", id: 1, data: 1 });
  host.send({ t: "credit", id: 1, n: 2 });
  assert.deepEqual(await host.next(), { t: "chunk", id: 1, data: 2 });
  assert.deepEqual(await host.next(), { t: "end", id: 1 });

  host.send({ t: "call", id: 2, cmd: "fail_after", args: { n: 2 }, stream: 10 });
  assert.deepEqual(await host.next(), { t: "chunk", id: 2, data: 0 });
  assert.deepEqual(await host.next(), { t: "chunk", id: 2, data: 1 });
  const e = await host.next();
  assert.equal(e.t, "error");
  assert.equal(e.error.type, "ValueError");
  assert.equal(e.error.message, "failed after 2 items");
});

test("streams of declared iterables, unencodable chunks, and an async generator cancelled mid-await", async () => {
  const script = writeScript(
    "streams.js",
    `const { tool, serve } = require("snakepit-bridge");
const fs = require("node:fs");
const { setTimeout: sleep } = require("node:timers/promises");
tool("letters", () => new Set(["a", "b"]), { stream: true });
tool("bad_chunk", function* () { yield 1; yield 2n; yield 3; });
tool("waits", async function* ({ path }, ctx) {
  try {
    yield "first";
    await sleep(60000, undefined, { signal: ctx.signal });
    yield "never";
  } finally {
    fs.writeFileSync(path, "closed");
  }
});
serve();
`
  );
  const host = await started(script);
  assert.equal(host.ready.tools.find((t) => t.name === "letters").stream, true);
  host.send({ t: "call", id: 1, cmd: "letters", stream: 5 });
  assert.deepEqual(await host.next(), { t: "chunk", id: 1, data: "a" });
  assert.deepEqual(await host.next(), { t: "chunk", id: 1, data: "b" });
  assert.deepEqual(await host.next(), { t: "end", id: 1 });

  host.send({ t: "call", id: 2, cmd: "bad_chunk", stream: 5 });
  assert.deepEqual(await host.next(), { t: "chunk", id: 2, data: 1 });
  const e = await host.next();
  assert.equal(e.error.type, "TypeError");
  assert.match(e.error.message, /BigInt/);

  const path = tempPath("closed");
  host.send({ t: "call", id: 3, cmd: "waits", args: { path }, stream: 5 });
  assert.deepEqual(await host.next(), { t: "chunk", id: 3, data: "first" });
  host.send({ t: "cancel", id: 3 });
  assert.equal((await host.next()).error.type, "Cancelled");
  assert.equal(fs.readFileSync(path, "utf8"), "closed");
});
