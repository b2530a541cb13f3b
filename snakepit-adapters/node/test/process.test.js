"use strict";
// Process-level behaviour: the protocol fds stay out of child processes, parent death.

const assert = require("node:assert/strict");
const { execFileSync } = require("node:child_process");
const fs = require("node:fs");
const { test, afterEach } = require("node:test");
const { Host, started, killAll, writeScript, tempPath, BOOTSTRAP, SHOWCASE } = require("./host");
const io = require("../lib/io");

afterEach(killAll);

const O_CLOEXEC = 0o2000000;

/** The (dev, ino) of what each descriptor of process `pid` refers to. */
function openFiles(pid) {
  const out = new Map();
  for (const fd of fs.readdirSync(`/proc/${pid}/fd`)) {
    try {
      const st = fs.statSync(`/proc/${pid}/fd/${fd}`);
      out.set(Number(fd), `${st.dev}:${st.ino}`);
    } catch {
      // closed meanwhile
    }
  }
  return out;
}

function killQuietly(pid) {
  try {
    process.kill(pid, "SIGKILL");
  } catch {
    // gone already
  }
}

test("a child process of a tool does not inherit the protocol pipes (Node marks them close-on-exec)", async () => {
  const host = await started();
  const pipes = new Set([host.pipeFds.input, host.pipeFds.output].map((fd) => {
    const st = fs.fstatSync(fd);
    return `${st.dev}:${st.ino}`;
  }));

  // The worker holds them at 3 and 4, close-on-exec.
  const mine = [...openFiles(host.pid)].filter(([, id]) => pipes.has(id));
  assert.deepEqual(mine.map(([fd]) => fd).sort(), [3, 4]);
  for (const [fd] of mine) {
    const flags = parseInt(/^flags:\s*([0-7]+)/m.exec(fs.readFileSync(`/proc/${host.pid}/fdinfo/${fd}`, "latin1"))[1], 8);
    assert.ok(flags & O_CLOEXEC, `fd ${fd} is close-on-exec`);
  }

  for (const [id, setsid] of [[1, false], [2, true]]) {
    const child = (await host.call(id, "grandchild", { setsid })).ok;
    try {
      const leaked = [...openFiles(child)].filter(([, ident]) => pipes.has(ident));
      assert.deepEqual(leaked, [], `grandchild ${child} holds no protocol pipe`);
    } finally {
      killQuietly(child);
    }
  }
});

test("reopenCloexec (the fallback for an inheritable fd): a close-on-exec descriptor for the same pipe", () => {
  const fifo = tempPath("fifo");
  execFileSync("mkfifo", [fifo]);
  const read = fs.openSync(fifo, fs.constants.O_RDONLY | fs.constants.O_NONBLOCK);
  const write = fs.openSync(fifo, fs.constants.O_WRONLY);
  fs.unlinkSync(fifo);
  try {
    const before = fs.fstatSync(read).ino;
    const copy = io.reopenCloexec(read, fs.constants.O_RDONLY);
    assert.notEqual(copy, read);
    assert.throws(() => fs.fstatSync(read), { code: "EBADF" }, "the original is closed");
    assert.equal(fs.fstatSync(copy).ino, before);
    assert.equal(io.isCloexec(copy), true);
    fs.writeSync(write, "ping");
    const buf = Buffer.alloc(4);
    assert.equal(fs.readSync(copy, buf), 4);
    assert.equal(buf.toString(), "ping");
    fs.closeSync(copy);
  } finally {
    fs.closeSync(write);
  }
});

test("the worker exits when its parent dies", async () => {
  // A parent that starts the worker (handing it the protocol fds) and is then killed.
  const middle = writeScript(
    "middle.js",
    `const { spawn } = require("node:child_process");
spawn(process.execPath, ["--import", ${JSON.stringify(BOOTSTRAP)}, ${JSON.stringify(SHOWCASE)}], { stdio: ["ignore", 1, 2, 3, 4] });
setInterval(() => {}, 1 << 30);
`
  );
  const host = new Host(middle, { bootstrap: false });
  const ready = await host.handshake();
  assert.equal(ready.t, "ready");
  const worker = ready.pid;
  assert.notEqual(worker, host.pid);
  try {
    host.child.kill("SIGKILL");
    // Its output ends when it exits (nothing else holds the pipe).
    await assert.rejects(host.next(), /worker output ended/);
    await host.stderrMatches(/parent process \d+ is gone; exiting/);
  } finally {
    killQuietly(worker);
  }
});
