"""Bootstrap: ``python -m snakepit_bridge [--zygote] (--script PATH | --module NAME) [--adapter CLASS]``.

Claims the protocol file descriptors *first* (private duplicates of fds 0 and 1; fd 1 then points
at stderr and fd 0 at /dev/null), then runs the user's code, then serves. With ``--zygote``, fd 0
is the zygote's control socket and ``serve()`` forks one worker per host request (see
``_zygote``).
"""

from snakepit_bridge import _core

_core.claim_stdio()

import argparse  # noqa: E402  (after claim_stdio on purpose)
import importlib  # noqa: E402
import os  # noqa: E402
import runpy  # noqa: E402
import sys  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m snakepit_bridge", description=__doc__)
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--script", help="path of a worker script")
    g.add_argument("--module", help="importable module name of a worker")
    p.add_argument("--adapter", help="name of the BaseAdapter subclass to serve")
    p.add_argument("--zygote", action="store_true", help="import once, then fork workers on request")
    p.add_argument("rest", nargs=argparse.REMAINDER, help="arguments left in sys.argv for the script")
    ns = p.parse_args()
    _core._state["zygote"] = ns.zygote
    if ns.rest and ns.rest[0] == "--":
        ns.rest = ns.rest[1:]
    if ns.script:
        path = os.path.abspath(ns.script)
        sys.argv = [path] + ns.rest
        sys.path.insert(0, os.path.dirname(path))
        namespace = runpy.run_path(path, run_name="__main__")
    else:
        sys.argv = [ns.module] + ns.rest
        # The working directory is searched for the module, but last: it must not shadow the
        # standard library or installed packages (the host starts the bridge without it).
        if "" not in sys.path and os.getcwd() not in sys.path:
            sys.path.append(os.getcwd())
        namespace = vars(importlib.import_module(ns.module))
    if not _core.served():
        _core.serve(adapter=ns.adapter, namespace=namespace)


if __name__ == "__main__":
    main()
