"""The bootstrap's command line, parsed by hand: argparse costs ~1.5 ms of every worker's start."""

from __future__ import annotations

import sys

USAGE = "usage: python -m snakepit_bridge [--zygote] (--script PATH | --module NAME) [--adapter CLASS] [--] [ARGS ...]"


def _usage_error(msg: str) -> None:
    sys.stderr.write("%s\npython -m snakepit_bridge: error: %s\n" % (USAGE, msg))
    sys.exit(2)


def parse_args(argv: list[str]) -> dict[str, object]:
    """The bootstrap's options, by hand (argparse costs ~1.5 ms of every worker's start): the
    options first, then everything from the first other argument (or after ``--``) is left for
    the script, as argparse's REMAINDER did."""
    opts: dict[str, object] = {"script": None, "module": None, "adapter": None, "zygote": False, "rest": []}
    i = 0
    while i < len(argv):
        a = argv[i]
        name, eq, value = a.partition("=")
        if a == "--":
            i += 1
            break
        if a in ("-h", "--help"):
            sys.stdout.write(USAGE + "\n")
            sys.exit(0)
        if a == "--zygote":
            opts["zygote"] = True
        elif name in ("--script", "--module", "--adapter"):
            if not eq:
                i += 1
                if i >= len(argv):
                    _usage_error("argument %s: expected one argument" % name)
                value = argv[i]
            opts[name[2:]] = value
        elif a.startswith("--"):
            _usage_error("unrecognized argument: %s" % a)
        else:
            break
        i += 1
    opts["rest"] = argv[i:]
    if (opts["script"] is None) == (opts["module"] is None):
        _usage_error("exactly one of the arguments --script --module is required")
    return opts
