"""The servers of one pytest worker's lane: one alive at a time, so two workers keep at most two.

A lane runs its server tests in order (tests/conftest.py assigns them; LANE names the lane of
the test that runs). A module's own server is held while the module runs (`held`); the vanilla
server is never held: it stays up between the tests that talk to it and is stopped when another
server is asked for. Asking for a server while another is held is an error, not a third process.
Side by side, each lane's servers run torch on one thread (two thread pools per core spin).

Tests that compare a server with vanilla SGLang read vanilla's answers from `answers`: each
server module names its sequences of requests in `vanilla_requests(tokenizer)` ({name: [(ids,
max_new_tokens, sampling), ...]}), and the first vanilla server a worker starts answers all of
them, each sequence in its order, before anything else. A module then compares with vanilla
while only its own server is alive.
"""

from __future__ import annotations

import contextlib
import os

import pytest

from serving_client import generate

LANE = pytest.StashKey[str]()  # the lane of the server test that runs (tests/conftest.py)

# The vanilla server's settings: the quick scored sweeps' vanilla ones (test_scored_benches.py
# runs them on it) with a 512-token pool, which every other request to it fits, and a decode log
# line per step (test_plan_admission.py reads it).
VANILLA_ARGS = ["--max-total-tokens", "512", "--enable-cache-report", "--decode-log-interval", "1"]


class LaneServers:
    """This worker's servers, one up at a time, and vanilla's recorded answers."""

    def __init__(self, session, model_path, one_thread: bool):
        self._session = session
        self._model_path = model_path
        self._one_thread = one_thread  # lanes side by side: one torch thread per server
        self._current = None  # (ServerProcess, args, env)
        self._held = False
        self._answers: dict[str, dict[str, list[dict]]] | None = None  # module -> name -> replies

    @contextlib.contextmanager
    def held(self, args: list[str], env: dict[str, str] | None = None):
        """`with servers.held(args) as srv:` a module's own server, stopped at the end."""
        srv = self.get(args, env)
        try:
            yield srv
        finally:
            self.release(srv)

    def get(self, args: list[str], env: dict[str, str] | None = None):
        """A server started with `args` (and `env`), held until `release`. Vanilla's answers
        are recorded first if they are not yet (then only one server is up at a time)."""
        if self._answers is None and self._listing_modules():
            self.vanilla()
        if self._current is not None and self._current[1:] == (args, env):
            self._held = True
            return self._current[0]
        srv = self._replace(args, env)
        self._held = True
        return srv

    def release(self, srv) -> None:
        if self._current is not None and self._current[0] is srv:
            self._stop()

    def vanilla(self):
        """The vanilla server, started if it is not the one up (never held)."""
        if self._current is None or self._current[1:] != (VANILLA_ARGS, None):
            self._replace(VANILLA_ARGS, None)
        srv = self._current[0]
        if self._answers is None:
            self._record(srv)
        return srv

    def answers(self, module) -> dict[str, list[dict]]:
        """Vanilla's responses to `module`'s vanilla_requests, by name, in the order asked."""
        if self._answers is None:
            self.vanilla()
        return self._answers.get(module.__name__, {})

    def stop(self) -> None:
        """Stop whatever is up (the lane is over)."""
        if self._current is not None:
            self._stop()

    def _replace(self, args, env):
        from sglang_evict.server_process import ServerProcess

        if self._held:
            raise RuntimeError(
                f"a second server ({args}) asked for while this worker holds "
                f"{self._current[1]}: a lane keeps one server alive at a time")
        if self._current is not None:
            self._stop()
        run_env = dict(os.environ if env is None else env)
        if self._one_thread:
            run_env.setdefault("OMP_NUM_THREADS", "1")
        srv = ServerProcess(args, env=run_env).__enter__()
        self._current = (srv, args, env)
        return srv

    def _stop(self) -> None:
        self._current[0].stop()
        self._current, self._held = None, False

    def _record(self, srv) -> None:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(self._model_path)
        self._answers = {
            module.__name__: {
                name: [generate(srv, ids, n, **sampling) for ids, n, sampling in sequence]
                for name, sequence in module.vanilla_requests(tokenizer).items()}
            for module in self._listing_modules()}

    def _listing_modules(self) -> list:
        """The modules of this lane (of the session without lanes) that list vanilla
        requests, by name."""
        lane = self._session.config.stash.get(LANE, None)
        modules = {item.module for item in self._session.items
                   if hasattr(getattr(item, "module", None), "vanilla_requests")
                   and (lane is None or item.nodeid.endswith("@" + lane))}
        return sorted(modules, key=lambda m: m.__name__)
