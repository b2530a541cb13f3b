"use strict";
// The tool registry: tool() for functions, Adapter for the class form.

/** @type {Map<string, Tool>} tools registered with tool(), by name */
const registry = new Map();

/**
 * @typedef {object} Tool
 * @property {string} name
 * @property {Function} fn
 * @property {object | undefined} self  the `this` of the call (an adapter instance)
 * @property {string | undefined} doc
 * @property {boolean} stream  whether ready.tools marks it as a generator tool
 */

function isGeneratorFunction(fn) {
  const kind = fn.constructor && fn.constructor.name;
  return kind === "GeneratorFunction" || kind === "AsyncGeneratorFunction";
}

function describe(name, fn, options, self) {
  const opts = options || {};
  if (opts.doc !== undefined && typeof opts.doc !== "string") throw new TypeError(`tool ${name}: doc must be a string`);
  return {
    name,
    fn,
    self,
    doc: opts.doc,
    stream: opts.stream !== undefined ? Boolean(opts.stream) : isGeneratorFunction(fn),
  };
}

/**
 * tool(name, fn, options?) or tool(fn, options?) (named after the function, or options.name).
 * Registers a tool; returns fn.
 */
function tool(nameOrFn, fnOrOptions, maybeOptions) {
  let name;
  let fn;
  let options;
  if (typeof nameOrFn === "function") {
    fn = nameOrFn;
    options = fnOrOptions;
    name = (options && options.name) || fn.name;
  } else {
    name = nameOrFn;
    fn = fnOrOptions;
    options = maybeOptions;
  }
  if (typeof name !== "string" || name === "") throw new TypeError("tool(): a tool needs a non-empty string name");
  if (typeof fn !== "function") throw new TypeError(`tool(${JSON.stringify(name)}): the tool must be a function`);
  registry.set(name, describe(name, fn, options, undefined));
  return fn;
}

/**
 * Base class of the class form: every method of the subclass (along its prototype chain,
 * except constructor, setup, teardown and names starting with "_") is a tool.
 */
class Adapter {
  constructor(config) {
    /** The worker configuration the host sent (hello.config; {} when none). */
    this.config = config === undefined || config === null ? {} : config;
  }

  /** Awaited once before the worker reports ready. */
  setup() {}

  /** Awaited once when the worker stops normally (shutdown, end of input). */
  teardown() {}
}

const NOT_TOOLS = new Set(["constructor", "setup", "teardown"]);

/** The tools of an adapter instance: its methods, bound to it; options from `static tools`. */
function adapterTools(instance) {
  const out = new Map();
  const options = (instance.constructor && instance.constructor.tools) || {};
  for (let proto = Object.getPrototypeOf(instance); proto; proto = Object.getPrototypeOf(proto)) {
    if (proto === Adapter.prototype || proto === Object.prototype) break;
    for (const name of Object.getOwnPropertyNames(proto)) {
      if (NOT_TOOLS.has(name) || name.startsWith("_") || out.has(name)) continue;
      const desc = Object.getOwnPropertyDescriptor(proto, name);
      if (typeof desc.value !== "function") continue; // getters, setters, data
      out.set(name, describe(name, desc.value, options[name], instance));
    }
  }
  return out;
}

/** The tools to serve: those registered with tool(), then the adapter's (which win). */
function collectTools(instance) {
  const tools = new Map(registry);
  if (instance) for (const [name, t] of adapterTools(instance)) tools.set(name, t);
  return tools;
}

/** ready.tools: [{name, doc?, stream?}], sorted by name. */
function toolInfo(tools) {
  return [...tools.values()]
    .sort((a, b) => (a.name < b.name ? -1 : a.name > b.name ? 1 : 0))
    .map((t) => {
      const info = { name: t.name };
      if (t.doc !== undefined) info.doc = t.doc;
      if (t.stream) info.stream = true;
      return info;
    });
}

module.exports = { tool, Adapter, collectTools, toolInfo };
