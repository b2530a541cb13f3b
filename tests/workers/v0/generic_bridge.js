#!/usr/bin/env node
// A re-creation, for snakepit's compatibility tests, of the observable behaviour of the
// original Snakepit v0.2.1 Node bridge (`priv/javascript/generic_bridge.js`): its stdio
// envelope, its commands (ping, echo, compute, random, info) and their reply shapes. Unlike the
// Python one, it reports failures as `success: false` (and turns a result with
// `status: "error"` into one). Written from that behaviour, not copied.
//
// Run as `node generic_bridge.js --mode pool-worker`.
"use strict";

const start = Date.now();
let handled = 0;
const now = () => Date.now() / 1000;

const compute = ({ operation = "add", a = 0, b = 0 }) => {
  const ops = {
    add: () => a + b,
    subtract: () => a - b,
    multiply: () => a * b,
    divide: () => {
      if (b === 0) throw new Error("Division by zero");
      return a / b;
    },
    power: () => Math.pow(a, b),
    sqrt: () => {
      if (a < 0) throw new Error("Square root of negative number");
      return Math.sqrt(a);
    },
  };
  if (!ops[operation]) throw new Error(`Unsupported operation: ${operation}`);
  const result = ops[operation]();
  if (!isFinite(result)) throw new Error(`Invalid result: ${result}`);
  return { status: "ok", operation, inputs: { a, b }, result, timestamp: now() };
};

const random = (args) => {
  const type = args.type || "uniform";
  let value;
  if (type === "uniform") {
    const min = args.min || 0, max = args.max || 1;
    value = Math.random() * (max - min) + min;
  } else if (type === "integer") {
    const min = args.min || 0, max = args.max || 100;
    value = Math.floor(Math.random() * (max - min + 1)) + min;
  } else if (type === "normal") {
    const u1 = Math.random(), u2 = Math.random();
    value = Math.sqrt(-2 * Math.log(u1)) * Math.cos(2 * Math.PI * u2) * (args.std || 1) + (args.mean || 0);
  } else {
    throw new Error(`Unsupported random type: ${type}`);
  }
  return { status: "ok", type, parameters: args, value, timestamp: now() };
};

const commands = {
  ping: (args) => ({
    status: "ok",
    bridge_type: "generic_javascript",
    uptime: (Date.now() - start) / 1000,
    requests_handled: handled,
    timestamp: now(),
    node_version: process.version,
    platform: process.platform,
    worker_id: args.worker_id || "unknown",
    echo: args,
  }),
  echo: (args) => ({ status: "ok", echoed: args, timestamp: now() }),
  compute,
  random,
  info: () => ({
    status: "ok",
    bridge_info: { name: "Generic Snakepit JavaScript Bridge", version: "1.0.0", supported_commands: Object.keys(commands) },
    system_info: { node_version: process.version, platform: process.platform, arch: process.arch },
    timestamp: now(),
  }),
};

function answer(request) {
  handled++;
  const base = { id: request.id };
  try {
    const handler = commands[request.command];
    if (!handler) throw new Error(`Unknown command: ${request.command}`);
    const result = handler(request.args || {});
    if (result && result.status === "error") return { ...base, success: false, error: result.error };
    return { ...base, success: true, result };
  } catch (e) {
    return { ...base, success: false, error: e.message };
  }
}

let buf = Buffer.alloc(0);
process.stdin.on("data", (chunk) => {
  buf = Buffer.concat([buf, chunk]);
  while (buf.length >= 4 && buf.length >= 4 + buf.readUInt32BE(0)) {
    const len = buf.readUInt32BE(0);
    const request = JSON.parse(buf.subarray(4, 4 + len).toString("utf8"));
    buf = buf.subarray(4 + len);
    const reply = { ...answer(request), timestamp: new Date().toISOString() };
    const body = Buffer.from(JSON.stringify(reply), "utf8");
    const header = Buffer.alloc(4);
    header.writeUInt32BE(body.length, 0);
    process.stdout.write(Buffer.concat([header, body]));
  }
});
process.stdin.on("end", () => process.exit(0));
console.error("Generic JavaScript Bridge started in pool-worker mode");
