"""Training / evaluation data built on RULER's generators (sglang_evict.training.data): lengths,
determinism, train/eval separation, RULER's scoring."""

from __future__ import annotations

import re

import pytest

from sglang_evict.training import data as td
from sglang_evict.training.data.qa import qa_corpus
from sglang_evict.training.data.ruler_scripts import ruler_scripts
from sglang_evict.training.data.splits import DATE_HEADER

# Filler comes in units (a word, a noise line, a distractor needle of up to ~50 tokens, a QA
# document), so a sample can fall short of its length by up to one unit.
QA_TASKS = ("qa_1", "qa_2")
# The longest SQuAD paragraph is ~800 tokens (HotpotQA's ~600).
QA_DOC_TOKENS = 820


def _tolerance(length: int, task: str | None = None) -> int:
    if task in QA_TASKS:
        return QA_DOC_TOKENS
    return max(96, length // 20)


@pytest.mark.parametrize("length", [512, 2048])
@pytest.mark.parametrize("task", td.EVAL_TASKS)
def test_eval_sample_has_requested_length(task, length):
    (r,) = td.build_eval_set(task, length, 1)
    budget = length - r["tokens_to_generate"]
    assert r["n_tokens"] <= budget
    assert r["n_tokens"] >= budget - _tolerance(length, task)
    assert r["n_tokens"] == len(ruler_scripts(None).tokenizer.encode(r["input"]))
    assert r["outputs"] and all(isinstance(o, str) and o for o in r["outputs"])
    assert r["task"] == task and r["length"] == length and r["split"] == "eval"
    # The prompt ends with RULER's answer prefix, right after the assistant tag.
    assert "<|im_start|>assistant\n" in r["input"]


@pytest.mark.parametrize("task", ["niah_single_2", "vt", "multiturn_recall", "essay"])
def test_training_text_has_requested_length(task):
    r = td.make_sample(task, 1024, split="train", seed=3, index=7, for_training=True)
    n = len(ruler_scripts(None).tokenizer.encode(r["text"]))
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
    # are variable names; its chain value is the partitioned needle; QA splits questions, not
    # answers such as "yes").
    for split, records in (("eval", eval_records), ("train", train_records)):
        for r in records:
            if r["task"] not in ("vt", "essay", *QA_TASKS):
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
    assert DATE_HEADER.match(parts["train"])
    s = ruler_scripts(None)
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


# ------------------------------------------------------ QA (qa_1: SQuAD, qa_2: HotpotQA)


def _qa_question(r):
    """The corpus entry a QA record asks, and its golden documents."""
    corpus = qa_corpus(td.task_spec(r["task"]).args["dataset"])
    (q,) = {q for q in corpus.questions if q.query == r["question"]}
    return q, [corpus.docs[g] for g in q.golden]


@pytest.mark.parametrize("length", [1024, 2048])
@pytest.mark.parametrize("task", QA_TASKS)
def test_qa_sample_fits_and_holds_question_and_golden_document(task, length):
    (r,) = td.build_eval_set(task, length, 1)
    assert r["n_tokens"] + r["tokens_to_generate"] <= length and r["tokens_to_generate"] == 32
    assert r["n_tokens"] == len(ruler_scripts(None).tokenizer.encode(r["input"]))
    assert f"Question: {r['question']}<|im_end|>" in r["input"]
    assert r["input"].endswith("<|im_start|>assistant\nAnswer:")
    q, golden = _qa_question(r)
    assert r["outputs"] == list(q.outputs)
    numbers = [int(k) for k in re.findall(r"^Document (\d+):$", r["input"], flags=re.M)]
    # Distractors fill the rest: more documents than the golden ones, numbered as in RULER.
    assert numbers == list(range(1, len(numbers) + 1)) and len(numbers) > len(golden)
    assert all(f":\n{doc}" in r["input"] for doc in golden)
    if r["outputs"][0].lower() not in ("yes", "no"):  # HotpotQA comparison answers
        assert any(o.lower() in doc.lower() for doc in golden for o in r["outputs"])
    t = td.make_sample(task, length, split="train", seed=0, index=0, for_training=True)
    n = len(ruler_scripts(None).tokenizer.encode(t["text"]))
    assert length - QA_DOC_TOKENS <= n <= length
    assert t["text"].endswith(" " + t["outputs"][0] + "<|im_end|>")


def test_qa_questions_are_split_disjointly():
    for dataset in ("squad", "hotpotqa"):
        corpus = qa_corpus(dataset)
        train, eval_ = (corpus.split_questions[s] for s in ("train", "eval"))
        assert train and eval_ and not set(train) & set(eval_)
        assert 0.1 < len(eval_) / len(corpus.questions) < 0.3  # ~1 in EVAL_FRACTION
        assert not {corpus.questions[i].query for i in train} & {
            corpus.questions[i].query for i in eval_
        }
        assert all(corpus.eval_golden.isdisjoint(corpus.questions[i].golden) for i in train)
    eval_records = td.build_eval_set("qa_1", 1024, 2) + td.build_eval_set("qa_2", 1024, 2)
    # Same base seed on purpose: the split alone must keep the questions apart.
    train_records = [
        td.make_sample(task, 1024, split="train", seed=td.EVAL_SEED, index=i, for_training=True)
        for task in QA_TASKS
        for i in range(2)
    ]
    td.check_disjoint(train_records, eval_records)
    eval_questions = {r["question"] for r in eval_records}
    assert not eval_questions & {r["question"] for r in train_records}
    # No eval golden document reaches training, not even as a distractor.
    for r in eval_records:
        for doc in _qa_question(r)[1]:
            assert all(doc not in t["text"] for t in train_records)
    # check_disjoint catches an eval question asked in training, by field or in the text.
    leaked = dict(train_records[0], question=eval_records[0]["question"].upper())
    with pytest.raises(AssertionError, match="eval QA question"):
        td.check_disjoint([leaked], eval_records)
    asked = {k: v for k, v in train_records[0].items() if k != "question"}
    asked["text"] += "\nQuestion: " + eval_records[1]["question"]
    with pytest.raises(AssertionError, match="eval QA question"):
        td.check_disjoint([asked], eval_records)


@pytest.mark.parametrize("task", QA_TASKS)
def test_qa_samples_are_deterministic_and_vary_by_index(task):
    a = td.make_sample(task, 1024, split="eval", seed=42, index=0)
    b = td.make_sample(task, 1024, split="eval", seed=42, index=0)
    c = td.make_sample(task, 1024, split="eval", seed=42, index=1)
    assert a == b
    assert a["question"] != c["question"] and a["input"] != c["input"]
    # As in RULER, index i asks the same question at every length.
    assert td.make_sample(task, 2048, split="eval", seed=42, index=0)["question"] == a["question"]


@pytest.mark.parametrize("task", QA_TASKS)
def test_qa_too_short_length_fails_naming_the_task(task):
    with pytest.raises(td.DataError, match=f"{task} at 128 tokens: does not fit"):
        td.make_sample(task, 128, split="eval", seed=0, index=0)


@pytest.mark.parametrize("task", QA_TASKS)
def test_qa_scored_with_rulers_string_match_part(task):
    assert td.tasks()[task].metric == "string_match_part"
    (r,) = td.build_eval_set(task, 1024, 1, seed=7)
    assert td.score_sample(task, f"I think it is {r['outputs'][-1]}.", r["outputs"]) == 1.0
    assert td.score_sample(task, "Zyzzyva quux", r["outputs"]) == 0.0
    # One accepted answer is enough (string_match_all would give 0.5 here).
    assert td.score_sample(task, "in 1066", ["1066", "the year 1066 AD"]) == 1.0
