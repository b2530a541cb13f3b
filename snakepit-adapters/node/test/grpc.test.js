"use strict";
// The gRPC transport (docs/protocol.md §7): the worker is started as the host starts it
// (control channel on fds 3/4), gets a hello with `transport: {kind: "grpc", ...}`, serves
// snakepit.v1.Worker on the socket given, and calls the fake snakepit.v1.Host served here.
//
// Needs @grpc/grpc-js and @grpc/proto-loader (`npm ci` here, or `cargo xtask setup`): without
// them these tests are skipped, unless CI is set, where they fail.

const { test, after } = require("node:test");
const assert = require("node:assert/strict");
const crypto = require("node:crypto");
const fs = require("node:fs");
const os = require("node:os");
const path = require("node:path");
const { Host, killAll, writeScript, PACKAGE } = require("./host");

const PROTO = path.join(PACKAGE, "proto", "snakepit", "v1", "snakepit.proto");
const CI = Boolean(process.env.CI) && !["0", "false"].includes(process.env.CI.toLowerCase());
const WAIT_MS = 10000;

let grpc = null;
let proto = null;
let missing = null;
try {
  grpc = require("@grpc/grpc-js");
  const protoLoader = require("@grpc/proto-loader");
  const def = protoLoader.loadSync(PROTO, { keepCase: true, longs: Number, defaults: true, oneofs: true });
  proto = grpc.loadPackageDefinition(def).snakepit.v1;
} catch (e) {
  missing = e;
}
// Skipped (with the reason) only outside CI; with CI set, a missing package fails every test.
const skip =
  missing && !CI
    ? `@grpc/grpc-js or @grpc/proto-loader is not installed (${String(missing.message).split("\n")[0]}); ` +
      "run `npm ci` in snakepit-adapters/node (or `cargo xtask setup`) to run the gRPC tests"
    : false;
if (skip) process.stderr.write(`grpc.test.js: skipping the gRPC tests: ${skip}\n`);

function needPackages() {
  if (missing) throw new Error(`the gRPC packages are missing and CI is set: ${missing.message}`);
}

const live = new Set();
after(() => {
  for (const h of live) h.close();
  killAll();
});

// The worker's own tools, beside the showcase's.
const TOOLS = `
const { tool, serve } = require("snakepit-bridge");
require("snakepit-bridge/showcase");
let produced = 0;
tool("flood", function* ({ size = 16384 }) {
  const pad = "x".repeat(size);
  try {
    for (;;) {
      produced++;
      yield { i: produced, pad };
    }
  } finally {
    process.stderr.write("flood: finally after " + produced + "\\n");
  }
});
tool("produced", () => produced);
tool("bigint", () => ({ n: 1n }));
tool("cycle", () => { const o = {}; o.self = o; return o; });
tool("until_cancelled", async (_args, ctx) => {
  process.stderr.write("until_cancelled: started " + ctx.id + "\\n");
  await new Promise((_, reject) => ctx.signal.addEventListener("abort", () => reject(ctx.signal.reason), { once: true }));
});
tool("slow", async ({ ms }, ctx) => {
  process.stderr.write("slow: started " + ctx.id + "\\n");
  await new Promise((resolve) => setTimeout(resolve, ms));
  return ms;
});
tool("call_twice", async ({ name, args }, ctx) => [await ctx.callHost(name, args), await ctx.callHost(name, args)]);
serve();
`;

// The class form, with a concurrency cap.
const CLASS_FORM = `
const { Adapter, serve } = require("snakepit-bridge");
class Model extends Adapter {
  static tools = { scale: { doc: "Multiplies by the configured factor." } };
  setup() { this.active = 0; this.peak = 0; }
  scale({ x }) { return x * this.config.factor; }
  async slot({ ms }) {
    this.active++;
    this.peak = Math.max(this.peak, this.active);
    await new Promise((resolve) => setTimeout(resolve, ms));
    this.active--;
    return this.peak;
  }
  *items({ n }) { for (let i = 0; i < n; i++) yield i * this.config.factor; }
  teardown() { process.stderr.write("model: teardown\\n"); }
}
serve(Model, { concurrency: 2 });
`;

let toolsScript = null;
function tools() {
  if (!toolsScript) toolsScript = writeScript("grpc_tools.js", TOOLS);
  return toolsScript;
}

/** A private (0700) directory for the sockets, short enough for sun_path. */
function socketDir() {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), "spg-"));
  fs.chmodSync(dir, 0o700);
  return dir;
}

function json(buf) {
  return JSON.parse(buf.toString("utf8"));
}

/**
 * One worker in gRPC mode: the control channel (`host`, test/host.js), a fake Host service
 * on host_socket (host tools `double`, `fail`, and session variables), and a client of the
 * worker's Worker service.
 */
class GrpcWorker {
  static async start(script = tools(), { hello = {}, env = {} } = {}) {
    needPackages();
    const w = new GrpcWorker();
    live.add(w);
    w.dir = socketDir();
    w.socket = path.join(w.dir, "w.sock");
    w.hostSocket = path.join(w.dir, "h.sock");
    w.token = crypto.randomBytes(16).toString("hex");
    w.hostCalls = []; // the HostCallRequests the fake host got
    w.sessionOf = new Map(); // call id -> session, from the requests sent
    w.variables = new Map(); // "session/name" -> value
    w.hostServer = new grpc.Server();
    w.hostServer.addService(proto.Host.service, { Call: (rpc, respond) => w.#hostCall(rpc.request, respond) });
    await new Promise((resolve, reject) =>
      w.hostServer.bindAsync(`unix:${w.hostSocket}`, grpc.ServerCredentials.createInsecure(), (e) => (e ? reject(e) : resolve()))
    );
    w.host = new Host(script, { env });
    const transport = { kind: "grpc", socket: w.socket, host_socket: w.hostSocket, token: w.token };
    w.ready = await w.host.handshake({ transport, segments: true, max_in_flight: 4, pipeline_depth: 1, ...hello });
    assert.equal(w.ready.t, "ready", `expected ready, got ${JSON.stringify(w.ready)}; stderr:\n${w.host.stderr}`);
    w.client = new proto.Worker(w.ready.address, grpc.credentials.createInsecure(), {
      "grpc.default_authority": "localhost",
    });
    return w;
  }

  #hostCall(req, respond) {
    this.hostCalls.push(req);
    if (req.token !== this.token) {
      return respond({ code: grpc.status.UNAUTHENTICATED, details: "missing or wrong snakepit token" });
    }
    const args = req.args.length ? json(req.args) : null;
    const ok = (value) => respond(null, { ok: Buffer.from(JSON.stringify(value)) });
    const error = (type, message) => respond(null, { error: { type, message } });
    if (req.name.startsWith("session.")) {
      const session = this.sessionOf.get(req.call);
      if (!session) return error("NoSession", "the request runs in no session");
      const key = `${session}/${args.name}`;
      switch (req.name) {
        case "session.get":
          return ok(this.variables.has(key) ? this.variables.get(key) : null);
        case "session.set":
          this.variables.set(key, args.value);
          return ok(null);
        case "session.delete":
          return ok(this.variables.delete(key));
      }
    }
    if (req.name === "double") return ok(args.x * 2);
    if (req.name === "fail") return error("HostBoom", "the host tool failed");
    return error("UnknownHostTool", `no host tool named ${req.name}`);
  }

  metadata(token = this.token) {
    const m = new grpc.Metadata();
    if (token !== null) m.set("x-snakepit-token", token);
    return m;
  }

  request(id, command, args = null, extra = {}) {
    if (extra.session) this.sessionOf.set(id, extra.session);
    return { id, command, args: Buffer.from(JSON.stringify(args)), ...extra };
  }

  /** A unary RPC; resolves with the reply, rejects with the gRPC error. */
  unary(method, req, metadata = this.metadata()) {
    return new Promise((resolve, reject) => {
      this.client[method](req, metadata, { deadline: Date.now() + WAIT_MS }, (err, reply) => (err ? reject(err) : resolve(reply)));
    });
  }

  execute(id, command, args, extra) {
    return this.unary("Execute", this.request(id, command, args, extra));
  }

  /** Streams a call to its end: { items, status }. */
  stream(id, command, args, extra) {
    const rpc = this.client.Stream(this.request(id, command, args, extra), this.metadata(), { deadline: Date.now() + WAIT_MS });
    return collect(rpc);
  }

  close() {
    live.delete(this);
    if (this.client) this.client.close();
    if (this.hostServer) this.hostServer.forceShutdown();
    if (this.host) this.host.kill();
    fs.rmSync(this.dir, { recursive: true, force: true });
  }
}

function collect(rpc) {
  return new Promise((resolve) => {
    const items = [];
    rpc.on("data", (item) => items.push(item));
    rpc.on("error", () => {}); // the status says it
    rpc.on("status", (status) => resolve({ items, status }));
  });
}

/** What a CallReply or StreamItem carries: {ok: value, segments} or {error}. */
function outcome(reply) {
  if (reply.outcome === "error") return { error: reply.error };
  const key = reply.outcome === "ok" ? "ok" : "chunk";
  return { ok: json(reply[key]), segments: reply.segments };
}

async function rejectsWith(promise, code) {
  await assert.rejects(promise, (e) => {
    assert.equal(e.code, code, `expected ${grpc.status[code]}, got ${e.code} (${e.details})`);
    return true;
  });
}

// ---- tests ----------------------------------------------------------------------------------

test("the handshake announces the socket's address; Execute runs tools", { skip }, async () => {
  const w = await GrpcWorker.start();
  const { ready } = w;
  assert.equal(ready.address, `unix:${w.socket}`);
  assert.equal(ready.segments, true);
  assert.equal(ready.max_in_flight, 4);
  assert.equal(ready.pipeline_depth, undefined);
  assert.equal(ready.shm, undefined);
  assert.ok(ready.tools.some((t) => t.name === "count" && t.stream === true));
  assert.ok(fs.statSync(w.socket).isSocket());

  assert.deepEqual(outcome(await w.execute(1, "add", { a: 2, b: 3 })), { ok: 5, segments: [] });
  assert.deepEqual(outcome(await w.execute(2, "echo", { x: [1, "two", null] })), { ok: { x: [1, "two", null] }, segments: [] });
  assert.deepEqual(outcome(await w.execute(3, "adouble", { x: 21 })), { ok: 42, segments: [] });
  // A generator called without streaming answers the list of its items.
  assert.deepEqual(outcome(await w.execute(4, "count", { n: 3 })).ok, [{ i: 0 }, { i: 1 }, { i: 2 }]);
  // Binary segments both ways: a Buffer argument comes back as a segment.
  const bytes = crypto.randomBytes(100000);
  const req = { ...w.request(5, "echo", { data: { $seg: 0 } }), segments: [bytes] };
  const echoed = await w.unary("Execute", req);
  assert.deepEqual(json(echoed.ok), { data: { $seg: 0 } });
  assert.equal(echoed.segments.length, 1);
  assert.ok(echoed.segments[0].equals(bytes));
  // Ping, on the Worker service and on the control channel.
  assert.deepEqual(await w.unary("Ping", {}), {});
  await w.host.roundTrip();
});

test("errors map as over stdio: tool errors, unknown commands, unencodable results", { skip }, async () => {
  const w = await GrpcWorker.start();
  const failed = outcome(await w.execute(1, "fail", { type: "KeyError", message: "nope" }));
  assert.equal(failed.error.type, "KeyError");
  assert.equal(failed.error.message, "nope");
  assert.match(failed.error.traceback, /KeyError: nope/);
  const unknown = outcome(await w.execute(2, "no_such_tool", null));
  assert.deepEqual(unknown.error, { type: "UnknownCommand", message: 'no tool named "no_such_tool"', traceback: "" });
  const big = outcome(await w.execute(3, "bigint", null));
  assert.equal(big.error.type, "TypeError");
  assert.match(big.error.message, /BigInt/);
  const cycle = outcome(await w.execute(4, "cycle", null));
  assert.equal(cycle.error.type, "TypeError");
  assert.match(cycle.error.message, /circular/i);
  // Over Stream: the items, then the error as the last item; the RPC itself succeeds.
  const { items, status } = await w.stream(5, "fail_after", { n: 2 });
  assert.equal(status.code, grpc.status.OK);
  assert.deepEqual(items.slice(0, 2).map((i) => outcome(i).ok), [0, 1]);
  assert.equal(items.length, 3);
  assert.equal(items[2].error.type, "ValueError");
  assert.equal(items[2].error.message, "failed after 2 items");
  const none = await w.stream(6, "no_such_tool", null);
  assert.equal(none.status.code, grpc.status.OK);
  assert.deepEqual(none.items.map((i) => i.error.type), ["UnknownCommand"]);
  // Arguments that are not JSON (the host checks them; this bridge does too).
  const bad = outcome(await w.unary("Execute", { ...w.request(8, "echo"), args: Buffer.from("{nope") }));
  assert.equal(bad.error.type, "BadRequest");
  // Still serving.
  assert.deepEqual(outcome(await w.execute(7, "add", { a: 1, b: 1 })).ok, 2);
});

test("every RPC needs the token: missing or wrong is UNAUTHENTICATED", { skip }, async () => {
  const w = await GrpcWorker.start();
  const wrongSameLength = w.token.replace(/.$/, (c) => (c === "0" ? "1" : "0"));
  for (const token of [null, "", "nope", wrongSameLength, `${w.token}x`]) {
    const md = w.metadata(token);
    await rejectsWith(w.unary("Execute", w.request(1, "add", { a: 1, b: 2 }), md), grpc.status.UNAUTHENTICATED);
    await rejectsWith(w.unary("Ping", {}, md), grpc.status.UNAUTHENTICATED);
    await rejectsWith(w.unary("Cancel", { id: 1 }, md), grpc.status.UNAUTHENTICATED);
    await rejectsWith(w.unary("Shutdown", {}, md), grpc.status.UNAUTHENTICATED);
    const { items, status } = await collect(w.client.Stream(w.request(2, "count", { n: 3 }), md));
    assert.equal(status.code, grpc.status.UNAUTHENTICATED);
    assert.deepEqual(items, []);
  }
  // None of that ran a tool or stopped the worker.
  assert.deepEqual(outcome(await w.execute(3, "add", { a: 1, b: 2 })).ok, 3);
});

test("Stream sends a generator's items in order; a plain tool answers one item", { skip }, async () => {
  const w = await GrpcWorker.start();
  const { items, status } = await w.stream(1, "count", { n: 50 });
  assert.equal(status.code, grpc.status.OK);
  assert.deepEqual(items.map((i) => outcome(i).ok), Array.from({ length: 50 }, (_, i) => ({ i })));
  const a = await w.stream(2, "acount", { n: 5 });
  assert.deepEqual(a.items.map((i) => outcome(i).ok), [0, 1, 2, 3, 4]);
  const plain = await w.stream(3, "add", { a: 2, b: 2 });
  assert.equal(plain.status.code, grpc.status.OK);
  assert.deepEqual(plain.items.map((i) => outcome(i).ok), [4]);
});

test("a stream is held back by flow control, and cancelling the RPC runs the generator's finally", { skip }, async () => {
  const w = await GrpcWorker.start();
  const rpc = w.client.Stream(w.request(1, "flood", { size: 16384 }), w.metadata());
  rpc.on("error", () => {}); // CANCELLED, below
  const first = await new Promise((resolve) => rpc.once("data", resolve));
  assert.equal(outcome(first).ok.i, 1);
  rpc.pause(); // the consumer stops reading
  // The generator is not drained without bound: whatever the timing, the HTTP/2 windows and
  // grpc-js's buffer hold a few dozen items, never thousands.
  let produced = 0;
  for (let i = 0; i < 20; i++) produced = outcome(await w.execute(100 + i, "produced", null)).ok;
  assert.ok(produced < 500, `the generator ran ahead by ${produced} items`);
  rpc.cancel();
  await w.host.stderrMatches(/flood: finally after \d+/);
  // The worker goes on serving.
  assert.deepEqual(outcome(await w.execute(2, "add", { a: 1, b: 2 })).ok, 3);
});

test("Cancel aborts a running call's signal; a Cancel that overtakes its call applies to it", { skip }, async () => {
  const w = await GrpcWorker.start();
  const running = w.execute(7, "until_cancelled", null);
  await w.host.stderrMatches("until_cancelled: started 7");
  assert.deepEqual(await w.unary("Cancel", { id: 7 }), {});
  const answer = outcome(await running);
  assert.equal(answer.error.type, "Cancelled");
  assert.equal(answer.error.message, "call cancelled by the host");
  // Cancel first, the call after: it never runs.
  await w.unary("Cancel", { id: 8 });
  const early = outcome(await w.execute(8, "until_cancelled", null));
  assert.deepEqual(early.error, { type: "Cancelled", message: "cancelled before it started", traceback: "" });
  assert.doesNotMatch(w.host.stderr, /started 8/);
  // A cancel for a call long answered changes nothing.
  await w.unary("Cancel", { id: 1234 });
  assert.deepEqual(outcome(await w.execute(9, "add", { a: 1, b: 2 })).ok, 3);
  // timeout_ms aborts the signal too.
  const timed = outcome(await w.execute(10, "until_cancelled", null, { timeout_ms: 50 }));
  assert.equal(timed.error.type, "Cancelled");
  assert.match(timed.error.message, /deadline passed/);
});

test("host calls go to Host.Call with the token and the request's id; sessions too", { skip }, async () => {
  const w = await GrpcWorker.start();
  assert.deepEqual(outcome(await w.execute(11, "ask_host", { name: "double", args: { x: 21 } })).ok, { ok: 42 });
  const seen = w.hostCalls.at(-1);
  assert.equal(seen.call, 11);
  assert.equal(seen.name, "double");
  assert.equal(seen.token, w.token);
  assert.deepEqual(json(seen.args), { x: 21 });
  assert.deepEqual(outcome(await w.execute(12, "ask_host", { name: "fail" })).ok, {
    error: "HostBoom",
    message: "the host tool failed",
  });
  assert.deepEqual(outcome(await w.execute(13, "ask_host", { name: "nope" })).ok.error, "UnknownHostTool");
  assert.deepEqual(outcome(await w.execute(14, "call_twice", { name: "double", args: { x: 2 } })).ok, [4, 4]);

  assert.deepEqual(outcome(await w.execute(20, "remember", { name: "v", value: { deep: [1] } }, { session: "s1" })).ok, { deep: [1] });
  assert.deepEqual(outcome(await w.execute(21, "recall", { name: "v" }, { session: "s1" })).ok, { deep: [1] });
  assert.equal(outcome(await w.execute(22, "recall", { name: "v" }, { session: "s2" })).ok, null);
  assert.equal(outcome(await w.execute(23, "recall", { name: "v" })).ok, null); // no session: ctx.session is null
  assert.equal(outcome(await w.execute(24, "remember", { name: "v", value: 1 })).error.type, "AttributeError");
  assert.deepEqual(
    w.hostCalls.filter((c) => c.name.startsWith("session.")).map((c) => [c.call, c.name]),
    [
      [20, "session.set"],
      [20, "session.get"],
      [21, "session.get"],
      [22, "session.get"],
    ]
  );
  // The host's service gone: HostUnavailable, and the worker serves on.
  await new Promise((resolve) => w.hostServer.tryShutdown(resolve));
  const gone = outcome(await w.execute(30, "ask_host", { name: "double", args: { x: 1 } })).ok;
  assert.equal(gone.error, "HostUnavailable");
  assert.match(gone.message, /^UNAVAILABLE: /);
  assert.deepEqual(outcome(await w.execute(31, "add", { a: 1, b: 2 })).ok, 3);
});

test("max_frame bounds gRPC messages: a reply over it is a FrameTooLarge error", { skip }, async () => {
  const w = await GrpcWorker.start(tools(), { hello: { max_frame: 4096 } });
  const big = outcome(await w.execute(1, "big", { bytes: 5000 }));
  assert.equal(big.error.type, "FrameTooLarge");
  assert.match(big.error.message, /exceeds max_frame 4096/);
  // To the byte: a CallReply of exactly max_frame goes (its `ok` field: tag, 2-byte length,
  // the JSON string with its quotes), one byte more is refused.
  assert.equal(outcome(await w.execute(2, "big", { bytes: 4091 })).ok.length, 4091);
  assert.equal(outcome(await w.execute(20, "big", { bytes: 4092 })).error.type, "FrameTooLarge");
  // A chunk over it ends the stream with that error (the generator is closed).
  const { items, status } = await w.stream(3, "count", { n: 5, size: 5000 });
  assert.equal(status.code, grpc.status.OK);
  assert.deepEqual(items.map((i) => i.error && i.error.type), ["FrameTooLarge"]);
  const fits = await w.stream(4, "count", { n: 2, size: 3000 });
  assert.deepEqual(fits.items.map((i) => outcome(i).ok.i), [0, 1]);
  // A request over max_frame is refused by gRPC itself.
  await rejectsWith(w.execute(5, "echo", { pad: "x".repeat(5000) }), grpc.status.RESOURCE_EXHAUSTED);
  assert.deepEqual(outcome(await w.execute(6, "add", { a: 1, b: 2 })).ok, 3);
});

test("the class form and the concurrency cap behave as over stdio", { skip }, async () => {
  const script = writeScript("grpc_class.js", CLASS_FORM);
  const w = await GrpcWorker.start(script, { hello: { config: { factor: 10 } } });
  assert.equal(w.ready.max_in_flight, 2);
  assert.deepEqual(w.ready.tools.find((t) => t.name === "scale"), { name: "scale", doc: "Multiplies by the configured factor." });
  assert.deepEqual(outcome(await w.execute(1, "scale", { x: 4 })).ok, 40);
  const { items } = await w.stream(2, "items", { n: 3 });
  assert.deepEqual(items.map((i) => outcome(i).ok), [0, 10, 20]);
  const peaks = await Promise.all([3, 4, 5, 6].map((id) => w.execute(id, "slot", { ms: 150 })));
  assert.equal(Math.max(...peaks.map((p) => outcome(p).ok)), 2);
  // shutdown on the control channel: teardown runs, the worker exits 0.
  w.host.send({ t: "shutdown" });
  w.host.closeInput();
  assert.deepEqual(await w.host.exit(), { code: 0, signal: null });
  assert.match(w.host.stderr, /model: teardown/);
});

test("shutdown on the control channel: calls in flight finish, new ones are refused, then exit 0", { skip }, async () => {
  const w = await GrpcWorker.start();
  const running = w.execute(1, "slow", { ms: 300 });
  await w.host.stderrMatches("slow: started 1");
  w.host.send({ t: "shutdown" });
  await w.host.roundTrip(); // shutdown read: pings are still answered
  const refused = outcome(await w.execute(2, "add", { a: 1, b: 2 }));
  assert.equal(refused.error.type, "ShuttingDown");
  assert.deepEqual(outcome(await running).ok, 300);
  assert.deepEqual(await w.host.exit(), { code: 0, signal: null });
  await rejectsWith(w.unary("Ping", {}), grpc.status.UNAVAILABLE);
});

test("the Shutdown RPC stops the worker as the control channel's shutdown does", { skip }, async () => {
  const w = await GrpcWorker.start();
  const running = w.execute(1, "slow", { ms: 200 });
  await w.host.stderrMatches("slow: started 1");
  assert.deepEqual(await w.unary("Shutdown", {}), {});
  assert.equal(outcome(await w.execute(2, "add", { a: 1, b: 2 })).error.type, "ShuttingDown");
  assert.deepEqual(outcome(await running).ok, 200);
  assert.deepEqual(await w.host.exit(), { code: 0, signal: null });
});

test("end of the control channel without shutdown: running calls are cancelled, the worker exits", { skip }, async () => {
  const w = await GrpcWorker.start();
  const running = w.execute(1, "until_cancelled", null);
  await w.host.stderrMatches("until_cancelled: started 1");
  w.host.closeInput();
  // The call is answered Cancelled (the server stops gracefully), then the worker exits.
  const answer = outcome(await running);
  assert.deepEqual(answer.error, { type: "Cancelled", message: "the host went away", traceback: "" });
  assert.deepEqual(await w.host.exit(), { code: 0, signal: null });
});

/**
 * A copy of the package as the host writes it out (ROOT/node_modules/snakepit-bridge, no
 * node_modules of its own) and a worker script beside it: {root, nodePath, script}.
 */
function packageCopy() {
  const root = fs.mkdtempSync(path.join(os.tmpdir(), "snakepit-copy-"));
  const nodePath = path.join(root, "node_modules");
  const copy = path.join(nodePath, "snakepit-bridge");
  fs.mkdirSync(copy, { recursive: true });
  for (const f of ["package.json", "index.js", "showcase.js", "lib", "proto"]) {
    fs.cpSync(path.join(PACKAGE, f), path.join(copy, f), { recursive: true });
  }
  const script = path.join(root, "worker.js");
  fs.writeFileSync(script, 'require("snakepit-bridge/showcase");\nrequire("snakepit-bridge").serve();\n');
  return { root, nodePath, script };
}

test("the packages are found through NODE_PATH, as the host lays it out", { skip }, async () => {
  const { root, nodePath, script } = packageCopy();
  try {
    const env = { NODE_PATH: `${nodePath}:${path.join(PACKAGE, "node_modules")}`, HOME: root };
    const w = await GrpcWorker.start(script, { env });
    assert.deepEqual(outcome(await w.execute(1, "add", { a: 2, b: 3 })).ok, 5);
    w.close();
  } finally {
    fs.rmSync(root, { recursive: true, force: true });
  }
});

test("without @grpc/grpc-js the worker says how to install it and exits 1 before ready", async () => {
  // No node_modules anywhere the copy or the script could look.
  const { root, nodePath, script } = packageCopy();
  try {
    const host = new Host(script, { bootstrap: false, env: { NODE_PATH: nodePath, HOME: root } });
    const dir = socketDir();
    try {
      const transport = { kind: "grpc", socket: path.join(dir, "w.sock"), host_socket: path.join(dir, "h.sock"), token: "t" };
      host.send({ t: "hello", versions: [1], codecs: ["json"], worker: "t.1", max_frame: 1 << 20, config: null, max_in_flight: 1, transport });
      assert.deepEqual(await host.exit(), { code: 1, signal: null });
      assert.deepEqual(host.messages, []); // no ready
      await host.stderrMatches("@grpc/grpc-js");
      const line = host.stderr.split("\n").find((l) => l.includes("@grpc/grpc-js"));
      assert.match(line, /the gRPC transport needs @grpc\/grpc-js, which cannot be loaded/);
      assert.match(line, /cargo xtask setup/);
      assert.match(line, /npm install @grpc\/grpc-js @grpc\/proto-loader/);
      assert.match(line, /SNAKEPIT_NODE_PATH/);
    } finally {
      host.kill();
      fs.rmSync(dir, { recursive: true, force: true });
    }
  } finally {
    fs.rmSync(root, { recursive: true, force: true });
  }
});
