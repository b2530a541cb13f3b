"""Bootstrap: ``python -m snakepit_bridge [--zygote] (--script PATH | --module NAME) [--adapter CLASS]``.

Claims the protocol file descriptors *first* (private duplicates of fds 0 and 1; fd 1 then points
at stderr and fd 0 at /dev/null), then runs the user's code, then serves. With ``--zygote``, fd 0
is the zygote's control socket and ``serve()`` forks one worker per host request (see
``_zygote``).
"""

from snakepit_bridge import _core

_core.claim_stdio()

import importlib  # noqa: E402
import os  # noqa: E402
import runpy  # noqa: E402
import sys  # noqa: E402

from snakepit_bridge._cli import parse_args  # noqa: E402


def main() -> None:
    ns = parse_args(sys.argv[1:])
    _core._state["zygote"] = ns["zygote"]
    rest = [str(a) for a in ns["rest"]]  # type: ignore[attr-defined]
    script, module, adapter = ns["script"], ns["module"], ns["adapter"]
    if isinstance(script, str):
        path = os.path.abspath(script)
        sys.argv = [path] + rest
        sys.path.insert(0, os.path.dirname(path))
        namespace = runpy.run_path(path, run_name="__main__")
    else:
        sys.argv = [str(module)] + rest
        # The working directory is searched for the module, but last: it must not shadow the
        # standard library or installed packages (the host starts the bridge without it).
        if "" not in sys.path and os.getcwd() not in sys.path:
            sys.path.append(os.getcwd())
        namespace = vars(importlib.import_module(str(module)))
    if not _core.served():
        _core.serve(adapter=adapter if isinstance(adapter, str) else None, namespace=namespace)


if __name__ == "__main__":
    main()
