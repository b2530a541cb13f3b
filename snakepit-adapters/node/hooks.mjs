// Module resolve hook (registered by bootstrap.mjs): the specifier "snakepit-bridge" (and the
// subpaths package.json exports) resolves to this package when nothing else provides it.
//
// A copy installed where the script lives still wins, as it does for require(), which looks
// in node_modules directories before NODE_PATH: both forms then load the same copy.

const here = (path) => new URL(path, import.meta.url).href;

const TARGETS = new Map([
  ["snakepit-bridge", here("./index.mjs")],
  ["snakepit-bridge/showcase", here("./showcase.js")],
  ["snakepit-bridge/bootstrap.mjs", here("./bootstrap.mjs")],
  ["snakepit-bridge/package.json", here("./package.json")],
]);

export async function resolve(specifier, context, nextResolve) {
  const target = TARGETS.get(specifier);
  if (target === undefined) return nextResolve(specifier, context);
  try {
    return await nextResolve(specifier, context);
  } catch (e) {
    if (!e || e.code !== "ERR_MODULE_NOT_FOUND") throw e;
  }
  return { url: target, shortCircuit: true };
}
