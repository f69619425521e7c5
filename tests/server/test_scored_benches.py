"""bench/scored_sessions.py and bench/scored_context.py --quick on real servers (vanilla and
eviction on one 512-token pool): every turn answered, every scored turn counted and scored from
its own reply, the report and its plot written. Both benches share their servers: vanilla is
the session's server (started with the quick sweeps' vanilla settings), the eviction server is
started once for both; each run starts from an empty cache."""

from __future__ import annotations

import contextlib
import json
import re

import pytest

import bench_modules
from serving_client import flush

pytestmark = pytest.mark.server


class SharedServers:
    """`serve` for the benches: the session's vanilla server, and one eviction server kept for
    every run that asks for the same settings; so at most two servers are alive."""

    def __init__(self, vanilla):
        self.vanilla = vanilla
        self.evicting = None

    def __call__(self, sargs: list[str]):
        from sglang_evict.server_process import ServerProcess

        if "--evict-policy" not in sargs:
            assert sorted(sargs) == sorted(self.vanilla.sglang_args)
            srv = self.vanilla
        else:
            if self.evicting is None:
                self.evicting = ServerProcess(sargs, startup_timeout=900).__enter__()
            assert sargs == self.evicting.sglang_args
            srv = self.evicting
        flush(srv)
        return contextlib.nullcontext(srv)

    def close(self):
        if self.evicting is not None:
            self.evicting.stop()


@pytest.fixture(scope="module")
def shared(server):
    servers = SharedServers(server)
    yield servers
    servers.close()


def _scored_right(row: dict, n: int) -> None:
    right = [re.search(rf"(?<!\d){a['expected']}(?!\d)", a["reply"]) is not None
             for a in row["answers"]]
    assert row["scored_turns"] == len(row["answers"]) == n
    assert [a["right"] for a in row["answers"]] == right
    assert row["accuracy"] == sum(right) / n
    assert row["accuracy_ci95"][0] <= row["accuracy"] <= row["accuracy_ci95"][1]
    assert row["ttft_p50_s"] <= row["latency_p50_s"]


def _quick_run(bench: str, shared, tmp_path) -> list[dict]:
    """`bench --quick` on the shared servers: its report's rows, once its plot is written."""
    out = tmp_path / f"{bench}.json"
    assert bench_modules.load(bench).main(["--quick", "--out", str(out)], serve=shared) == 0
    assert out.with_suffix(".png").stat().st_size > 10_000
    return json.loads(out.read_text())["servers"]


def test_quick_sweep_scores_every_session_on_both_servers(shared, tmp_path):
    servers = _quick_run("scored_sessions", shared, tmp_path)
    assert [(s["system"], s["pool"], s["budget"]) for s in servers] == [
        ("vanilla", 512, None), ("retention-global M=64", 512, 64)]
    for s in servers:
        # 4 sessions x (2 facts + 2 passages + 1 ask), every one answered, none retracted
        assert (s["requests"], s["failed"], s["retractions"]) == (20, 0, 0), s["name"]
        _scored_right(s, 4)
        assert s["requests_per_s"] > 0 and 0 <= s["prefix_hit_rate"] <= 1
    evicting = servers[1]
    assert "--evict-budget" in evicting["server_args"]
    assert evicting["vanilla_pool_at_same_accuracy"] in (512, None)


def test_quick_sweep_scores_every_question_of_both_phases_on_both_servers(shared, tmp_path):
    rows = _quick_run("scored_context", shared, tmp_path)
    assert [(r["system"], r["pool"], r["budget"], r["phase"]) for r in rows] == [
        ("vanilla", 512, None, "at once"), ("vanilla", 512, None, "in sequence"),
        ("retention-global M=64", 512, 64, "at once"),
        ("retention-global M=64", 512, 64, "in sequence")]
    for r in rows:
        # 2 documents x 3 questions per phase, every one answered, none retracted
        assert (r["requests"], r["failed"], r["retractions"]) == (6, 0, 0), r["name"]
        _scored_right(r, 6)
    # in sequence on the eviction server, a group's later questions find its document cached
    # (compressed, both documents fit): of 3 questions on one document the last two hit it
    assert rows[3]["prefix_hit_rate"] > 0.5
    assert all(0 <= r["prefix_hit_rate"] <= 1 for r in rows)
