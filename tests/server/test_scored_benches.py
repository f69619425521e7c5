"""bench/scored_sessions.py and bench/scored_context.py --quick on real servers (vanilla and
eviction on one 512-token pool): every turn answered, every scored turn counted and scored from
its own reply, the report and its plot written. Both benches sweep the same two servers, so
they share them (bench/scored.py's `sweep_together`: on each server one bench after the other,
each from an empty cache); the servers come from the worker's lane (vanilla's settings are the
quick sweeps' vanilla ones)."""

from __future__ import annotations

import contextlib
import json
import re

import pytest

import bench_modules
from serving_client import flush

pytestmark = pytest.mark.server


class LaneServe:
    """`serve` for the benches: the lane's vanilla server, or an eviction server held while
    the bench runs on it (one server up at a time)."""

    def __init__(self, servers):
        self.servers = servers

    @contextlib.contextmanager
    def __call__(self, sargs: list[str]):
        from lane_servers import VANILLA_ARGS

        if "--evict-policy" not in sargs:
            assert sorted(sargs) == sorted(VANILLA_ARGS)
            srv = self.servers.vanilla()
            flush(srv)
            yield srv
        else:
            with self.servers.held(sargs) as srv:
                flush(srv)
                yield srv


def _scored_right(row: dict, n: int) -> None:
    right = [re.search(rf"(?<!\d){a['expected']}(?!\d)", a["reply"]) is not None
             for a in row["answers"]]
    assert row["scored_turns"] == len(row["answers"]) == n
    assert [a["right"] for a in row["answers"]] == right
    assert row["accuracy"] == sum(right) / n
    assert row["accuracy_ci95"][0] <= row["accuracy"] <= row["accuracy_ci95"][1]
    assert row["ttft_p50_s"] <= row["latency_p50_s"]


BENCHES = ("scored_sessions", "scored_context")


@pytest.fixture(scope="module")
def quick_reports(servers, tmp_path_factory) -> dict[str, list[dict]]:
    """`--quick` of both benches on one sweep of servers: each report's rows, once its plot is
    written."""
    out = tmp_path_factory.mktemp("scored")
    modules = {name: bench_modules.load(name) for name in BENCHES}
    sweeps = [modules[name].build(["--quick", "--out", str(out / f"{name}.json")])
              for name in BENCHES]
    modules[BENCHES[0]].scored.sweep_together(sweeps, serve=LaneServe(servers))
    reports = {}
    for name in BENCHES:
        assert (out / f"{name}.png").stat().st_size > 10_000
        reports[name] = json.loads((out / f"{name}.json").read_text())["servers"]
    return reports


def test_quick_sweep_scores_every_session_on_both_servers(quick_reports):
    rows = quick_reports["scored_sessions"]
    assert [(s["system"], s["pool"], s["budget"]) for s in rows] == [
        ("vanilla", 512, None), ("retention-global M=64", 512, 64)]
    for s in rows:
        # 4 sessions x (2 facts + 2 passages + 1 ask), every one answered, none retracted
        assert (s["requests"], s["failed"], s["retractions"]) == (20, 0, 0), s["name"]
        _scored_right(s, 4)
        assert s["requests_per_s"] > 0 and 0 <= s["prefix_hit_rate"] <= 1
    evicting = rows[1]
    assert "--evict-budget" in evicting["server_args"]
    assert evicting["vanilla_pool_at_same_accuracy"] in (512, None)


def test_quick_sweep_scores_every_question_of_both_phases_on_both_servers(quick_reports):
    rows = quick_reports["scored_context"]
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
