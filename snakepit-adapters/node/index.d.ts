/**
 * snakepit-bridge: the Node.js worker SDK of snakepit.
 *
 * A worker script registers tools and calls {@link serve}; the snakepit host then calls the
 * tools over its framed JSON protocol (docs/protocol.md in the snakepit repository).
 *
 * ```js
 * const { tool, serve } = require("snakepit-bridge"); // or: import { tool, serve } from "snakepit-bridge"
 * tool("add", ({ a, b }) => a + b);
 * tool("fetch_user", async ({ id }, ctx) => ctx.callHost("lookup", { id }));
 * tool("count", async function* ({ n }) { for (let i = 0; i < n; i++) yield i; });
 * serve();
 * ```
 */

/** A JSON value as the protocol carries it. */
export type Json = null | boolean | number | string | Json[] | { [key: string]: Json };

/**
 * What a tool may return (or yield): anything JSON.stringify encodes (its rules: `toJSON` is
 * honoured, `undefined` and functions are dropped from objects, NaN and Infinity become null),
 * plus: `undefined` as null, a `Map` as an object, a `Set` as an array, and binary data
 * (`Buffer`, any typed array, `DataView`, `ArrayBuffer`) as a binary segment when the host
 * agreed to segments (else the call fails with a `TypeError`). A `BigInt` or a reference cycle
 * fails the call with a `TypeError`; the worker keeps serving. Do not modify a returned buffer
 * afterwards: a large one is written from its own memory, possibly after the tool returned.
 */
export type Result = unknown;

/** A call's session variables, kept by the host (docs/protocol.md §4b). */
export interface Session {
  /** The session's id. */
  readonly id: string;
  /** The variable's value, or null when it is not set (a stored null reads the same). */
  get(name: string): Promise<any>;
  /** Sets the variable. */
  set(name: string, value: unknown): Promise<void>;
  /** Deletes the variable; resolves to whether it existed. */
  delete(name: string): Promise<boolean>;
}

/**
 * The pool's global variables: pool-wide values outside any session, shared by every worker and
 * the host (`pool.globals()`), through the `global.*` host calls (docs/protocol.md §4b). Read
 * through each time (no cache).
 */
export interface Globals {
  /** The global's value, or null when it is not set. */
  get(name: string): Promise<any>;
  /** Sets the global. */
  set(name: string, value: unknown): Promise<void>;
  /** Deletes the global; resolves to whether it was set. */
  delete(name: string): Promise<boolean>;
}

/** The second argument of every tool. */
export interface Context {
  /** The host's id of the call. */
  readonly id: number;
  /**
   * Aborted when the host cancels the call (its deadline passed or its caller went away),
   * when the call's `timeout_ms` passes, and when the host goes away (end of input without a
   * `shutdown`). Its `reason` is a {@link CancelledError}.
   *
   * Cancellation is cooperative: JavaScript cannot interrupt running code, so a tool sees a
   * cancel only by watching this signal (pass it to timers, `fetch`, streams; check
   * `signal.aborted` or call `signal.throwIfAborted()` between steps of long work). Once it is
   * aborted, whatever the tool throws is answered as `Cancelled`; a tool that resolves anyway
   * is answered with its result. A tool that ignores it runs on, and the host kills the worker
   * after its `cancel_grace`.
   */
  readonly signal: AbortSignal;
  /** The call's session, or null when the call runs in none. */
  readonly session: Session | null;
  /** The pool's global variables. */
  readonly globals: Globals;
  /**
   * Calls the host tool `name` (registered by the application) with `args`, while this call
   * runs. Rejects with {@link HostCallError} when the host answers an error (`UnknownHostTool`,
   * ...), and with {@link CancelledError} when the call is cancelled or the host goes away.
   * At most 64 host calls are outstanding per worker; more wait their turn.
   */
  callHost(name: string, args?: unknown): Promise<any>;
}

/**
 * A tool: gets the call's arguments (the JSON value as sent, `null` or absent as `{}`, binary
 * segments as Buffers viewing the received frame) and its {@link Context}. It may be a plain
 * or async function (its result, or what its promise resolves to, is the answer), or a
 * generator or async generator (a streaming tool: its items are sent as chunks).
 *
 * Synchronous code, including a sync tool and every step of a sync generator, blocks the
 * worker's event loop while it runs: no other call, cancel or ping is handled meanwhile.
 */
export type ToolFunction<A = any> = (
  args: A,
  ctx: Context
) => Result | Promise<Result> | Iterable<Result> | AsyncIterable<Result>;

/** Options of {@link tool}. */
export interface ToolOptions {
  /** The tool's documentation, shown by the host (`ready.tools[].doc`). */
  doc?: string;
  /**
   * Whether it is a streaming tool (`ready.tools[].stream`). By default true for generator and
   * async generator functions. Set it for a function that returns an iterable or async
   * iterable (a Node stream, say) whose items are to be streamed.
   */
  stream?: boolean;
  /** The tool's name, with `tool(fn, options)` (default: the function's name). */
  name?: string;
}

/**
 * Registers a tool; returns `fn`. A tool registered twice keeps the last function.
 *
 * How the host calls it: with `stream: N` (a streamed call), a generator's items are sent as
 * chunks, never more than the host's credit ahead, then `end`; a cancel (the consumer went
 * away) calls the generator's `return()`, so its `finally` blocks run, and answers
 * `Cancelled`. A plain tool called as a stream answers one chunk and `end`; a generator
 * called without `stream` answers the array of its items.
 *
 * Errors: a thrown `Error` is answered as `{type: err.name, message: err.message, traceback:
 * err.stack}` (set `name` to choose the type); any other thrown value as type `Error` with
 * `String(value)`.
 */
export function tool<A = any>(name: string, fn: ToolFunction<A>, options?: ToolOptions): ToolFunction<A>;
export function tool<A = any>(fn: ToolFunction<A>, options?: ToolOptions): ToolFunction<A>;

/** Options of {@link serve}. */
export interface ServeOptions {
  /**
   * The most calls to run at once on the event loop (default: as many as the host offers,
   * `hello.max_in_flight`). The worker answers the smaller of the two.
   */
  concurrency?: number;
}

/**
 * Base class of the class form: every method of a subclass, along its prototype chain up to
 * Adapter (except `constructor`, `setup`, `teardown` and names starting with `_`), is a tool,
 * called with the instance as `this`. Tool options go in a static `tools` object:
 *
 * ```js
 * class Model extends Adapter {
 *   static tools = { predict: { doc: "Predicts." } };
 *   async setup() { this.model = await load(this.config.path); }
 *   predict({ x }) { return this.model.run(x); }
 * }
 * serve(Model);
 * ```
 */
export class Adapter {
  /** Tool options by method name (`doc`, `stream`). */
  static tools?: Record<string, ToolOptions>;
  /** @param config the worker configuration (hello.config) */
  constructor(config?: any);
  /** The worker configuration the host sent (`hello.config`; `{}` when none). */
  config: any;
  /** Awaited once before the worker reports ready (the host's handshake timeout bounds it). */
  setup(): void | Promise<void>;
  /** Awaited once when the worker stops normally (`shutdown`, end of input). */
  teardown(): void | Promise<void>;
}

/**
 * Serves the tools registered with {@link tool}, and an adapter's (which win on a name clash),
 * to the host. Returns at once; the process exits when the host is done with the worker
 * (`shutdown` once the calls in flight finish, end of input, the parent process gone). Call
 * it once.
 *
 * Where the protocol travels: with `SNAKEPIT_PROTOCOL_FDS=IN,OUT` in the environment (how the
 * host starts Node workers: fds 3 and 4, while fds 1 and 2 are the stderr pipe), on those
 * descriptors, so console.log and process.stdout can never corrupt it. Without it, on stdin
 * and stdout: loading this library then points process.stdout's writes at stderr, so only
 * output printed after that, through process.stdout or console, is safe (not a direct write
 * to fd 1, nor a child process that inherits stdout).
 *
 * When the host picks the gRPC transport (its `hello` names a Unix socket), the tools are
 * served over gRPC on that socket, with the same behaviour, and the descriptors above carry
 * only the control messages. That needs the packages `@grpc/grpc-js` and `@grpc/proto-loader`
 * (optional peer dependencies); without them the worker exits with status 1 before it is
 * ready, saying which one is missing.
 *
 * @param adapter an {@link Adapter} subclass (instantiated with the config once `hello`
 *   arrives) or instance
 */
export function serve(options?: ServeOptions): void;
export function serve(adapter: (new (config?: any) => Adapter) | Adapter | object, options?: ServeOptions): void;

/**
 * Why a call stopped early: the host cancelled it, its deadline passed, or the host went away.
 * Its `name` is `"Cancelled"`. It is the reason of an aborted `ctx.signal`, and what a pending
 * `ctx.callHost` rejects with then.
 */
export class CancelledError extends Error {
  constructor(message?: string);
  name: "Cancelled";
}

/** A call to the host failed. */
export class HostCallError extends Error {
  constructor(type: string, message: string);
  name: "HostCallError";
  /**
   * The host's error kind: `UnknownHostTool`, `NoSession`, `BadRequest`, or what a host tool
   * raised; over the gRPC transport also `HostUnavailable` (the host's service could not be
   * reached; the message says why).
   */
  type: string;
}

/** The descriptor the protocol is written to, or null before serve(). For fault-injection tests only. */
export function protocolFd(): number | null;

/** This package's version. */
export const VERSION: string;
/** What `ready.bridge` says: `node/<version> (Node <process.version>)`. */
export const BRIDGE: string;
/** The protocol versions spoken (`SNAKEPIT_BRIDGE_VERSIONS`, comma-separated, overrides them). */
export const PROTOCOL_VERSIONS: readonly number[];

