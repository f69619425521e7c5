"""Training / evaluation data built on RULER's generators (sglang_evict.train_data): lengths,
determinism, train/eval separation, RULER's scoring."""

from __future__ import annotations

import pytest

from sglang_evict import train_data as td

# Filler comes in units (a word, a noise line, a distractor needle of up to ~50 tokens), so a
# sample can fall short of its length by up to one unit.
def _tolerance(length: int) -> int:
    return max(96, length // 20)


@pytest.mark.parametrize("length", [512, 2048])
@pytest.mark.parametrize("task", td.EVAL_TASKS)
def test_eval_sample_has_requested_length(task, length):
    (r,) = td.build_eval_set(task, length, 1)
    budget = length - r["tokens_to_generate"]
    assert r["n_tokens"] <= budget
    assert r["n_tokens"] >= budget - _tolerance(length)
    assert r["n_tokens"] == len(td._scripts(None).tokenizer.encode(r["input"]))
    assert r["outputs"] and all(isinstance(o, str) and o for o in r["outputs"])
    assert r["task"] == task and r["length"] == length and r["split"] == "eval"
    # The prompt ends with RULER's answer prefix, right after the assistant tag.
    assert "<|im_start|>assistant\n" in r["input"]


@pytest.mark.parametrize("task", ["niah_single_2", "vt", "multiturn_recall", "essay"])
def test_training_text_has_requested_length(task):
    r = td.make_sample(task, 1024, split="train", seed=3, index=7, for_training=True)
    n = len(td._scripts(None).tokenizer.encode(r["text"]))
    assert 1024 - _tolerance(1024) <= n <= 1024
    if task != "essay":
        # The answer follows the prompt, so the loss sees the model produce it.
        assert r["text"].startswith(r["input"].rstrip(" "))
        assert all(o in r["text"][len(r["input"]) - 1 :] for o in r["outputs"])


def test_samples_are_deterministic_and_vary_by_index():
    a = td.make_sample("niah_multikey_1", 1024, split="eval", seed=42, index=0)
    b = td.make_sample("niah_multikey_1", 1024, split="eval", seed=42, index=0)
    c = td.make_sample("niah_multikey_1", 1024, split="eval", seed=42, index=1)
    assert a == b
    assert a["input"] != c["input"] and a["outputs"] != c["outputs"]


def test_ruler_base_form_without_chat():
    (r,) = td.build_eval_set("niah_single_2", 1024, 1, chat=False)
    assert r["input"].startswith("A special magic number is hidden within the following text.")
    assert r["input"].endswith("The special magic number for " + r["input"].split(
        "What is the special magic number for ")[1].split(" mentioned")[0]
        + " mentioned in the provided text is")
    assert "<|im_start|>" not in r["input"]
    t = td.make_sample("niah_single_2", 1024, split="train", seed=0, index=0, chat=False,
                       for_training=True)
    assert "<|im_start|>" not in t["text"] and "<|im_end|>" not in t["text"]


def test_train_and_eval_sets_are_disjoint():
    eval_records = [
        r
        for task in ("niah_single_2", "niah_multikey_2", "niah_multiquery", "vt", "multiturn_recall")
        for r in td.build_eval_set(task, 1024, 3)
    ]
    # Same base seed on purpose: the split alone must keep samples apart.
    stream = td.TrainingData(lengths=[1024], seed=td.EVAL_SEED)
    train_records = [stream.sample(i) for i in range(12)]
    td.check_disjoint(train_records, eval_records)
    # Needle values are drawn from each split's own part of the value space (VT's answers
    # are variable names; its chain value is the partitioned needle).
    for split, records in (("eval", eval_records), ("train", train_records)):
        for r in records:
            if r["task"] not in ("vt", "essay"):
                assert all(td.split_of(o) == split for o in r["outputs"])


def test_check_disjoint_catches_shared_text_and_needles():
    eval_records = td.build_eval_set("niah_single_2", 512, 2)
    train = [td.make_sample("niah_single_2", 512, split="train", seed=0, index=i) for i in range(2)]
    td.check_disjoint(train, eval_records)
    leaked_text = dict(eval_records[0], split="train")
    with pytest.raises(AssertionError, match="sample text"):
        td.check_disjoint(train + [leaked_text], eval_records)
    leaked_needle = dict(train[0], needles=train[0]["needles"] + [eval_records[1]["outputs"][0]])
    with pytest.raises(AssertionError, match="needle"):
        td.check_disjoint([leaked_needle], eval_records)
    with pytest.raises(AssertionError, match="labelled"):
        td.check_disjoint([eval_records[0]], [])


def test_essay_and_key_partitions_are_disjoint():
    parts = td.essay_split_text()
    eval_words = set(parts["eval"].split())
    assert 0.1 < len(parts["eval"]) / (len(parts["eval"]) + len(parts["train"])) < 0.3
    # The cut is at an essay header, so the eval part ends where an essay ends.
    assert td._DATE_HEADER.match(parts["train"])
    s = td._scripts(None)
    train_nouns, eval_nouns = set(s.keys("train").nouns), set(s.keys("eval").nouns)
    assert train_nouns and eval_nouns and not train_nouns & eval_nouns
    # An eval haystack is a window of the eval essays.
    (r,) = td.build_eval_set("niah_single_2", 512, 1, chat=False)
    body = r["input"].split("afterwards.\n", 1)[1].rsplit("\nWhat is", 1)[0]
    words = [w for w in body.split() if w not in r["input"].split("magic number for ")[1]]
    assert sum(w in eval_words for w in words) / len(words) > 0.95


@pytest.mark.parametrize("task", td.EVAL_TASKS)
def test_scorer_on_expected_and_wrong_answers(task):
    (r,) = td.build_eval_set(task, 512, 1, seed=5)
    right = " ".join(r["outputs"])
    assert td.score_sample(task, right, r["outputs"]) == 1.0
    assert td.score_sample(task, "  " + right.upper() + "\n", r["outputs"]) == 1.0
    assert td.score_sample(task, "I do not know.", r["outputs"]) == 0.0
    assert td.score_sample(task, None, r["outputs"]) == 0.0
    assert td.score(task, [right, "no"], [r["outputs"], r["outputs"]]) == 0.5


def test_scorer_uses_rulers_metrics():
    refs = ["1111111", "2222222", "3333333", "4444444"]
    # string_match_all: the share of expected answers present.
    assert td.score_sample("niah_multivalue", "1111111 and 3333333", refs) == 0.5
    assert td.tasks()["niah_multivalue"].metric == "string_match_all"
    assert td.tasks()["vt"].metric == "string_match_all"


def test_bad_requests_fail_clearly():
    with pytest.raises(td.DataError, match="unknown task"):
        td.build_eval_set("no_such_task", 1024, 1)
    with pytest.raises(td.DataError, match="does not fit"):
        td.make_sample("multiturn_recall", 128, split="eval", seed=0, index=0)
    with pytest.raises(td.DataError, match="length"):
        td.build_eval_set("vt", 10, 1)
    with pytest.raises(td.DataError, match="no eval form"):
        td.build_eval_set("essay", 1024, 1)
    with pytest.raises(td.DataError, match="split"):
        td.make_sample("vt", 1024, split="test", seed=0, index=0)
