"use strict";
// Handshake, the forms of a worker (CommonJS, ESM, class), where output goes, bad frames.

const assert = require("node:assert/strict");
const fs = require("node:fs");
const { test, afterEach } = require("node:test");
const { Host, started, killAll, writeScript, tempPath, encodeFrame } = require("./host");

afterEach(killAll);

const PRINTING = writeScript(
  "printing.js",
  `console.log("load-time console.log");
process.stdout.write("load-time stdout.write\\n");
const { tool, serve } = require("snakepit-bridge");
tool("shout", ({ text }) => {
  console.log("tool console.log");
  process.stdout.write("tool stdout.write\\n");
  return text.toUpperCase();
});
serve();
`
);

test("ready: version, pid, bridge, tools with docs and stream marks", async () => {
  const host = await started();
  const { ready } = host;
  assert.equal(ready.version, 1);
  assert.equal(ready.pid, host.pid);
  assert.match(ready.bridge, /^node\/0\.1\.0 \(Node v\d+\.\d+\.\d+\)$/);
  assert.equal(ready.max_in_flight, 1);
  assert.equal(ready.segments, undefined);
  assert.equal(ready.pipeline_depth, undefined);
  for (const key of ["cancel_signal", "cancel_signals", "busy_ping", "shm"]) assert.equal(ready[key], undefined, key);
  const byName = Object.fromEntries(ready.tools.map((t) => [t.name, t]));
  const names = ready.tools.map((t) => t.name);
  assert.deepEqual(names, [...names].sort());
  for (const name of ["count", "acount", "fail_after"]) assert.equal(byName[name].stream, true, name);
  for (const name of ["add", "sleep", "asleep", "echo"]) assert.equal(byName[name].stream, undefined, name);
  assert.equal(byName.add.doc, "Returns a + b.");
  const python = [
    "ping", "echo", "add", "sleep", "sleep_then_touch", "stubborn_sleep", "cpu", "fail", "crash",
    "print_stdout", "garbage", "leak", "big", "pid", "env", "info", "grandchild", "count", "acount",
    "asleep", "spin", "adouble", "fail_after", "ask_host", "remember", "recall", "touch", "journal",
    "wait_for",
  ];
  assert.deepEqual(names, [...python].sort(), "the same tools as the Python showcase");
});

test("refuse: no common version (SNAKEPIT_BRIDGE_VERSIONS=99), then exit 0", async () => {
  const host = new Host(undefined, { env: { SNAKEPIT_BRIDGE_VERSIONS: "99" } });
  const m = await host.handshake();
  assert.equal(m.t, "refuse");
  assert.deepEqual(m.versions, [99]);
  assert.match(m.reason, /^snakepit-bridge \(node\) 0\.1\.0 \(.+\) speaks protocol versions \[99\], the host offered \[1\]$/);
  assert.match(m.bridge, /^node\/0\.1\.0/);
  assert.deepEqual(await host.exit(), { code: 0, signal: null });
});

test("console.log and process.stdout at load time and in a tool go to stderr, not the protocol", async () => {
  const host = await started(PRINTING);
  assert.deepEqual(await host.call(1, "shout", { text: "hi" }), { t: "result", id: 1, ok: "HI" });
  assert.deepEqual(await host.call(2, "shout", { text: "again" }), { t: "result", id: 2, ok: "AGAIN" });
  for (const line of ["load-time console.log", "load-time stdout.write", "tool console.log", "tool stdout.write"]) {
    await host.stderrMatches(line);
  }
});

test("stdin/stdout layout (no SNAKEPIT_PROTOCOL_FDS, no bootstrap): prints after the require go to stderr", async () => {
  // Here the protocol is fd 1: only what is printed once the library is loaded is safe.
  const script = writeScript(
    "stdio.js",
    `const { tool, serve } = require("snakepit-bridge");
console.log("load-time console.log");
tool("shout", ({ text }) => {
  process.stdout.write("tool stdout.write\\n");
  return text.toUpperCase();
});
serve();
`
  );
  const host = await started(script, { stdio: true, bootstrap: false });
  assert.deepEqual(await host.call(1, "shout", { text: "hi" }), { t: "result", id: 1, ok: "HI" });
  await host.stderrMatches("load-time console.log");
  await host.stderrMatches("tool stdout.write");
  host.closeInput();
  assert.deepEqual(await host.exit(), { code: 0, signal: null });
});

test("socketpair protocol fds (a Node parent's stdio pipes) work too", async () => {
  const host = await started(undefined, { pipes: "socketpair" });
  assert.deepEqual(await host.call(1, "add", { a: 2, b: 3 }), { t: "result", id: 1, ok: 5 });
  host.closeInput();
  assert.deepEqual(await host.exit(), { code: 0, signal: null });
});

test("ESM worker: import { tool, serve } from 'snakepit-bridge' through the bootstrap; require() shares the instance", async () => {
  const script = writeScript(
    "worker.mjs",
    `import { tool, serve, BRIDGE } from "snakepit-bridge";
import { createRequire } from "node:module";
const require = createRequire(import.meta.url);
require("snakepit-bridge").tool("from_cjs", () => "registered through require()");
tool("esm_add", ({ a, b }) => a + b, { doc: "adds" });
tool("bridge", () => BRIDGE);
console.log("esm load-time print");
serve();
`
  );
  const host = await started(script);
  assert.deepEqual(host.ready.tools, [{ name: "bridge" }, { name: "esm_add", doc: "adds" }, { name: "from_cjs" }]);
  assert.equal((await host.call(1, "esm_add", { a: 40, b: 2 })).ok, 42);
  assert.equal((await host.call(2, "from_cjs")).ok, "registered through require()");
  assert.equal((await host.call(3, "bridge")).ok, host.ready.bridge);
  await host.stderrMatches("esm load-time print");
});

test("ESM worker extending the showcase: import 'snakepit-bridge/showcase' registers its tools", async () => {
  const script = writeScript(
    "extends.mjs",
    `import "snakepit-bridge/showcase";
import { tool, serve, VERSION } from "snakepit-bridge";
tool("version", () => VERSION);
serve();
`
  );
  const host = await started(script);
  const names = host.ready.tools.map((t) => t.name);
  assert.ok(names.includes("version") && names.includes("count"), names.join());
  assert.equal((await host.call(1, "version")).ok, "0.1.0");
  assert.equal((await host.call(2, "add", { a: 1, b: 2 })).ok, 3);
});

test("class form: setup() before ready, this.config, prototype-chain methods as tools, concurrency cap", async () => {
  const script = writeScript(
    "model.js",
    `const { Adapter, serve, tool } = require("snakepit-bridge");
const fs = require("node:fs");
tool("module_level", () => "module");
class Base extends Adapter {
  base_tool() { return "base"; }
  shared() { return "base"; }
}
class Model extends Base {
  static tools = { scale: { doc: "Scales x." } };
  async setup() {
    await new Promise((r) => setTimeout(r, 20));
    this.factor = this.config.factor;
  }
  scale({ x }) { return x * this.factor; }
  shared() { return "model"; }
  async *items({ n }) { for (let i = 0; i < n; i++) yield i * this.factor; }
  config_seen() { return this.config; }
  _hidden() { return "no"; }
  get prop() { return 1; }
  teardown() { fs.writeFileSync(this.config.teardown, "done"); }
}
serve(Model, { concurrency: 3 });
`
  );
  const teardown = tempPath("teardown");
  const host = await started(script, { hello: { config: { factor: 3, teardown }, max_in_flight: 5 } });
  assert.deepEqual(host.ready.tools, [
    { name: "base_tool" },
    { name: "config_seen" },
    { name: "items", stream: true },
    { name: "module_level" },
    { name: "scale", doc: "Scales x." },
    { name: "shared" },
  ]);
  assert.equal(host.ready.max_in_flight, 3);
  assert.equal((await host.call(1, "scale", { x: 5 })).ok, 15);
  assert.equal((await host.call(2, "shared")).ok, "model");
  assert.equal((await host.call(3, "base_tool")).ok, "base");
  assert.deepEqual((await host.call(4, "items", { n: 3 })).ok, [0, 3, 6]);
  assert.deepEqual((await host.call(5, "config_seen")).ok, { factor: 3, teardown });
  assert.equal((await host.call(6, "_hidden")).error.type, "UnknownCommand");
  host.send({ t: "shutdown" });
  host.closeInput();
  assert.deepEqual(await host.exit(), { code: 0, signal: null });
  assert.equal(fs.readFileSync(teardown, "utf8"), "done", "teardown() ran on shutdown");
});

test("class form with an instance: serve(new Model())", async () => {
  const script = writeScript(
    "instance.js",
    `const { Adapter, serve } = require("snakepit-bridge");
class Model extends Adapter {
  setup() { this.ready = this.config.name; }
  hello() { return "hello " + this.ready; }
}
serve(new Model());
`
  );
  const host = await started(script, { hello: { config: { name: "world" } } });
  assert.equal((await host.call(1, "hello")).ok, "hello world");
});

test("a failing setup() exits 1 with the error on stderr", async () => {
  const script = writeScript(
    "badsetup.js",
    `const { Adapter, serve } = require("snakepit-bridge");
class Model extends Adapter { async setup() { throw new Error("no model file"); } }
serve(Model);
`
  );
  const host = new Host(script);
  host.send({ t: "hello", versions: [1], max_frame: 1 << 20 });
  assert.deepEqual(await host.exit(), { code: 1, signal: null });
  await host.stderrMatches(/setup failed:\nError: no model file/);
});

/** Starts the showcase, completes the handshake, sends `bytes`: the worker must exit 2. */
async function expectProtocolExit(bytes, pattern, hello = {}) {
  const host = await started(undefined, { hello });
  host.sendRaw(bytes);
  assert.deepEqual(await host.exit(), { code: 2, signal: null });
  await host.stderrMatches(pattern);
}

test("bad frames from the host exit with status 2", async (t) => {
  await t.test("a header over max_frame", () => {
    const head = Buffer.alloc(4);
    head.writeUInt32BE(2048, 0);
    return expectProtocolExit(head, /protocol error: inbound frame of 2048 bytes exceeds max_frame 1024/, { max_frame: 1024 });
  });
  await t.test("a body that is not JSON", () => {
    const frame = Buffer.concat([Buffer.from([0, 0, 0, 9]), Buffer.from("not json!")]);
    return expectProtocolExit(frame, /protocol error: malformed message from host/);
  });
  await t.test("JSON that is not an object with a string t", () => expectProtocolExit(encodeFrame([1, 2]), /not a JSON object with a string `t`/));
  await t.test("t not a string", () => expectProtocolExit(encodeFrame({ t: 5 }), /not a JSON object with a string `t`/));
  await t.test("a segmented frame without segments agreed", () =>
    expectProtocolExit(encodeFrame({ t: "call", id: 1, cmd: "echo", args: { $seg: 0 } }, [Buffer.from("x")]), /segments were not agreed/)
  );
  await t.test("segment lengths that do not fill the body", () => {
    const frame = encodeFrame({ t: "call", id: 1, cmd: "echo", args: null }, [Buffer.from("abc")]);
    frame.writeUInt32BE(((frame.readUInt32BE(0) & 0x7fffffff) + 1 + 0x80000000) >>> 0, 0);
    return expectProtocolExit(Buffer.concat([frame, Buffer.from("!")]), /1 bytes past the segments/, { segments: true });
  });
  await t.test("a first message that is not hello", async () => {
    const host = new Host();
    host.send({ t: "call", id: 1, cmd: "add", args: { a: 1, b: 2 } });
    assert.deepEqual(await host.exit(), { code: 2, signal: null });
    await host.stderrMatches(/expected hello, got "call"/);
  });
  await t.test("a hello without versions", async () => {
    const host = new Host();
    host.send({ t: "hello", max_frame: 1024 });
    assert.deepEqual(await host.exit(), { code: 2, signal: null });
    await host.stderrMatches(/hello: versions is undefined, not a list/);
  });
});

test("unknown message types after ready are ignored (logged)", async () => {
  const host = await started();
  host.send({ t: "mystery", id: 5 });
  assert.deepEqual(await host.call(1, "ping"), { t: "result", id: 1, ok: "pong" });
  await host.stderrMatches(/ignoring unknown message type "mystery"/);
});

test("a shared-memory offer is declined: no ready.shm, segments still agreed", async () => {
  const host = await started(undefined, { hello: { segments: true, shm: { fd: 99, size: 1 << 20, split: 1 << 19, threshold: 65536 } } });
  assert.equal(host.ready.segments, true);
  assert.equal(host.ready.shm, undefined);
});
