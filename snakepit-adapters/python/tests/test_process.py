"""What only a worker process shows: the bootstrap moves the protocol off fd 1 before the user's
code is imported, and the cancel signal interrupts busy Python code in the serial profile."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from snakepit_bridge.testing import FakeHost, WorkerError

WORKER = textwrap.dedent(
    '''
    import os, sys
    print("printed at import time")
    sys.stdout.write("written at import time\\n")
    os.write(1, b"written to fd 1 at import time\\n")

    from snakepit_bridge import Context, tool

    @tool
    def chatty(n: int) -> int:
        print("printed by a tool")
        os.write(1, b"\\x00\\x00\\x00\\x05garbage")  # would look like a frame on the protocol
        return n + 1

    @tool
    def spin(ctx: Context) -> None:
        ctx.call_host("started")
        while True:
            pass

    @tool
    def spin_stream():
        yield "started"
        while True:
            pass

    @tool
    async def ablock(ctx: Context) -> None:
        import time
        ctx.call_host("started")
        while True:
            time.sleep(0.001)  # blocks the event loop: only the signal can stop it

    @tool
    async def agather(ctx: Context) -> None:
        import asyncio, time

        async def child() -> None:
            ctx.call_host("started")
            while True:
                time.sleep(0.001)  # blocks the loop inside a child task

        await asyncio.gather(child())

    @tool
    async def asleep(ctx: Context) -> None:
        import asyncio
        ctx.call_host("started")
        await asyncio.sleep(3600)
    '''
)


@pytest.fixture
def script(tmp_path: Path) -> Path:
    p = tmp_path / "worker.py"
    p.write_text(WORKER)
    return p


def test_output_at_import_time_and_in_tools_goes_to_stderr(script: Path, tmp_path: Path) -> None:
    err = tmp_path / "stderr.txt"
    with open(err, "wb") as stderr:
        with FakeHost.process(script=script, stderr=stderr) as host:
            assert host.ready["t"] == "ready"
            assert host.call("chatty", [1]) == 2
            assert host.call("chatty", [2]) == 3
    text = err.read_text(errors="replace")
    for line in ["printed at import time", "written at import time", "written to fd 1 at import time",
                 "printed by a tool", "garbage"]:
        assert line in text
    assert host.returncode == 0


@pytest.mark.parametrize("cmd", ["spin", "asleep", "ablock", "agather"])
def test_the_cancel_signal_interrupts_a_busy_call_in_the_serial_profile(script: Path, cmd: str) -> None:
    with FakeHost.process(script=script) as host:
        assert isinstance(host.ready["cancel_signal"], int)
        for _ in range(20):  # the signal lands anywhere: in the tool, in asyncio, mid-frame
            rid = host.submit(cmd)
            m = host.recv()
            assert m["t"] == "host_call" and m["name"] == "started"
            host.send({"t": "host_result", "id": m["id"], "ok": None})
            host.cancel(rid)
            with pytest.raises(WorkerError) as e:
                host.result(rid)
            assert e.value.type_name == "Cancelled"
            assert host.call("chatty", [0]) == 1, "the worker goes on"


def test_the_cancel_signal_interrupts_a_busy_stream(script: Path) -> None:
    with FakeHost.process(script=script) as host:
        rid = host.submit("spin_stream", stream=4)
        assert host.reply(rid)["data"] == "started"
        host.cancel(rid)
        m = host.reply(rid)
        assert m["t"] == "error" and m["error"]["type"] == "Cancelled"
        assert host.call("chatty", [0]) == 1


def test_a_module_worker_and_the_exit_status(tmp_path: Path) -> None:
    (tmp_path / "mod_worker.py").write_text("from snakepit_bridge import tool\n\n@tool\ndef hi() -> str:\n    return 'hi'\n")
    import os

    env = dict(os.environ, PYTHONPATH=str(tmp_path))
    with FakeHost.process(module="mod_worker", env=env) as host:
        assert host.call("hi") == "hi"
    assert host.returncode == 0


def test_the_package_runs_as_a_module_from_any_directory(tmp_path: Path) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "snakepit_bridge", "--help"],
        cwd=tmp_path,
        capture_output=True,
        timeout=30,
        env={"PYTHONPATH": str(Path(__file__).resolve().parents[1]), "PATH": "/usr/bin:/bin"},
    )
    assert out.returncode == 0, out.stderr
    assert b"--script" in out.stderr or b"--script" in out.stdout
