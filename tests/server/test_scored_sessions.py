"""bench/scored_sessions.py --quick on real servers (vanilla and eviction on one pool): every
turn of every session is answered, every scored turn is counted and scored from its own reply,
and the report and its plot are written."""

from __future__ import annotations

import json
import re

import pytest

import bench_modules

pytestmark = pytest.mark.server


def test_quick_sweep_scores_every_session_on_both_servers(tmp_path):
    scored = bench_modules.load("scored_sessions")
    out = tmp_path / "scored.json"
    assert scored.main(["--quick", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    servers = report["servers"]
    assert [(s["system"], s["pool"], s["budget"]) for s in servers] == [
        ("vanilla", 512, None), ("retention-global M=64", 512, 64)]
    for s in servers:
        # 4 sessions x (2 facts + 2 passages + 1 ask), every one answered, none retracted
        assert (s["requests"], s["failed"], s["retractions"]) == (20, 0, 0), s["name"]
        assert s["scored_turns"] == len(s["answers"]) == 4
        right = [re.search(rf"(?<!\d){a['expected']}(?!\d)", a["reply"]) is not None
                 for a in s["answers"]]
        assert [a["right"] for a in s["answers"]] == right
        assert s["accuracy"] == sum(right) / 4
        assert s["accuracy_ci95"][0] <= s["accuracy"] <= s["accuracy_ci95"][1]
        assert s["requests_per_s"] > 0 and 0 <= s["prefix_hit_rate"] <= 1
        assert s["ttft_p50_s"] <= s["latency_p50_s"]
    evicting = servers[1]
    assert "--evict-budget" in evicting["server_args"]
    assert evicting["vanilla_pool_at_same_accuracy"] in (512, None)
    assert out.with_suffix(".png").stat().st_size > 10_000
