// How the host starts a Node worker:
//   NODE_PATH=<dir>/node_modules node --import <dir>/node_modules/snakepit-bridge/bootstrap.mjs SCRIPT
// require("snakepit-bridge") finds the package through NODE_PATH; ES modules ignore NODE_PATH,
// so a resolve hook (hooks.mjs) lets `import ... from "snakepit-bridge"` find it too.
//
// The hook runs on a loader thread of its own, which costs ~40 ms at start-up: it is registered
// only when the entry script is an ES module (`.mjs`, or `.js` under a package.json whose
// "type" is "module"), or when SNAKEPIT_NODE_ESM_HOOK=1 asks for it (a CommonJS script that
// loads the SDK with a dynamic `import()`).
import { register } from "node:module";
import { readFileSync } from "node:fs";
import { dirname, extname, join, resolve } from "node:path";

/** The "type" of the package.json nearest to `dir` ("commonjs" when there is none). */
function packageType(dir) {
  for (let d = dir; ; d = dirname(d)) {
    try {
      return JSON.parse(readFileSync(join(d, "package.json"), "utf8")).type || "commonjs";
    } catch (e) {
      // No package.json here (or an unreadable one, which Node would also refuse): go up.
      if (e && e.code !== "ENOENT" && e.code !== "ENOTDIR") return "commonjs";
    }
    if (dirname(d) === d) return "commonjs";
  }
}

function isEsmEntry(script) {
  if (!script) return false;
  const path = resolve(script);
  switch (extname(path)) {
    case ".mjs":
      return true;
    case ".cjs":
      return false;
    default:
      return packageType(dirname(path)) === "module";
  }
}

if (process.env.SNAKEPIT_NODE_ESM_HOOK === "1" || isEsmEntry(process.argv[1])) {
  register("./hooks.mjs", import.meta.url);
}
