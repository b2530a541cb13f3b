"""Pings while busy (docs/protocol.md §6): negotiated, and in the serial profile answered by
the bridge's reader thread while a tool runs Python code; the frames it reads meanwhile reach
the main thread in order."""

from __future__ import annotations

import sys
import textwrap
import time
from pathlib import Path

from snakepit_bridge.testing import FakeHost, WorkerError

WORKER = textwrap.dedent(
    """
    import time
    from snakepit_bridge import tool

    @tool
    def spin(seconds, marker):
        open(marker, "w").close()
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            pass
        return "finished"

    @tool
    def echo(x):
        return x
    """
)


def wait_for(path: Path, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert time.monotonic() < deadline, "%s never appeared" % path
        time.sleep(0.005)


def test_negotiated_only_when_offered() -> None:
    with FakeHost() as host:
        assert "busy_ping" not in host.ready
    with FakeHost(busy_ping=True) as host:
        assert host.ready["busy_ping"] is True
    with FakeHost(busy_ping=True, max_in_flight=4) as host:
        assert host.ready["busy_ping"] is True


def test_a_spinning_tool_answers_pings_and_keeps_later_frames_in_order(tmp_path: Path) -> None:
    script = tmp_path / "w.py"
    script.write_text(WORKER)
    marker = tmp_path / "started"
    with FakeHost.process(script=script, busy_ping=True, pipeline_depth=4, python=sys.executable, timeout=3.0) as host:
        rid = host.submit("spin", {"seconds": 30, "marker": str(marker)})
        wait_for(marker)
        queued = host.submit("echo", {"x": "after"})  # read by the reader thread, kept
        for i in range(3):
            host.ping(i)  # within 3 s each, while the tool spins
        host.cancel(rid)
        try:
            host.result(rid)
            raise AssertionError("the spin was not cancelled")
        except WorkerError as e:
            assert e.type_name == "Cancelled"
        assert host.result(queued) == "after"
