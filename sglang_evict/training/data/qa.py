"""RULER's QA tasks (qa_1: SQuAD, qa_2: HotpotQA) with a split.

RULER's qa.py reads its corpus and argv at import time and picks distractors from the whole
corpus with no split, so the QA tasks have their own builder with qa.py's documents, prompt
("Document {i}:\n{doc}" blocks in RULER's qa template), answers and distractor order (the
question's related documents first, then random ones). One difference: a HotpotQA question's
golden documents are its supporting-fact paragraphs, and its other eight context paragraphs are
its related distractors (RULER requires all ten, ~1.5K tokens, which leaves no 1K sample); from
ten documents up the sample holds the same documents as RULER's.
"""

from __future__ import annotations

import json
import random
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from .fit import Built
from .ruler_builders import ANSWER_MARK, ruler_template
from .ruler_scripts import RulerScripts
from .splits import normal_question, sample_seed, split_of, text_hash
from .tasks import QA_QUESTION_TRIES, DataError, TaskSpec, ruler_root


@dataclass(frozen=True)
class _Question:
    query: str
    outputs: tuple[str, ...]
    golden: tuple[int, ...]  # corpus documents that answer it
    related: tuple[int, ...]  # distractors taken before random ones (qa.py's "more_context")


@dataclass
class _QACorpus:
    docs: list[str]
    questions: list[_Question]
    split_questions: dict[str, list[int]]  # question indices of each split
    eval_golden: frozenset[int]  # golden documents of eval questions
    orders: dict[tuple[str, str, int], list[int]] = field(default_factory=dict)


# A corpus as read: its documents, its questions, and each question's split key.
_QARead = tuple[list[str], list[_Question], list[str]]


def _read_squad(data: Mapping[str, Any]) -> _QARead:
    """SQuAD v2.0 as qa.py reads it: documents are the distinct paragraphs (sorted), each
    answerable question has its paragraph as golden document, the other paragraphs of its
    article as related ones, and every annotator answer as an accepted output. The split key
    is the paragraph, so all questions on one paragraph land in the same split."""
    docs = sorted({p["context"] for a in data["data"] for p in a["paragraphs"]})
    where = {d: i for i, d in enumerate(docs)}
    questions: list[_Question] = []
    keys: list[str] = []
    for article in data["data"]:
        own_docs = list(dict.fromkeys(where[p["context"]] for p in article["paragraphs"]))
        for paragraph in article["paragraphs"]:
            golden = where[paragraph["context"]]
            related = tuple(i for i in own_docs if i != golden)
            for qa in paragraph["qas"]:
                answers = tuple(a["text"] for a in qa["answers"])
                # v2.0's unanswerable questions have nothing to score against.
                if qa.get("is_impossible") or not answers:
                    continue
                questions.append(_Question(qa["question"], answers, (golden,), related))
                keys.append(paragraph["context"])
    return docs, questions, keys


def _hotpot_doc(title: str, sentences: Sequence[str]) -> str:
    return f"{title}\n{''.join(sentences)}"  # qa.py's document text: title line, then body


def _read_hotpotqa(data: Sequence[Mapping[str, Any]]) -> _QARead:
    """HotpotQA (dev, distractor setting) with qa.py's documents (distinct "title\\nparagraph",
    sorted). Golden: the paragraphs of the supporting facts; related: the rest of the
    question's ten context paragraphs (HotpotQA's own hard distractors). Split key: the
    question text."""
    docs = sorted({_hotpot_doc(t, s) for item in data for t, s in item["context"]})
    where = {d: i for i, d in enumerate(docs)}
    questions: list[_Question] = []
    keys: list[str] = []
    for item in data:
        support = {title for title, _ in item["supporting_facts"]}
        context = [(t, where[_hotpot_doc(t, s)]) for t, s in item["context"]]
        golden = tuple(dict.fromkeys(i for t, i in context if t in support))
        golden = golden or tuple(dict.fromkeys(i for _, i in context))
        related = tuple(i for i in dict.fromkeys(i for _, i in context) if i not in golden)
        questions.append(_Question(item["question"], (item["answer"],), golden, related))
        keys.append(item["question"])
    return docs, questions, keys


_QA_DATASETS: dict[str, tuple[str, Callable[[Any], _QARead]]] = {
    "squad": ("squad.json", _read_squad),
    "hotpotqa": ("hotpotqa.json", _read_hotpotqa),
}
_QA_CORPORA: dict[str, _QACorpus] = {}
_QA_LOCK = threading.Lock()


def split_questions(
    questions: list[_Question], keys: list[str]
) -> tuple[dict[str, list[int]], frozenset[int]]:
    """Question indices per split, and the eval questions' golden documents.

    Eval: the questions whose key hashes to eval (`split_of`). Train: the others, minus any
    that would put eval material in training as a question or golden document: a shared golden
    document (HotpotQA paragraphs recur across questions), the same question up to case,
    spacing and a final "?", or a question that starts with an eval question's text (check_disjoint looks for
    "Question: <eval question>" in training text).
    """
    eval_ids = [i for i, k in enumerate(keys) if split_of(k) == "eval"]
    eval_golden = frozenset(g for i in eval_ids for g in questions[i].golden)
    eval_texts = {questions[i].query.strip() for i in eval_ids}
    eval_normal = {normal_question(questions[i].query) for i in eval_ids}
    eval_set = set(eval_ids)

    def leaks(q: _Question) -> bool:
        text = q.query.strip()
        return (
            not eval_golden.isdisjoint(q.golden)
            or normal_question(text) in eval_normal
            or any(text[:k] in eval_texts for k in range(1, len(text) + 1))
        )

    train_ids = [i for i in range(len(questions)) if i not in eval_set and not leaks(questions[i])]
    return {"train": train_ids, "eval": eval_ids}, eval_golden


def qa_corpus(dataset: str) -> _QACorpus:
    """The QA corpus RULER ships for `dataset` ("squad" | "hotpotqa"), parsed and split once
    per process (hotpotqa.json is 46 MB)."""
    if dataset not in _QA_DATASETS:
        raise DataError(f"unknown QA dataset {dataset!r}; known: {', '.join(_QA_DATASETS)}")
    with _QA_LOCK:
        if dataset not in _QA_CORPORA:
            filename, read = _QA_DATASETS[dataset]
            path = ruler_root() / "data" / "synthetic" / "json" / filename
            if not path.is_file():
                raise DataError(f"RULER's {dataset} corpus {path} is missing")
            docs, questions, keys = read(json.loads(path.read_text()))
            splits, eval_golden = split_questions(questions, keys)
            _QA_CORPORA[dataset] = _QACorpus(docs, questions, splits, eval_golden)
        return _QA_CORPORA[dataset]


def _question_order(corpus: _QACorpus, task: str, split: str, seed: int) -> list[int]:
    """A fixed permutation of the split's questions for (task, split, seed). Sample `index`
    asks question `index` of it, as RULER's sample i asks question i: distinct questions for
    distinct indices, and the same question at every length."""
    key = (task, split, seed)
    if key not in corpus.orders:
        if len(corpus.orders) >= 32:  # a few seeds are in use at a time; bound the cache
            corpus.orders.clear()
        order = list(corpus.split_questions[split])
        random.Random(sample_seed(split, task, 0, seed, -1)).shuffle(order)
        corpus.orders[key] = order
    return corpus.orders[key]


def _qa_question(
    s: RulerScripts, corpus: _QACorpus, qi: int, split: str, seed: int, chat: bool
) -> tuple[Callable[[int], Built], int, int]:
    """build(n) with question `qi` and n documents in all (its golden ones + n - golden
    distractors), and the range of n."""
    q = corpus.questions[qi]
    docs = corpus.docs
    template, prefix = ruler_template("qa")
    template = template + ANSWER_MARK + prefix
    # A train sample never shows an eval question's golden document, not even as a distractor.
    barred = set(q.golden) | (set(corpus.eval_golden) if split == "train" else set())
    rng = random.Random(f"{seed}|{qi}")
    # RULER takes a random subset of the related documents first; a shuffled list gives the
    # same distribution and makes the documents of n a prefix of those of n + 1.
    order = [i for i in q.related if i not in barred]
    rng.shuffle(order)
    taken = barred | set(order)
    available = len(docs) - len(barred)

    def distractors(k: int) -> list[int]:
        # Random further documents, drawn lazily in a fixed sequence (HotpotQA has 66K).
        while len(order) < k and len(taken) < len(docs):
            i = rng.randrange(len(docs))
            if i not in taken:
                taken.add(i)
                order.append(i)
        return order[:k]

    needles = [q.query] + [f"doc:{text_hash(docs[g])[:16]}" for g in q.golden]

    def build(n: int) -> Built:
        chosen = list(q.golden) + distractors(n - len(q.golden))
        # As RULER does, the golden documents land at a random place among the others.
        random.Random(seed + n).shuffle(chosen)
        context = "\n\n".join(f"Document {k}:\n{docs[i]}" for k, i in enumerate(chosen, 1))
        user, answer_prefix = template.format(context=context, query=q.query).rsplit(ANSWER_MARK, 1)
        return Built(
            s.format_prompt(user, answer_prefix, chat),
            list(q.outputs),
            list(needles),
            q.outputs[0],
            question=q.query,
        )

    return build, len(q.golden), len(q.golden) + available


def qa_builder(
    s: RulerScripts,
    spec: TaskSpec,
    split: str,
    seed: int,
    length: int,
    chat: bool,
    *,
    base_seed: int,
    index: int,
    fits: Callable[[Built], bool],
):
    corpus = qa_corpus(str(spec.args["dataset"]))
    order = _question_order(corpus, spec.name, split, base_seed)
    if not order:
        raise DataError(f"{spec.name}: the {split} split has no questions")
    rng = random.Random(seed)
    candidates = [order[index % len(order)]]
    candidates += [order[rng.randrange(len(order))] for _ in range(QA_QUESTION_TRIES - 1)]
    for qi in candidates:
        build, least, limit = _qa_question(s, corpus, qi, split, seed, chat)
        if fits(build(least)):
            return build, least, least + 4, limit
    raise DataError(
        f"{spec.name} at {length} tokens: does not fit even with the least filler (the golden "
        f"documents alone of {len(candidates)} questions tried); use a longer length"
    )
