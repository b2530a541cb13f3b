"use strict";

/**
 * Why a call stopped early: the host cancelled it, its deadline passed, or the host went away.
 * Its `name` is "Cancelled", the error type the host expects for such an answer. It is the
 * reason of an aborted `ctx.signal`, and what pending `ctx.callHost` calls reject with.
 */
class CancelledError extends Error {
  constructor(message = "cancelled") {
    super(message);
  }
}
CancelledError.prototype.name = "Cancelled";

/** A call to the host failed: `type` is the host's error kind (`UnknownHostTool`, `NoSession`, ...). */
class HostCallError extends Error {
  constructor(type, message) {
    super(message);
    this.type = type;
  }
}
HostCallError.prototype.name = "HostCallError";

/** A message over the host's `max_frame`. */
class FrameTooLargeError extends Error {
  constructor(size, limit) {
    super(`message of ${size} bytes exceeds max_frame ${limit}`);
    this.size = size;
  }
}
FrameTooLargeError.prototype.name = "FrameTooLarge";

/** The host broke the protocol (internal): the worker logs it and exits with status 2. */
class ProtocolError extends Error {}
ProtocolError.prototype.name = "ProtocolError";

module.exports = { CancelledError, HostCallError, FrameTooLargeError, ProtocolError };
