"""The scored serving benches without a server: the sessions and shared-context groups they
build from the held-out split, how a reply is scored, and the vanilla pool an eviction point's
accuracy is matched to (bench/scored_sessions.py, bench/scored_context.py, bench/scored.py)."""

from __future__ import annotations

import re

import pytest

import bench_modules


@pytest.fixture(scope="module")
def sessions():
    return bench_modules.load("scored_sessions")


@pytest.fixture(scope="module")
def scored():
    return bench_modules.load("scored")


@pytest.fixture(scope="module")
def context():
    return bench_modules.load("scored_context")


def test_every_scored_turn_asks_a_fact_its_session_planted_earlier(sessions):
    built = sessions.build_sessions(3, facts=3, passages=2, words=40, asks=2, seed=0)
    assert built == sessions.build_sessions(3, facts=3, passages=2, words=40, asks=2, seed=0)
    for s in built:
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
    assert len({s["turns"][0] for s in built}) == 3


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


def test_matching_compares_an_eviction_point_with_vanilla_in_the_same_phase_only(scored):
    rows = [{"pool": 512, "budget": None, "accuracy": 0.9, "requests_per_s": 1.0,
             "phase": "at once"},
            {"pool": 512, "budget": None, "accuracy": 0.1, "requests_per_s": 1.0,
             "phase": "in sequence"},
            {"pool": 512, "budget": 64, "accuracy": 0.5, "requests_per_s": 2.0,
             "phase": "in sequence"}]
    scored.matched_vanilla(rows)
    assert rows[2]["vanilla_pool_at_same_accuracy"] is None


def test_every_question_of_a_group_asks_a_needle_of_its_own_document(context):
    groups = context.build_groups(3, needles=4, words=200, seed=0)
    assert groups == context.build_groups(3, needles=4, words=200, seed=0)
    # another range of groups: other documents (the two phases never share one)
    later = context.build_groups(3, needles=4, words=200, seed=0, first=3)
    assert not {g["document"] for g in groups} & {g["document"] for g in later}
    for g in groups:
        planted = dict(re.findall(r"One of the special magic numbers for (\S+) is: (\d{7})\.",
                                  g["document"]))
        assert len(planted) == 4
        assert sorted(q["key"] for q in g["questions"]) == sorted(planted)
        assert all(planted[q["key"]] == q["expected"] for q in g["questions"])
        # the needles sit between the essay's sentences, the essay's words all kept
        essay = re.sub(r"One of the special magic numbers for \S+ is: \d{7}\. ?", "",
                       g["document"])
        assert len(essay.split()) == 200
        # every question's prompt starts with the same document: the radix cache shares it
        prompts = [context.prompt(g, q)[0]["content"] for q in g["questions"]]
        head = prompts[0][: prompts[0].index("What is the special magic number")]
        assert head.endswith(g["document"] + "\n\n")
        assert all(p.startswith(head) and p != prompts[0] for p in prompts[1:])


def test_at_once_runs_every_question_together_and_in_sequence_one_job_per_group(
        context, monkeypatch):
    groups = context.build_groups(2, needles=3, words=100, seed=0)
    asked = []

    def ask(url, tokenizer, messages, max_new_tokens, expected):
        asked.append((messages[0]["content"], expected))
        return {"expected": expected}

    monkeypatch.setattr(context.scored, "ask", ask)
    now = context.jobs(groups, "at once", None, 16)
    assert len(now) == 6 and all(len(job("url")) == 1 for job in now)
    seq = context.jobs(groups, "in sequence", None, 16)
    assert len(seq) == 2
    assert [t["expected"] for t in seq[0]("url")] == [q["expected"]
                                                     for q in groups[0]["questions"]]
    # each question once at once, the first group's again in sequence, each with its document
    assert len(asked) == 9
    for content, expected in asked:
        g = next(g for g in groups if expected in [q["expected"] for q in g["questions"]])
        assert g["document"] in content
