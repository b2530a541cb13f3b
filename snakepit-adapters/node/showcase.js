"use strict";
// The showcase worker: small tools for demos, tests and fault injection, with the names,
// arguments and results of the Python showcase (snakepit_bridge/showcase.py).
//
// Run it as a worker script (`node --import .../bootstrap.mjs showcase.js`), or require
// "snakepit-bridge/showcase" to register its tools beside your own and call serve() yourself.

const fs = require("node:fs");
const { spawn } = require("node:child_process");
const { setTimeout: sleepMs } = require("node:timers/promises");
const { tool, serve, protocolFd, HostCallError } = require("./index.js");

/** Creates `path` if missing (an append-open, like Python's open(path, "a")). */
function touchFile(path) {
  fs.closeSync(fs.openSync(path, "a"));
}

/** An Error whose type (name) is `type`, shown as such in its stack too. */
function namedError(type, message) {
  const E = { [type]: class extends Error {} }[type];
  E.prototype.name = type;
  return new E(message);
}

tool("ping", () => "pong", { doc: 'Returns "pong".' });

// Python's echo(*args, **kwargs) returns the keyword object, or the single value; a Node tool
// gets the arguments as sent (null as {}), and returns them.
tool("echo", (args) => args, { doc: "Returns its arguments: the object, or the single value." });

tool("add", ({ a, b }) => a + b, { doc: "Returns a + b." });

tool(
  "sleep",
  async ({ ms }, ctx) => {
    await sleepMs(ms, undefined, { signal: ctx.signal });
    return ms;
  },
  { doc: "Sleeps `ms` milliseconds (an async timer: a cancel ends it), returns `ms`." }
);

tool(
  "sleep_then_touch",
  async ({ ms, path, started = null }, ctx) => {
    try {
      if (started !== null) touchFile(started);
      await sleepMs(ms, undefined, { signal: ctx.signal });
    } finally {
      touchFile(path);
    }
    return ms;
  },
  {
    doc:
      "Sleeps `ms` milliseconds; creates `path` when it ends, even if cancelled (finally). " +
      "Creates the file `started` (if given) first, inside the `try`.",
  }
);

tool(
  "stubborn_sleep",
  async ({ ms, started = null }) => {
    if (started !== null) touchFile(started);
    await sleepMs(ms); // no signal: a cancel does not end it
    return ms;
  },
  { doc: "Sleeps `ms` milliseconds and ignores cancellation (to test the kill after cancel_grace)." }
);

tool(
  "cpu",
  ({ n }) => {
    n = Math.trunc(n);
    if (n < 3) return 0;
    const sieve = new Uint8Array(n).fill(1);
    sieve[0] = sieve[1] = 0;
    for (let i = 2; i * i < n; i++) {
      if (sieve[i]) for (let j = i * i; j < n; j += i) sieve[j] = 0;
    }
    let primes = 0;
    for (let i = 0; i < n; i++) primes += sieve[i];
    return primes;
  },
  { doc: "CPU-bound work: counts the primes below `n`." }
);

tool(
  "fail",
  ({ type = "ValueError", message = "boom" }) => {
    throw namedError(type, message);
  },
  { doc: "Throws an Error named `type` with `message`." }
);

tool(
  "crash",
  ({ code = 1 }) => {
    process.stderr.write(`showcase: crashing with exit code ${code}\n`);
    process.exit(code);
  },
  { doc: "Exits the worker process at once with `code` (no reply is sent)." }
);

tool(
  "print_stdout",
  ({ text = "hello from print" }) => {
    console.log(text);
    process.stdout.write(`${text}\n`);
    return text.length;
  },
  { doc: "Prints `text` to stdout (which is not the protocol); returns its length." }
);

tool(
  "garbage",
  ({ kind = "text" }) => {
    let data;
    if (kind === "json") {
      data = Buffer.concat([u32(9), Buffer.from("not json!")]);
    } else if (kind === "partial") {
      data = Buffer.concat([u32(100), Buffer.from("0123456789")]);
    } else if (kind === "oversize") {
      data = Buffer.concat([u32(2 ** 30), Buffer.from("xxxx")]);
    } else {
      data = Buffer.from("this is not a frame\n");
    }
    fs.writeSync(protocolFd(), data);
    return kind;
  },
  {
    doc:
      "Writes raw bytes to the real protocol fd, breaking the stream on purpose. kind: text, " +
      "json (a frame whose body is not JSON), partial (a header announcing 100 bytes, then 10), " +
      "oversize (a header announcing 1 GiB).",
  }
);

function u32(n) {
  const b = Buffer.alloc(4);
  b.writeUInt32BE(n, 0);
  return b;
}

const hoard = [];
tool(
  "leak",
  ({ mb }) => {
    hoard.push(Buffer.alloc(Math.trunc(mb) * 1024 * 1024, "x"));
    return hoard.reduce((total, b) => total + b.length, 0) / (1024 * 1024);
  },
  { doc: "Allocates and keeps `mb` MiB (touched, so it is resident); returns the total held." }
);

tool("big", ({ bytes }) => "x".repeat(Math.trunc(bytes)), { doc: "Returns a string of `bytes` characters." });

tool("pid", () => process.pid, { doc: "Returns the worker's process id." });

tool("env", ({ name }) => process.env[name] ?? null, { doc: "Returns the environment variable `name` (or null)." });

tool(
  "info",
  () => ({ pid: process.pid, executable: process.execPath, cwd: process.cwd(), argv: process.argv }),
  { doc: "Returns facts about the worker: pid, executable, cwd, argv." }
);

const STAY_ALIVE = 'process.on("SIGTERM", () => {}); process.on("SIGHUP", () => {}); setInterval(() => {}, 1 << 30);';

tool(
  "grandchild",
  ({ setsid = false }) => {
    const child = spawn(process.execPath, ["-e", STAY_ALIVE], { detached: Boolean(setsid), stdio: "ignore" });
    child.unref();
    return child.pid;
  },
  {
    doc:
      "Starts a child process that ignores SIGTERM and SIGHUP (and leaves the worker's process " +
      "group and session if `setsid`), then returns its pid. For orphan tests.",
  }
);

tool(
  "count",
  function* ({ n, size = 0, path = null }) {
    const pad = "x".repeat(Math.trunc(size));
    try {
      for (let i = 0; i < n; i++) yield size ? { i, pad } : { i };
    } finally {
      if (path) touchFile(path);
    }
  },
  {
    doc:
      'Yields {"i": i} for i in 0..n (with a `size`-character "pad" when given); when the stream ' +
      "ends or is cancelled, creates `path` (a finally block) if given.",
  }
);

tool(
  "acount",
  async function* ({ n }) {
    for (let i = 0; i < n; i++) {
      await new Promise(setImmediate); // a turn of the event loop, like asyncio.sleep(0)
      yield i;
    }
  },
  { doc: "An async generator: yields 0..n, awaiting between items." }
);

tool(
  "asleep",
  async ({ ms }, ctx) => {
    await sleepMs(ms, undefined, { signal: ctx.signal });
    return ms;
  },
  { doc: "An async tool: awaits `ms` milliseconds, returns `ms`." }
);

tool(
  "spin",
  async ({ seconds }, ctx) => {
    // Busy work in slices of ~5 ms, letting the event loop run in between so that a cancel
    // (ctx.signal) is seen.
    const deadline = performance.now() + seconds * 1000;
    let n = 0;
    for (;;) {
      const slice = Math.min(performance.now() + 5, deadline);
      while (performance.now() < slice) n++;
      if (performance.now() >= deadline) return n;
      await new Promise(setImmediate);
      ctx.signal.throwIfAborted();
    }
  },
  { doc: "Busy loop for `seconds` (in cancellable slices); returns iterations." }
);

tool("adouble", async ({ x }) => 2 * x, { doc: "An async tool: returns 2 * x." });

tool(
  "fail_after",
  function* ({ n }) {
    for (let i = 0; i < n; i++) yield i;
    throw namedError("ValueError", `failed after ${n} items`);
  },
  { doc: "Yields 0..n, then throws ValueError." }
);

tool(
  "ask_host",
  async ({ name, args = null }, ctx) => {
    try {
      return { ok: await ctx.callHost(name, args) };
    } catch (e) {
      if (e instanceof HostCallError) return { error: e.type, message: e.message };
      throw e;
    }
  },
  {
    doc:
      "Calls the host tool `name` with `args` and returns its answer (or the error it raised, " +
      'as {"error": type, "message": ...}).',
  }
);

tool(
  "remember",
  async ({ name, value }, ctx) => {
    if (ctx.session === null) throw namedError("AttributeError", "remember needs a session: call it in one");
    await ctx.session.set(name, value);
    return ctx.session.get(name);
  },
  { doc: "Stores a session variable through the host; returns what a read gives back." }
);

tool("recall", async ({ name }, ctx) => (ctx.session === null ? null : ctx.session.get(name)), {
  doc: "Reads a session variable through the host (null without a session).",
});

tool(
  "touch",
  ({ path }) => {
    touchFile(path);
    return path;
  },
  { doc: "Creates the file `path` (lets tests observe that a call ran)." }
);

const journalEntries = [];
tool(
  "journal",
  ({ entry = null }) => {
    if (entry !== null) journalEntries.push(entry);
    return journalEntries;
  },
  {
    doc:
      "Appends `entry` (when given) to this worker's journal and returns the journal: lets tests " +
      "see the order the worker ran calls in.",
  }
);

tool(
  "wait_for",
  async ({ path, timeout_ms = 30000 }, ctx) => {
    const deadline = Date.now() + timeout_ms;
    while (!fs.existsSync(path)) {
      if (Date.now() >= deadline) return false;
      await sleepMs(2, undefined, { signal: ctx.signal });
    }
    return true;
  },
  {
    doc:
      "Holds the worker until the file `path` exists (a test's gate) or `timeout_ms` passes; " +
      "returns whether the file appeared.",
  }
);

if (require.main === module) serve();
