"""A `sglang-evict serve` child process on loopback: started, waited for, stopped by its pid.

Used by the demo, the tests and the benchmarks. The server runs in its own process group
(SGLang spawns a scheduler and a detokenizer), so stopping it stops all of them.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import requests


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class ServerStartError(RuntimeError):
    pass


def _exit_on_sigterm(signum, frame) -> None:
    raise SystemExit(128 + signum)


def stop_servers_on_sigterm() -> None:
    """Make SIGTERM unwind the stack (SystemExit), so `with ServerProcess(...)` and `finally:
    server.stop()` stop the server: it runs in its own session, and Python's default SIGTERM
    exit would leave it, its scheduler and detokenizer running. Only where the process has no
    handler of its own, and only from the main thread (where handlers can be set)."""
    if (threading.current_thread() is threading.main_thread()
            and signal.getsignal(signal.SIGTERM) is signal.SIG_DFL):
        signal.signal(signal.SIGTERM, _exit_on_sigterm)


class ServerProcess:
    """`with ServerProcess(args) as server: requests.post(server.url + "/generate", ...)`."""

    def __init__(
        self,
        sglang_args: list[str] | None = None,
        host: str = "127.0.0.1",
        port: int | None = None,
        startup_timeout: float = 900.0,
        log_path: str | os.PathLike | None = None,
        env: dict[str, str] | None = None,
    ):
        self.host = host
        self.port = port or free_port(host)
        self.sglang_args = list(sglang_args or [])
        self.startup_timeout = startup_timeout
        self.log_path = Path(log_path) if log_path else Path(
            tempfile.mkstemp(prefix="sglang-evict-server-", suffix=".log")[1]
        )
        self.env = env
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def command(self) -> list[str]:
        # -P: never put the working directory on sys.path; from the repository root it would
        # shadow the PyPI package `kernels` that SGLang imports with our kernels/ folder.
        return [
            sys.executable, "-P", "-m", "sglang_evict", "serve",
            "--host", self.host, "--port", str(self.port), *self.sglang_args,
        ]

    def start(self) -> "ServerProcess":
        stop_servers_on_sigterm()
        env = dict(os.environ if self.env is None else self.env)
        env.setdefault("PYTHONUNBUFFERED", "1")
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(
            self.command(), stdout=self._log, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL, env=env, start_new_session=True,
        )
        return self

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def wait_ready(self, progress=None) -> "ServerProcess":
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise ServerStartError(
                    f"server exited with code {self.proc.returncode} during start-up; log tail:\n"
                    + self.log_tail()
                )
            try:
                if requests.get(self.url + "/health", timeout=5).status_code == 200:
                    return self
            except requests.RequestException:
                pass
            if progress is not None:
                progress()
            time.sleep(1.0)
        self.stop()
        raise ServerStartError(
            f"server not ready after {self.startup_timeout:.0f}s; log tail:\n" + self.log_tail()
        )

    def stop(self, grace: float = 2.0, timeout: float = 30.0) -> None:
        """SIGTERM, then after `grace` seconds SIGKILL to the whole group. SGLang's own shutdown
        on SIGTERM sleeps 5 s for crash diagnostics once its scheduler is gone; nothing of a
        server outlives its processes, so the rest is not waited for."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                self.proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                pass
        # The scheduler and detokenizer share the group; make sure none outlives the server.
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        if self.proc.poll() is None:
            self.proc.wait(timeout=timeout)
        self._log.close()
        self.proc = None

    def __enter__(self) -> "ServerProcess":
        self.start()
        try:
            return self.wait_ready()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc) -> None:
        self.stop()
