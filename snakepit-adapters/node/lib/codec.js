"use strict";
// Framing (docs/protocol.md §1) and binary segments (§4c): the incremental frame reader, JSON
// encoding with segment extraction, and frame building.

const { FrameTooLargeError, ProtocolError } = require("./errors");

const SEGMENTED = 0x80000000; // header bit of a segmented frame
const MAX_BODY = 0x7fffffff; // what the other 31 bits can say
const DEFAULT_MAX_FRAME = 64 * 1024 * 1024;
// Segments below this size (in total) are copied into the frame's one buffer; larger ones are
// written beside it (writev), uncopied.
const COPY_BELOW = 64 * 1024;

/**
 * Splits a byte stream into frames without quadratic copying: a body that lies inside one
 * incoming chunk is handed on as a view of it; one spread over several chunks is gathered
 * into a buffer of its own, allocated once at its final size.
 */
class FrameReader {
  /** @param {(body: Buffer, segmented: boolean) => void} onFrame */
  constructor(onFrame) {
    this.onFrame = onFrame;
    this.maxFrame = DEFAULT_MAX_FRAME;
    this.segments = false; // whether segmented frames are allowed (agreed in the handshake)
    this.head = Buffer.alloc(4);
    this.headLen = 0;
    this.body = null; // the body being gathered
    this.got = 0;
    this.segmented = false;
  }

  /** Feeds one chunk; calls onFrame for every frame it completes. Throws ProtocolError. */
  push(chunk) {
    const len = chunk.length;
    let off = 0;
    while (off < len) {
      if (this.body === null) {
        let n;
        if (this.headLen === 0 && len - off >= 4) {
          n = chunk.readUInt32BE(off);
          off += 4;
        } else {
          const take = Math.min(4 - this.headLen, len - off);
          chunk.copy(this.head, this.headLen, off, off + take);
          this.headLen += take;
          off += take;
          if (this.headLen < 4) return;
          this.headLen = 0;
          n = this.head.readUInt32BE(0);
        }
        const segmented = n >= SEGMENTED;
        if (segmented) {
          if (!this.segments) throw new ProtocolError("a segmented frame, and binary segments were not agreed");
          n -= SEGMENTED;
        }
        if (n > this.maxFrame) {
          throw new ProtocolError(`inbound frame of ${n} bytes exceeds max_frame ${this.maxFrame}`);
        }
        if (len - off >= n) {
          const body = chunk.subarray(off, off + n);
          off += n;
          this.onFrame(body, segmented);
          continue;
        }
        this.body = Buffer.allocUnsafe(n);
        this.got = 0;
        this.segmented = segmented;
      }
      const take = Math.min(this.body.length - this.got, len - off);
      chunk.copy(this.body, this.got, off, off + take);
      this.got += take;
      off += take;
      if (this.got === this.body.length) {
        const body = this.body;
        this.body = null;
        this.onFrame(body, this.segmented);
      }
    }
  }
}

/** Parses a frame's JSON; a ProtocolError unless it is an object with a string `t`. */
function parseMessage(bytes) {
  let msg;
  try {
    msg = JSON.parse(bytes.toString("utf8"));
  } catch (e) {
    throw new ProtocolError(`malformed message from host: ${e.message}`);
  }
  if (msg === null || typeof msg !== "object" || Array.isArray(msg) || typeof msg.t !== "string") {
    throw new ProtocolError("malformed message from host: not a JSON object with a string `t`");
  }
  return msg;
}

/**
 * A segmented frame's body: `json_len`, the JSON message with its `seg` table, the segments.
 * Returns the message and its segments, as views over the body (no copy).
 */
function splitSegmented(body) {
  if (body.length < 4) throw new ProtocolError("segmented frame shorter than its JSON length");
  const jl = body.readUInt32BE(0);
  let at = 4 + jl;
  if (at > body.length) throw new ProtocolError(`segmented frame: JSON length ${jl} over the frame`);
  const msg = parseMessage(body.subarray(4, at));
  const table = msg.seg;
  if (!Array.isArray(table)) throw new ProtocolError("segmented frame without a valid `seg` table");
  const segs = [];
  for (const n of table) {
    if (Array.isArray(n)) {
      throw new ProtocolError("an [offset, length] segment, and shared memory was not agreed");
    }
    if (!Number.isSafeInteger(n) || n < 0) {
      throw new ProtocolError(`segmented frame without a valid \`seg\` table: ${JSON.stringify(table)}`);
    }
    const end = at + n;
    if (end > body.length) {
      throw new ProtocolError(`segment table ${JSON.stringify(table)} runs past the frame (${body.length} bytes)`);
    }
    segs.push(body.subarray(at, end));
    at = end;
  }
  if (at !== body.length) {
    throw new ProtocolError(`${body.length - at} bytes past the segments listed in ${JSON.stringify(table)}`);
  }
  return { msg, segs };
}

/**
 * `value` (parsed JSON, ours to change) with every segment reference `{"$seg": i}` replaced by
 * segment `i`, a Buffer over the frame. Extra keys of a reference (numpy's dtype/shape) are
 * ignored. Throws an error of type BadSegment for a reference to a segment not sent.
 */
function bindSegments(value, segs) {
  if (value === null || typeof value !== "object") return value;
  if (Array.isArray(value)) {
    for (let i = 0; i < value.length; i++) value[i] = bindSegments(value[i], segs);
    return value;
  }
  const i = value.$seg;
  if (Number.isInteger(i)) {
    if (i < 0 || i >= segs.length) {
      const e = new Error(`segment ${i} referred to, ${segs.length} sent`);
      e.name = "BadSegment";
      throw e;
    }
    return segs[i];
  }
  for (const k of Object.keys(value)) {
    const v = value[k];
    const bound = bindSegments(v, segs);
    // defineProperty: an own "__proto__" key from JSON.parse must stay a plain property.
    if (bound !== v) Object.defineProperty(value, k, { value: bound, writable: true, enumerable: true, configurable: true });
  }
  return value;
}

function isBinary(v) {
  return ArrayBuffer.isView(v) || v instanceof ArrayBuffer || v instanceof SharedArrayBuffer;
}

/** A Buffer over the bytes of a binary value (no copy). */
function asBuffer(v) {
  if (Buffer.isBuffer(v)) return v;
  if (ArrayBuffer.isView(v)) return Buffer.from(v.buffer, v.byteOffset, v.byteLength);
  return Buffer.from(v);
}

// The segment list of the encode() running (encoding is synchronous and not re-entered), or
// null when segments were not agreed.
let collecting = null;
let segmentsOn = false;

function binaryPart(v) {
  if (!segmentsOn) {
    const kind = Buffer.isBuffer(v) ? "Buffer" : v.constructor ? v.constructor.name : "binary data";
    throw new TypeError(
      `${kind} is binary data, and binary segments were not agreed with the host: ` +
        "send a string (e.g. base64) or an array of numbers"
    );
  }
  collecting.push(asBuffer(v));
  return { $seg: collecting.length - 1 };
}

function replacer(_key, v) {
  if (typeof v !== "object" || v === null) return v;
  if (isBinary(v)) return binaryPart(v);
  if (v instanceof Map) return Object.fromEntries(v);
  if (v instanceof Set) return Array.from(v);
  return v;
}

/**
 * Encodes a value as JSON (JSON.stringify's rules, plus: a Map as an object, a Set as an array,
 * `undefined` as null) with its binary parts (Buffer, typed arrays, DataView, ArrayBuffer) as
 * segment references when `withSegments`, else a TypeError for them. Returns the JSON text
 * and the segments (null when none). Throws TypeError for what JSON cannot hold (BigInt, a
 * reference cycle).
 */
function encode(value, withSegments) {
  switch (typeof value) {
    case "string":
    case "number":
    case "boolean":
    case "bigint": // JSON.stringify throws the TypeError
      return { json: JSON.stringify(value), segs: null };
    case "undefined":
    case "function":
    case "symbol":
      return { json: "null", segs: null };
  }
  if (value === null) return { json: "null", segs: null };
  segmentsOn = withSegments;
  collecting = [];
  // Buffer#toJSON would turn a Buffer into {type, data: [...every byte...]} before the
  // replacer sees it (costly for a large one): switched off while we encode.
  const toJSON = Buffer.prototype.toJSON;
  Buffer.prototype.toJSON = undefined;
  try {
    const json = JSON.stringify(value, replacer);
    const segs = collecting.length ? collecting : null;
    return { json: json === undefined ? "null" : json, segs };
  } finally {
    Buffer.prototype.toJSON = toJSON;
    collecting = null;
  }
}

/**
 * One frame for a JSON message text (an object) and its segments: a list of buffers to write
 * in order (one buffer, or a head and the segments themselves when they are large).
 * Throws FrameTooLargeError over `maxFrame`.
 */
function frame(json, segs, maxFrame) {
  if (!segs) {
    const len = Buffer.byteLength(json);
    if (len > maxFrame) throw new FrameTooLargeError(len, maxFrame);
    const buf = Buffer.allocUnsafe(4 + len);
    buf.writeUInt32BE(len, 0);
    buf.write(json, 4, "utf8");
    return [buf];
  }
  let segBytes = 0;
  const lens = new Array(segs.length);
  for (let i = 0; i < segs.length; i++) {
    lens[i] = segs[i].length;
    segBytes += lens[i];
  }
  const full = json.slice(0, -1) + ',"seg":[' + lens.join(",") + "]}";
  const jl = Buffer.byteLength(full);
  const total = 4 + jl + segBytes;
  if (total > maxFrame || total > MAX_BODY) throw new FrameTooLargeError(total, maxFrame);
  const copy = segBytes < COPY_BELOW;
  const head = Buffer.allocUnsafe(8 + jl + (copy ? segBytes : 0));
  head.writeUInt32BE(total + SEGMENTED, 0);
  head.writeUInt32BE(jl, 4);
  let at = 8 + head.write(full, 8, "utf8");
  if (!copy) return [head, ...segs];
  for (const s of segs) at += s.copy(head, at);
  return [head];
}

/** A frame for a message without binary parts (ours: pong, error, end, refuse, ready). */
function messageFrame(msg, maxFrame = MAX_BODY) {
  return frame(JSON.stringify(msg), null, maxFrame);
}

module.exports = {
  DEFAULT_MAX_FRAME,
  FrameReader,
  parseMessage,
  splitSegmented,
  bindSegments,
  encode,
  frame,
  messageFrame,
  isBinary,
};
