"use strict";
// A small in-test host: starts a worker the way the snakepit host does (protocol pipes at
// fds 3 and 4, fds 1 and 2 on one stderr pipe, fd 0 /dev/null, SNAKEPIT_PROTOCOL_FDS=3,4,
// `node --import bootstrap.mjs SCRIPT` with NODE_PATH), speaks frames to it and reads its
// answers. Not a test file itself.

const assert = require("node:assert/strict");
const { spawn, execFileSync } = require("node:child_process");
const fs = require("node:fs");
const net = require("node:net");
const os = require("node:os");
const path = require("node:path");

const PACKAGE = path.resolve(__dirname, "..");
const SHOWCASE = path.join(PACKAGE, "showcase.js");
const SEGMENTED = 0x80000000;
const WAIT_MS = 10000; // how long an expected message may take before a test fails

// NODE_PATH with the package linked in, as the host lays it out; worker scripts live apart
// from it (ES modules then find the package through the bootstrap's resolve hook only).
const scratch = fs.mkdtempSync(path.join(os.tmpdir(), "snakepit-node-"));
const NODE_PATH = path.join(scratch, "np", "node_modules");
fs.mkdirSync(NODE_PATH, { recursive: true });
fs.symlinkSync(PACKAGE, path.join(NODE_PATH, "snakepit-bridge"), "dir");
const BOOTSTRAP = path.join(NODE_PATH, "snakepit-bridge", "bootstrap.mjs");
const SCRIPTS = path.join(scratch, "scripts");
fs.mkdirSync(SCRIPTS);
process.on("exit", () => fs.rmSync(scratch, { recursive: true, force: true }));

let seq = 0;

/** A fresh path in the scratch directory (for gate files and the like). */
function tempPath(name) {
  return path.join(scratch, `${++seq}-${name}`);
}

/** Writes a worker script (fixtures live here, not in test/, where node --test would run them). */
function writeScript(name, source) {
  const file = path.join(SCRIPTS, `${++seq}-${name}`);
  fs.writeFileSync(file, source);
  return file;
}

/** One frame: a message (with `segs`, Buffers, as a segmented frame). */
function encodeFrame(msg, segs) {
  if (!segs) {
    const body = Buffer.from(JSON.stringify(msg));
    const head = Buffer.alloc(4);
    head.writeUInt32BE(body.length, 0);
    return Buffer.concat([head, body]);
  }
  const json = Buffer.from(JSON.stringify({ ...msg, seg: segs.map((s) => s.length) }));
  const total = 4 + json.length + segs.reduce((n, s) => n + s.length, 0);
  const head = Buffer.alloc(8);
  head.writeUInt32BE(total + SEGMENTED, 0);
  head.writeUInt32BE(json.length, 4);
  return Buffer.concat([head, json, ...segs]);
}

/** Makes a pipe whose two ends this process holds (Node has no pipe(2): a FIFO, unlinked). */
function makePipe() {
  const fifo = tempPath("fifo");
  execFileSync("mkfifo", [fifo]);
  const read = fs.openSync(fifo, fs.constants.O_RDONLY | fs.constants.O_NONBLOCK);
  const write = fs.openSync(fifo, fs.constants.O_WRONLY);
  fs.unlinkSync(fifo);
  return { read, write };
}

const live = new Set();

class Host {
  /**
   * Starts `script` as a worker. Options: env (added), pipes ("fifo": real pipes, as the
   * snakepit host uses, or "socketpair": Node's own stdio pipes), stdio (true: the protocol
   * on the worker's stdin/stdout, without SNAKEPIT_PROTOCOL_FDS), bootstrap (default true).
   */
  constructor(script = SHOWCASE, options = {}) {
    const { env = {}, pipes = "fifo", stdio = false, bootstrap = true } = options;
    const argv = [...(bootstrap ? ["--import", BOOTSTRAP] : []), script];
    const fullEnv = { ...process.env, NODE_PATH, ...env };
    delete fullEnv.SNAKEPIT_PROTOCOL_FDS;
    delete fullEnv.NODE_TEST_CONTEXT; // the worker is not a test file
    this.stderr = "";
    this.messages = []; // read, not yet taken
    this.waiters = [];
    this.ended = false;
    this.exited = new Promise((resolve) => {
      this.onExit = resolve;
    });
    let toWorker;
    let fromWorker;
    if (stdio) {
      this.child = spawn(process.execPath, argv, {
        stdio: ["pipe", "pipe", "pipe"],
        env: fullEnv,
      });
      toWorker = this.child.stdin;
      fromWorker = this.child.stdout;
      this.child.stderr.on("data", (d) => this.#gotStderr(d));
    } else if (pipes === "socketpair") {
      this.child = spawn(process.execPath, argv, {
        stdio: ["ignore", "pipe", "pipe", "pipe", "pipe"],
        env: { ...fullEnv, SNAKEPIT_PROTOCOL_FDS: "3,4" },
      });
      toWorker = this.child.stdio[3];
      fromWorker = this.child.stdio[4];
      this.child.stdio[1].on("data", (d) => this.#gotStderr(d));
      this.child.stdio[2].on("data", (d) => this.#gotStderr(d));
    } else {
      const input = makePipe();
      const output = makePipe();
      const err = makePipe();
      this.child = spawn(process.execPath, argv, {
        stdio: ["ignore", err.write, err.write, input.read, output.write],
        env: { ...fullEnv, SNAKEPIT_PROTOCOL_FDS: "3,4" },
      });
      for (const fd of [input.read, output.write, err.write]) fs.closeSync(fd);
      this.pipeFds = { input: input.write, output: output.read };
      toWorker = new net.Socket({ fd: input.write, readable: false, writable: true });
      fromWorker = new net.Socket({ fd: output.read, readable: true, writable: false });
      new net.Socket({ fd: err.read, readable: true, writable: false }).on("data", (d) => this.#gotStderr(d));
    }
    this.input = toWorker;
    this.input.on("error", () => {}); // the worker may be gone: its exit is what tests look at
    this.pid = this.child.pid;
    this.child.on("exit", (code, signal) => this.onExit({ code, signal }));
    live.add(this);
    this.chunks = [];
    this.have = 0;
    fromWorker.on("data", (chunk) => this.#read(chunk));
    fromWorker.on("end", () => {
      this.ended = true;
      this.#wake();
    });
  }

  #read(chunk) {
    // Chunks are joined only once a whole frame is there (linear in the bytes read).
    this.chunks.push(chunk);
    this.have += chunk.length;
    for (;;) {
      if (this.have < 4) break;
      if (this.chunks[0].length < 4) this.chunks = [Buffer.concat(this.chunks)];
      const head = this.chunks[0].readUInt32BE(0);
      const n = head & 0x7fffffff;
      if (this.have < 4 + n) break;
      const buf = this.chunks.length > 1 ? Buffer.concat(this.chunks) : this.chunks[0];
      const body = buf.subarray(4, 4 + n);
      const rest = buf.subarray(4 + n);
      this.chunks = rest.length ? [rest] : [];
      this.have -= 4 + n;
      let msg;
      if (head >= SEGMENTED) {
        const jl = body.readUInt32BE(0);
        msg = JSON.parse(body.subarray(4, 4 + jl).toString());
        let at = 4 + jl;
        msg.$segs = msg.seg.map((len) => body.subarray(at, (at += len)));
        assert.equal(at, body.length, "segment lengths add up to the body");
      } else {
        try {
          msg = JSON.parse(body.toString());
        } catch {
          msg = { t: "$raw", body: body.toString() }; // not JSON (the garbage tool)
        }
      }
      this.messages.push(msg);
    }
    this.#wake();
  }

  #gotStderr(data) {
    this.stderr += data;
    this.#wake();
  }

  #wake() {
    for (const w of this.waiters.splice(0)) w();
  }

  send(msg, segs) {
    this.input.write(encodeFrame(msg, segs));
  }

  /** Sends several messages in one write (so that the worker reads them together). */
  sendAll(msgs) {
    this.input.write(Buffer.concat(msgs.map((m) => encodeFrame(m))));
  }

  sendRaw(bytes) {
    this.input.write(bytes);
  }

  /** Closes the worker's protocol input (end of input). */
  closeInput() {
    this.input.end();
  }

  /** The next message matching `pred` (others stay for later takers), in arrival order. */
  async next(pred = () => true, what = "a message") {
    const deadline = Date.now() + WAIT_MS;
    for (;;) {
      const i = this.messages.findIndex(pred);
      if (i >= 0) return this.messages.splice(i, 1)[0];
      if (this.ended) throw new Error(`worker output ended while waiting for ${what}; stderr:\n${this.stderr}`);
      const left = deadline - Date.now();
      if (left <= 0) {
        throw new Error(`timed out waiting for ${what}; unread: ${JSON.stringify(this.messages)}; stderr:\n${this.stderr}`);
      }
      await this.#news(left);
    }
  }

  /** Resolves when a message or stderr output arrives, or after `ms`. */
  #news(ms) {
    return new Promise((resolve) => {
      const timer = setTimeout(resolve, ms);
      this.waiters.push(() => {
        clearTimeout(timer);
        resolve();
      });
    });
  }

  /**
   * Waits until the worker's stderr matches `pattern` (a RegExp or a string). Stderr is a pipe
   * of its own: what the worker logged before an answer may still be on its way after it.
   */
  async stderrMatches(pattern) {
    const deadline = Date.now() + WAIT_MS;
    const found = () => (typeof pattern === "string" ? this.stderr.includes(pattern) : pattern.test(this.stderr));
    while (!found()) {
      const left = deadline - Date.now();
      if (left <= 0) throw new Error(`stderr never matched ${pattern}; stderr:\n${this.stderr}`);
      await this.#news(left);
    }
  }

  /** The next message about call `id` (result, error, chunk, end, host_call for it). */
  forCall(id) {
    return this.next((m) => m.id === id || (m.t === "host_call" && m.call === id), `a message for call ${id}`);
  }

  /**
   * A ping/pong round trip. Calls the worker read before the ping have started once the pong
   * is back (a call starts in the same turn of its event loop as its frame is read).
   */
  async roundTrip() {
    const id = `rt-${++seq}`;
    this.send({ t: "ping", id });
    await this.next((m) => m.t === "pong" && m.id === id, "pong");
  }

  /** Sends hello (with `extra` fields) and returns the worker's ready or refuse. */
  async handshake(extra = {}) {
    this.send({ t: "hello", versions: [1], codecs: ["json"], worker: "test.1", max_frame: 64 << 20, config: null, max_in_flight: 1, ...extra });
    const m = await this.next(() => true, "ready");
    if (m.t === "ready") this.ready = m;
    return m;
  }

  /** Sends a call and returns its answer (result or error). */
  async call(id, cmd, args = null, extra = {}) {
    this.send({ t: "call", id, cmd, args, ...extra });
    return this.next((m) => m.id === id && (m.t === "result" || m.t === "error"), `the answer to call ${id}`);
  }

  /** Waits for the worker to exit: { code, signal }. */
  exit() {
    return withTimeout(this.exited, `worker ${this.pid} to exit; stderr:\n${this.stderr}`);
  }

  kill() {
    live.delete(this);
    if (this.child.exitCode === null && this.child.signalCode === null) this.child.kill("SIGKILL");
  }
}

function withTimeout(promise, what, ms = WAIT_MS) {
  let timer;
  return Promise.race([
    promise,
    new Promise((_, reject) => {
      timer = setTimeout(() => reject(new Error(`timed out waiting for ${what}`)), ms);
    }),
  ]).finally(() => clearTimeout(timer));
}

/** Kills every worker still running (an after/afterEach hook). */
function killAll() {
  for (const host of live) host.kill();
}

/** Starts a worker and completes the handshake (`hello` fields in options.hello). */
async function started(script = SHOWCASE, options = {}) {
  const host = new Host(script, options);
  const ready = await host.handshake(options.hello);
  assert.equal(ready.t, "ready", `expected ready, got ${JSON.stringify(ready)}; stderr:\n${host.stderr}`);
  return host;
}

module.exports = { Host, started, killAll, writeScript, tempPath, encodeFrame, withTimeout, SHOWCASE, BOOTSTRAP, NODE_PATH, PACKAGE };
