"""bench/scored_sessions.py without a server: the sessions it builds from the held-out split,
how it scores a reply, and the vanilla pool it matches an eviction point's accuracy to."""

from __future__ import annotations

import re

import pytest

import bench_modules


@pytest.fixture(scope="module")
def scored():
    return bench_modules.load("scored_sessions")


def test_every_scored_turn_asks_a_fact_its_session_planted_earlier(scored):
    sessions = scored.build_sessions(3, facts=3, passages=2, words=40, asks=2, seed=0)
    assert sessions == scored.build_sessions(3, facts=3, passages=2, words=40, asks=2, seed=0)
    for s in sessions:
        assert len(s["turns"]) == 3 + 2 + 2
        planted = dict(re.findall(r"the secret code for the (\S+) is (\d{7})\.", " ".join(
            s["turns"][:3])))
        assert len(planted) == 3
        assert sorted(s["scored"]) == [5, 6]  # the last two turns, after the passages
        asked = [re.search(r"secret code for the (\S+)\?", s["turns"][t]).group(1)
                 for t in sorted(s["scored"])]
        assert len(set(asked)) == 2
        assert [planted[k] for k in asked] == [s["scored"][t] for t in sorted(s["scored"])]
        for t in (3, 4):  # passages of essay text, no digits of a fact
            assert s["turns"][t].startswith("Here is a passage") and len(s["turns"][t]) > 100
            assert not any(v in s["turns"][t] for v in planted.values())
    # the sessions differ from each other
    assert len({s["turns"][0] for s in sessions}) == 3


def test_a_reply_is_right_when_it_states_the_digits_as_a_number(scored):
    assert scored.is_right("The secret code for the open-reject is 3511528.", "3511528")
    assert scored.is_right("3511528", "3511528")
    assert not scored.is_right("The secret code is 35115", "3511528")  # cut short
    assert not scored.is_right("It is 135115280.", "3511528")  # inside a longer number


def test_each_eviction_point_is_matched_to_the_smallest_vanilla_pool_as_accurate(scored):
    rows = [{"pool": p, "budget": None, "accuracy": a, "requests_per_s": 1.0}
            for p, a in ((512, 0.2), (1024, 0.5), (2048, 0.8))]
    rows += [{"pool": 512, "budget": 64, "accuracy": 0.5, "requests_per_s": 3.0},
             {"pool": 512, "budget": 128, "accuracy": 0.9, "requests_per_s": 2.0}]
    scored.matched_vanilla(rows)
    assert rows[3]["vanilla_pool_at_same_accuracy"] == 1024
    assert rows[3]["memory_share_of_that_pool"] == 0.5
    assert rows[3]["requests_per_s_over_that_pool"] == 3.0
    assert rows[4]["vanilla_pool_at_same_accuracy"] is None  # no vanilla pool reaches 0.9
