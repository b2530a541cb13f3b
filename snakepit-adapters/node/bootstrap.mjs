// How the host starts a Node worker:
//   NODE_PATH=<dir>/node_modules node --import <dir>/node_modules/snakepit-bridge/bootstrap.mjs SCRIPT
// require("snakepit-bridge") finds the package through NODE_PATH; ES modules ignore NODE_PATH,
// so a resolve hook (hooks.mjs) lets `import ... from "snakepit-bridge"` find it too.
import { register } from "node:module";

register("./hooks.mjs", import.meta.url);
