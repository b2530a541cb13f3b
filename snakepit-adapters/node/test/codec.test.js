"use strict";
// Unit tests of the framing and encoding (lib/codec.js), in this process.

const assert = require("node:assert/strict");
const { test } = require("node:test");
const codec = require("../lib/codec");
const { encodeFrame } = require("./host");

function collect(reader) {
  const frames = [];
  reader.onFrame = (body, segmented) => frames.push([Buffer.from(body).toString("latin1"), segmented]);
  return frames;
}

test("FrameReader: frames split anywhere, several in one chunk, a body spread over chunks", () => {
  const a = encodeFrame({ t: "a" });
  const b = encodeFrame({ t: "b", pad: "x".repeat(1000) });
  const c = encodeFrame({ t: "c" });
  const stream = Buffer.concat([a, b, c]);
  for (const step of [1, 2, 3, 5, 7, 64, stream.length]) {
    const reader = new codec.FrameReader();
    const frames = collect(reader);
    for (let at = 0; at < stream.length; at += step) reader.push(stream.subarray(at, at + step));
    assert.deepEqual(
      frames.map(([body]) => JSON.parse(body).t),
      ["a", "b", "c"],
      `chunks of ${step} bytes`
    );
  }
});

test("FrameReader: limits and segmented frames", () => {
  const reader = new codec.FrameReader();
  collect(reader);
  reader.maxFrame = 10;
  assert.throws(() => reader.push(Buffer.from([0, 0, 0, 11])), /inbound frame of 11 bytes exceeds max_frame 10/);
  const seg = encodeFrame({ t: "x" }, [Buffer.from("ab")]);
  assert.throws(() => new codec.FrameReader().push(seg), /segments were not agreed/);
  const ok = new codec.FrameReader();
  const frames = collect(ok);
  ok.segments = true;
  ok.push(seg);
  assert.equal(frames[0][1], true);
  const { msg, segs } = codec.splitSegmented(Buffer.from(frames[0][0], "latin1"));
  assert.equal(msg.t, "x");
  assert.deepEqual(segs.map(String), ["ab"]);
});

test("encode: JSON rules, Map/Set, binary as segments or a TypeError; Buffer#toJSON restored", () => {
  assert.deepEqual(codec.encode(undefined, false), { json: "null", segs: null });
  assert.deepEqual(codec.encode("é", false), { json: '"é"', segs: null });
  assert.equal(codec.encode({ m: new Map([["a", 1]]), s: new Set([2]), n: NaN, u: undefined }, false).json, '{"m":{"a":1},"s":[2],"n":null}');
  const { json, segs } = codec.encode({ b: Buffer.from("hi"), t: new Float32Array([1]), a: new ArrayBuffer(3) }, true);
  assert.equal(json, '{"b":{"$seg":0},"t":{"$seg":1},"a":{"$seg":2}}');
  assert.deepEqual(segs.map((s) => s.length), [2, 4, 3]);
  assert.throws(() => codec.encode([Buffer.from("x")], false), /Buffer is binary data/);
  assert.throws(() => codec.encode(1n, false), TypeError);
  assert.equal(typeof Buffer.prototype.toJSON, "function");
  assert.equal(JSON.stringify(Buffer.from("x")), '{"type":"Buffer","data":[120]}');
});

test("frame: header, body, segmented layout", () => {
  const [plain] = codec.frame('{"t":"é"}', null, 100);
  assert.equal(plain.readUInt32BE(0), 10);
  assert.equal(plain.subarray(4).toString(), '{"t":"é"}');
  assert.throws(() => codec.frame('{"t":"x"}', null, 5), { name: "FrameTooLarge" });
  for (const size of [3, 70000]) {
    const bufs = codec.frame('{"t":"chunk"}', [Buffer.alloc(size, 1)], 1 << 20);
    const whole = Buffer.concat(bufs);
    const head = whole.readUInt32BE(0);
    assert.ok(head >= 0x80000000);
    assert.equal((head & 0x7fffffff) + 4, whole.length);
    const { msg, segs } = codec.splitSegmented(whole.subarray(4));
    assert.deepEqual(msg, { t: "chunk", seg: [size] });
    assert.equal(segs[0].length, size);
  }
});
