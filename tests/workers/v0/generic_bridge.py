#!/usr/bin/env python3
"""A re-creation, for snakepit's compatibility tests, of the observable behaviour of the
original Snakepit v0.2.1 Python bridge (`priv/python/generic_bridge.py`): its stdio envelope,
its commands (ping, echo, compute, info) and their reply shapes, including the convention that
a failed computation or an unknown command is a *successful* reply whose result has
``"status": "error"``. Written from that behaviour, not copied.

Run as ``python3 generic_bridge.py --mode pool-worker``.
"""

import json
import struct
import sys
import time
from datetime import datetime

START = time.time()
handled = 0


def ping(args):
    return {
        "status": "ok",
        "bridge_type": "generic",
        "uptime": time.time() - START,
        "requests_handled": handled,
        "timestamp": time.time(),
        "python_version": sys.version,
        "worker_id": args.get("worker_id", "unknown"),
        "echo": args,
    }


def echo(args):
    return {"status": "ok", "echoed": args, "timestamp": time.time()}


OPERATIONS = {
    "add": lambda a, b: a + b,
    "subtract": lambda a, b: a - b,
    "multiply": lambda a, b: a * b,
}


def compute(args):
    op, a, b = args.get("operation", "add"), args.get("a", 0), args.get("b", 0)
    try:
        if op == "divide":
            if b == 0:
                raise ValueError("Division by zero")
            result = a / b
        elif op in OPERATIONS:
            result = OPERATIONS[op](a, b)
        else:
            raise ValueError("Unsupported operation: %s" % op)
    except Exception as e:  # the original reports any failure in the result, with success: true
        return {"status": "error", "error": str(e), "timestamp": time.time()}
    return {"status": "ok", "operation": op, "inputs": {"a": a, "b": b}, "result": result, "timestamp": time.time()}


def info(args):
    return {
        "status": "ok",
        "bridge_info": {
            "name": "Generic Snakepit Bridge",
            "version": "1.0.0",
            "supported_commands": list(COMMANDS),
            "uptime": time.time() - START,
            "total_requests": handled,
        },
        "system_info": {"python_version": sys.version, "platform": sys.platform},
        "timestamp": time.time(),
    }


COMMANDS = {"ping": ping, "echo": echo, "compute": compute, "info": info}


def unknown(command):
    return {
        "status": "error",
        "error": "Unknown command: %s" % command,
        "supported_commands": list(COMMANDS),
        "timestamp": time.time(),
    }


def main():
    global handled
    inp, out = sys.stdin.buffer, sys.stdout.buffer
    sys.stderr.write("Generic Bridge started in pool-worker mode\n")
    while True:
        header = inp.read(4)
        if len(header) != 4:
            break
        (length,) = struct.unpack(">I", header)
        body = inp.read(length)
        if len(body) != length:
            break
        request = json.loads(body.decode("utf-8"))
        command, args = request.get("command"), request.get("args", {})
        handled += 1
        try:
            handler = COMMANDS.get(command)
            result = handler(args) if handler else unknown(command)
            reply = {"id": request.get("id"), "success": True, "result": result}
        except Exception as e:
            reply = {"id": request.get("id"), "success": False, "error": str(e)}
        reply["timestamp"] = datetime.now().isoformat()
        data = json.dumps(reply, separators=(",", ":")).encode("utf-8")
        out.write(struct.pack(">I", len(data)) + data)
        out.flush()


if __name__ == "__main__":
    main()
