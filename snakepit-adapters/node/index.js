"use strict";
// snakepit-bridge: the Node.js worker SDK of snakepit. See README.md and index.d.ts.

const io = require("./lib/io");
const { tool, Adapter } = require("./lib/tools");
const { Worker } = require("./lib/worker");
const { CancelledError, HostCallError } = require("./lib/errors");

const VERSION = require("./package.json").version;
/** The protocol versions this bridge speaks. */
const PROTOCOL_VERSIONS = Object.freeze([1]);
const BRIDGE = `node/${VERSION} (Node ${process.version})`;

// A host speaking on stdin/stdout (no SNAKEPIT_PROTOCOL_FDS): fd 1 is the protocol, so
// process.stdout's writes go to stderr from now on, before the worker's own code prints.
if (!process.env.SNAKEPIT_PROTOCOL_FDS) io.claimStdout();

/** The versions spoken: SNAKEPIT_BRIDGE_VERSIONS (comma-separated) overrides them, for tests. */
function ourVersions() {
  const override = process.env.SNAKEPIT_BRIDGE_VERSIONS;
  if (!override) return [...PROTOCOL_VERSIONS];
  return override
    .split(",")
    .map((v) => Number(v.trim()))
    .filter((v) => Number.isSafeInteger(v));
}

const meta = {
  bridge: BRIDGE,
  versions: ourVersions,
  refusal: (ours, offered) =>
    `snakepit-bridge (node) ${VERSION} (${__dirname}) speaks protocol versions ` +
    `${JSON.stringify(ours)}, the host offered ${JSON.stringify(offered)}`,
};

let worker = null;

function isOptions(v) {
  if (v === null || typeof v !== "object" || v instanceof Adapter) return false;
  const proto = Object.getPrototypeOf(v);
  return proto === Object.prototype || proto === null;
}

/**
 * Serves the registered tools (and an adapter's) to the host until it is done with this
 * worker; the process then exits. serve(), serve(options), serve(AdapterClass, options?),
 * serve(adapterInstance, options?).
 */
function serve(adapterOrOptions, options) {
  if (worker) throw new Error("serve() was called already");
  let adapter = null;
  let opts = options;
  if (adapterOrOptions === undefined || adapterOrOptions === null) {
    // tools registered with tool() only
  } else if (typeof adapterOrOptions === "function") {
    adapter = adapterOrOptions;
  } else if (isOptions(adapterOrOptions) && options === undefined) {
    opts = adapterOrOptions;
  } else if (typeof adapterOrOptions === "object") {
    adapter = adapterOrOptions;
  } else {
    throw new TypeError("serve(): expected an Adapter class or instance, or options");
  }
  opts = opts || {};
  const { concurrency } = opts;
  if (concurrency !== undefined && !(Number.isSafeInteger(concurrency) && concurrency >= 1)) {
    throw new TypeError(`serve(): concurrency must be a positive integer, not ${String(concurrency)}`);
  }
  worker = new Worker(adapter, { concurrency }, meta);
  worker.start();
}

/** The descriptor the protocol is written to (null before serve()): for fault-injection tests only. */
function protocolFd() {
  return worker ? worker.outFd : null;
}

module.exports = {
  tool,
  serve,
  Adapter,
  HostCallError,
  CancelledError,
  protocolFd,
  VERSION,
  BRIDGE,
  PROTOCOL_VERSIONS,
};
