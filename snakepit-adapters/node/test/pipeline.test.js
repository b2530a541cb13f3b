"use strict";
// Pipelining (docs/protocol.md §4e).

const assert = require("node:assert/strict");
const fs = require("node:fs");
const { test, afterEach } = require("node:test");
const { started, killAll, tempPath } = require("./host");

afterEach(killAll);

test("negotiation: the offer, capped at 16; none with max_in_flight > 1 or without an offer", async () => {
  assert.equal((await started(undefined, { hello: { pipeline_depth: 4 } })).ready.pipeline_depth, 4);
  assert.equal((await started(undefined, { hello: { pipeline_depth: 32 } })).ready.pipeline_depth, 16);
  assert.equal((await started(undefined, { hello: { pipeline_depth: 4, max_in_flight: 2 } })).ready.pipeline_depth, undefined);
  assert.equal((await started(undefined, { hello: { pipeline_depth: 1 } })).ready.pipeline_depth, undefined);
  const off = await started(undefined, { hello: { pipeline_depth: 4 }, env: { SNAKEPIT_BRIDGE_PIPELINE: "0" } });
  assert.equal(off.ready.pipeline_depth, undefined);
});

test("pipelined calls run one after another in arrival order", async () => {
  const host = await started(undefined, { hello: { pipeline_depth: 8 } });
  host.sendAll([
    { t: "call", id: 1, cmd: "sleep", args: { ms: 50 } },
    { t: "call", id: 2, cmd: "journal", args: { entry: "a" } },
    { t: "call", id: 3, cmd: "journal", args: { entry: "b" } },
    { t: "call", id: 4, cmd: "asleep", args: { ms: 1 } },
    { t: "call", id: 5, cmd: "journal", args: { entry: "c" } },
  ]);
  const answers = [];
  for (let i = 0; i < 5; i++) answers.push(await host.next());
  assert.deepEqual(
    answers.map((m) => [m.id, m.ok]),
    [[1, 50], [2, ["a"]], [3, ["a", "b"]], [4, 1], [5, ["a", "b", "c"]]]
  );
});

test("a cancel for a queued call answers it at once, and it never runs; later calls still run", async () => {
  const host = await started(undefined, { hello: { pipeline_depth: 4 } });
  const gate = tempPath("gate");
  host.send({ t: "call", id: 1, cmd: "wait_for", args: { path: gate } });
  host.send({ t: "call", id: 2, cmd: "journal", args: { entry: "cancelled" } });
  host.send({ t: "call", id: 3, cmd: "journal", args: { entry: "ran" } });
  host.send({ t: "cancel", id: 2 });
  // Answered while call 1 still holds the worker (the gate does not exist yet).
  assert.deepEqual(await host.next(), { t: "error", id: 2, error: { type: "Cancelled", message: "cancelled before it started" } });
  fs.writeFileSync(gate, "");
  assert.deepEqual(await host.next(), { t: "result", id: 1, ok: true });
  assert.deepEqual(await host.next(), { t: "result", id: 3, ok: ["ran"] });
});

test("a pipelined stream keeps its credit while it waits its turn", async () => {
  const host = await started(undefined, { hello: { pipeline_depth: 4 } });
  host.sendAll([
    { t: "call", id: 1, cmd: "sleep", args: { ms: 20 } },
    { t: "call", id: 2, cmd: "count", args: { n: 3 }, stream: 1 },
    { t: "call", id: 3, cmd: "add", args: { a: 1, b: 2 } },
  ]);
  assert.deepEqual(await host.next(), { t: "result", id: 1, ok: 20 });
  assert.deepEqual(await host.next(), { t: "chunk", id: 2, data: { i: 0 } });
  host.send({ t: "credit", id: 2, n: 5 });
  assert.deepEqual(await host.next(), { t: "chunk", id: 2, data: { i: 1 } });
  assert.deepEqual(await host.next(), { t: "chunk", id: 2, data: { i: 2 } });
  assert.deepEqual(await host.next(), { t: "end", id: 2 });
  assert.deepEqual(await host.next(), { t: "result", id: 3, ok: 3 });
});

test("shutdown behind pipelined calls: they run, then the worker exits 0", async () => {
  const host = await started(undefined, { hello: { pipeline_depth: 4 } });
  host.sendAll([
    { t: "call", id: 1, cmd: "sleep", args: { ms: 20 } },
    { t: "call", id: 2, cmd: "journal", args: { entry: "x" } },
    { t: "shutdown" },
  ]);
  host.closeInput();
  assert.deepEqual(await host.next(), { t: "result", id: 1, ok: 20 });
  assert.deepEqual(await host.next(), { t: "result", id: 2, ok: ["x"] });
  assert.deepEqual(await host.exit(), { code: 0, signal: null });
});
