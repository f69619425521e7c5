"""bench/scored_context.py --quick on real servers (vanilla and eviction on one pool): every
question of both phases answered and scored from its own reply, the questions of a group served
from its cached document, and the report and its plot written."""

from __future__ import annotations

import json
import re

import pytest

import bench_modules

pytestmark = pytest.mark.server


def test_quick_sweep_scores_every_question_of_both_phases_on_both_servers(tmp_path):
    context = bench_modules.load("scored_context")
    out = tmp_path / "context.json"
    assert context.main(["--quick", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    rows = report["servers"]
    assert [(r["system"], r["pool"], r["budget"], r["phase"]) for r in rows] == [
        ("vanilla", 512, None, "at once"), ("vanilla", 512, None, "in sequence"),
        ("retention-global M=64", 512, 64, "at once"),
        ("retention-global M=64", 512, 64, "in sequence")]
    for r in rows:
        # 2 documents x 3 questions per phase, every one answered, none retracted
        assert (r["requests"], r["failed"], r["retractions"]) == (6, 0, 0), r["name"]
        assert r["scored_turns"] == len(r["answers"]) == 6
        right = [re.search(rf"(?<!\d){a['expected']}(?!\d)", a["reply"]) is not None
                 for a in r["answers"]]
        assert [a["right"] for a in r["answers"]] == right
        assert r["accuracy"] == sum(right) / 6
        assert r["accuracy_ci95"][0] <= r["accuracy"] <= r["accuracy_ci95"][1]
        assert r["ttft_p50_s"] <= r["latency_p50_s"]
    # in sequence on the eviction server, a group's later questions find its document cached
    # (compressed, both documents fit): of 3 questions on one document the last two hit it
    assert rows[3]["prefix_hit_rate"] > 0.5
    assert all(0 <= r["prefix_hit_rate"] <= 1 for r in rows)
    assert out.with_suffix(".png").stat().st_size > 10_000
