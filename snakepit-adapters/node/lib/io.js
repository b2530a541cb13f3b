"use strict";
// Where the protocol travels, and the process-level plumbing around it.
//
// Two layouts:
// * SNAKEPIT_PROTOCOL_FDS=IN,OUT (how the host starts Node workers: "3,4"): the protocol is on
//   those descriptors; fd 0 is /dev/null and fds 1 and 2 are the stderr pipe, so nothing a
//   tool prints can reach the protocol.
// * otherwise (a host speaking on the worker's stdin and stdout, e.g. `snakepit serve
//   --command "node worker.js"`): the protocol is on fds 0 and 1, and process.stdout's
//   writes are sent to stderr from the moment this library is loaded (claimStdout).

const fs = require("node:fs");
const net = require("node:net");
const { Writable } = require("node:stream");

const O_CLOEXEC = 0o2000000; // Linux's value, as /proc/self/fdinfo prints the flags (octal)

/**
 * Whether `fd` is close-on-exec: true, false, or null when /proc cannot say.
 *
 * Node itself marks every descriptor it inherited close-on-exec at start-up (libuv's
 * uv_disable_stdio_inheritance(), called in node::PlatformInit), so in practice the
 * answer is true and the protocol fds never reach a child process.
 */
function isCloexec(fd) {
  try {
    const info = fs.readFileSync(`/proc/self/fdinfo/${fd}`, "latin1");
    const m = /^flags:\s*([0-7]+)/m.exec(info);
    return m ? (parseInt(m[1], 8) & O_CLOEXEC) !== 0 : null;
  } catch {
    return null;
  }
}

/**
 * The descriptor to use for an inherited protocol fd, never inherited by child processes.
 * Node has no fcntl(): when `fd` is not close-on-exec already, it is opened again through
 * /proc/self/fd (libuv opens with O_CLOEXEC; this works for pipes, not sockets) and closed.
 * Falls back to `fd` itself when that fails (no /proc, a socket).
 */
function privateFd(fd, flags) {
  if (isCloexec(fd) !== false) return fd;
  return reopenCloexec(fd, flags);
}

function reopenCloexec(fd, flags) {
  try {
    const copy = fs.openSync(`/proc/self/fd/${fd}`, flags | fs.constants.O_NONBLOCK);
    fs.closeSync(fd);
    return copy;
  } catch (e) {
    log(`protocol fd ${fd} stays inheritable by child processes (${e.code || e.message})`);
    return fd;
  }
}

function log(text) {
  try {
    process.stderr.write(`snakepit-bridge: ${text}\n`);
  } catch {
    // stderr is gone: nothing to tell
  }
}

let stdoutClaim = null; // { stream, write }: process.stdout and its original write method

/**
 * stdin/stdout layout: from now on process.stdout's writes (console.log included) go to
 * stderr; the protocol keeps the original write method. Idempotent.
 */
function claimStdout() {
  if (stdoutClaim) return stdoutClaim;
  const stream = process.stdout;
  stdoutClaim = { stream, write: stream.write.bind(stream) };
  stream.write = function write(chunk, encoding, cb) {
    return process.stderr.write(chunk, encoding, cb);
  };
  return stdoutClaim;
}

/** Reads a descriptor as a stream: a net.Socket for a pipe or socket (see openProtocol). */
function readStream(fd) {
  try {
    return new net.Socket({ fd, readable: true, writable: false });
  } catch {
    // Not a pipe or socket (a file, say): read it through fs. Unlike a socket's, such a read
    // runs on libuv's thread pool, which is only fine because a file never blocks.
    return fs.createReadStream(null, { fd, autoClose: false });
  }
}

/** Writes a descriptor as a stream: a net.Socket (ordered, asynchronous) or synchronous writes. */
function writeStream(fd) {
  try {
    return new net.Socket({ fd, readable: false, writable: true });
  } catch {
    return new Writable({
      write(chunk, _encoding, cb) {
        try {
          for (let at = 0; at < chunk.length; ) at += fs.writeSync(fd, chunk, at);
          cb();
        } catch (e) {
          cb(e);
        }
      },
    });
  }
}

/**
 * The protocol's output: whole frames written in order, a count of the writes not yet handed
 * to the kernel (to flush before exiting), and the stream's backpressure.
 */
class Output {
  constructor(stream, write) {
    this.stream = stream;
    this.writeFn = write || stream.write.bind(stream);
    this.pending = 0;
    this.waiters = [];
    this.done = () => {
      if (--this.pending === 0) for (const w of this.waiters.splice(0)) w();
    };
  }

  /** Writes one frame (its buffers, in order, as one writev when there are several). */
  send(bufs) {
    if (bufs.length === 1) {
      this.pending++;
      this.writeFn(bufs[0], this.done);
      return;
    }
    this.stream.cork();
    for (const b of bufs) {
      this.pending++;
      this.writeFn(b, this.done);
    }
    this.stream.uncork();
  }

  /** Whether the stream holds more than its high-water mark (wait for drained()). */
  get needsDrain() {
    return this.stream.writableNeedDrain === true;
  }

  drained() {
    return new Promise((resolve) => {
      if (!this.needsDrain) resolve();
      else this.stream.once("drain", resolve);
    });
  }

  /** Resolves once everything written so far has reached the kernel. */
  flushed() {
    return new Promise((resolve) => {
      if (this.pending === 0) resolve();
      else this.waiters.push(resolve);
    });
  }
}

/**
 * Opens the protocol's streams: { input, output, outFd }. In the fds layout the descriptors
 * are read and written through net.Socket (a pipe read pending on libuv's thread pool, as
 * fs.createReadStream would do it, would keep process.exit() from returning).
 */
function openProtocol() {
  const spec = process.env.SNAKEPIT_PROTOCOL_FDS;
  if (spec) {
    const m = /^\s*(\d+)\s*,\s*(\d+)\s*$/.exec(spec);
    if (!m) throw new Error(`SNAKEPIT_PROTOCOL_FDS must be "IN,OUT" (two descriptor numbers), not ${JSON.stringify(spec)}`);
    for (const fd of [m[1], m[2]]) {
      try {
        fs.fstatSync(Number(fd));
      } catch (e) {
        throw new Error(`SNAKEPIT_PROTOCOL_FDS=${spec}: descriptor ${fd} is not open (${e.code})`);
      }
    }
    const inFd = privateFd(Number(m[1]), fs.constants.O_RDONLY);
    const outFd = privateFd(Number(m[2]), fs.constants.O_WRONLY);
    return { input: readStream(inFd), output: new Output(writeStream(outFd)), outFd };
  }
  const claim = claimStdout();
  return { input: process.stdin, output: new Output(claim.stream, claim.write), outFd: 1 };
}

/** Calls `onGone` when the parent process changes (checked every second; does not keep the process alive). */
function watchParent(onGone) {
  const parent = process.ppid;
  const timer = setInterval(() => {
    if (process.ppid !== parent) onGone(parent);
  }, 1000);
  timer.unref();
}

/**
 * Closes the shared-memory arena the host offered (hello.shm), which this bridge never maps:
 * only if that descriptor is the host's memfd, so a wrong number cannot close our own pipes.
 */
function closeArenaFd(offer) {
  const fd = offer !== null && typeof offer === "object" ? offer.fd : undefined;
  if (!Number.isInteger(fd) || fd < 0) return;
  try {
    if (fs.readlinkSync(`/proc/self/fd/${fd}`).startsWith("/memfd:snakepit-arena")) fs.closeSync(fd);
  } catch {
    // not ours to close, or already gone
  }
}

module.exports = {
  openProtocol,
  claimStdout,
  watchParent,
  closeArenaFd,
  isCloexec,
  reopenCloexec,
  log,
};
