"""ServerProcess: a SIGTERM to the process that started a server (the demo, a benchmark) stops
the server's whole process group, which runs in a session of its own."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

# A stand-in server: ServerProcess's real start() (own session, log file) running `sleep`
# instead of `sglang-evict serve`; the script prints the server's pid and waits inside `with`.
SCRIPT = textwrap.dedent("""
    import sys, time
    from sglang_evict.server_process import ServerProcess

    class Sleeper(ServerProcess):
        def command(self):
            return [sys.executable, "-c", "import time; time.sleep(600)"]

        def wait_ready(self, progress=None):
            return self

    with Sleeper() as server:
        print(server.proc.pid, flush=True)
        time.sleep(600)
""")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie child of an exited parent is reaped by init; count it as gone
    with open(f"/proc/{pid}/stat") as f:
        return f.read().split(")")[-1].split()[0] != "Z"


def test_sigterm_to_the_starter_stops_the_server():
    starter = subprocess.Popen([sys.executable, "-P", "-c", SCRIPT], stdout=subprocess.PIPE,
                               text=True)
    try:
        server_pid = int(starter.stdout.readline())
        assert _alive(server_pid)
        starter.send_signal(signal.SIGTERM)
        assert starter.wait(timeout=60) == 128 + signal.SIGTERM
        deadline = time.monotonic() + 30
        while _alive(server_pid) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not _alive(server_pid)
    finally:
        starter.kill()
