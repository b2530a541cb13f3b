// The ESM entry point: the same module instance as require("snakepit-bridge"), so tools
// registered through either form are served together.
import bridge from "./index.js";

export const {
  tool,
  serve,
  Adapter,
  HostCallError,
  CancelledError,
  protocolFd,
  VERSION,
  BRIDGE,
  PROTOCOL_VERSIONS,
} = bridge;
export default bridge;
