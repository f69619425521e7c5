"""Train/eval separation: which split a needle and an essay belong to, per-sample seeds, and
`check_disjoint`, which asserts the separation on built records."""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from .tasks import SPLITS, DataError, ruler_root


# One in EVAL_FRACTION of the needle space belongs to the eval split.
EVAL_FRACTION = 5


def split_of(value: str) -> str:
    """The split a needle (key, value, uuid, ...) belongs to: a fixed hash of its text, so a
    value drawn for training can never be drawn for evaluation."""
    digest = hashlib.blake2b(str(value).encode(), digest_size=8).digest()
    return "eval" if int.from_bytes(digest, "little") % EVAL_FRACTION == 0 else "train"


def check_split(split: str) -> None:
    if split not in SPLITS:
        raise DataError(f"split must be one of {SPLITS}, got {split!r}")


def sample_seed(split: str, task: str, length: int, seed: int, index: int) -> int:
    # The split is part of the key: equal base seeds still give different samples per split.
    key = f"{split}|{task}|{length}|{seed}|{index}".encode()
    return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little")


DATE_HEADER = re.compile(
    r"(January|February|March|April|May|June|July|August|September|October|November|December)"
    r" (19|20)\d\d(?=[A-Z\"(])"
)


def essay_split_text() -> dict[str, str]:
    """The essay corpus cut at one essay boundary: {"eval": first essays, "train": the rest}.

    The corpus is one concatenated string; most essays open with a "Month Year" header glued
    to their first word. The cut is the last such header within the first quarter, so eval
    gets about a fifth of the corpus (~100K words) and no essay is split between the two.
    """
    path = ruler_root() / "data" / "synthetic" / "json" / "PaulGrahamEssays.json"
    text = json.loads(path.read_text())["text"]
    cuts = [m.start() for m in DATE_HEADER.finditer(text) if 0 < m.start() <= len(text) // 4]
    if not cuts:
        raise DataError(f"no essay boundary found in the first quarter of {path}")
    return {"eval": text[: cuts[-1]], "train": text[cuts[-1] :]}


class PairWords(Sequence):
    """RULER's niah keys are every "adjective-noun" pair of wonderwords' lists (~6M strings,
    ~10 s to build). This indexes the same pairs lazily, restricted to nouns of one split,
    so keys of the two splits never coincide."""

    def __init__(self, adjectives: list[str], nouns: list[str]) -> None:
        self.adjectives = adjectives
        self.nouns = nouns

    def __len__(self) -> int:
        return len(self.adjectives) * len(self.nouns)

    def __getitem__(self, i):  # random.choice only needs int indices
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(i)
        a, n = divmod(i, len(self.nouns))
        return f"{self.adjectives[a]}-{self.nouns[n]}"


def normal_question(text: str) -> str:
    return " ".join(text.lower().split()).rstrip("?").strip()


def text_hash(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def check_disjoint(
    train_records: Iterable[Mapping[str, Any]], eval_records: Iterable[Mapping[str, Any]]
) -> None:
    """AssertionError unless the two sets share no sample text (by sha256 of `input` and of
    `text`) and no needle, no eval QA question is asked in a training record (same `question`
    up to case, spacing and a final "?", or "Question: <eval question>" in its text), and each record
    carries its own split label."""
    train_records, eval_records = list(train_records), list(eval_records)
    problems: list[str] = []
    for name, records in (("train", train_records), ("eval", eval_records)):
        wrong = [r.get("index") for r in records if r.get("split", name) != name]
        if wrong:
            problems.append(f"{len(wrong)} {name} record(s) labelled with another split")

    def hashes(records):
        out = set()
        for r in records:
            for key in ("input", "text"):
                if r.get(key):
                    out.add(text_hash(r[key]))
        return out

    shared_text = hashes(train_records) & hashes(eval_records)
    if shared_text:
        problems.append(f"{len(shared_text)} sample text(s) in both sets")
    needles = lambda rs: {str(x) for r in rs for x in r.get("needles", ())}  # noqa: E731
    shared_needles = needles(train_records) & needles(eval_records)
    if shared_needles:
        shown = ", ".join(sorted(shared_needles)[:5])
        problems.append(f"{len(shared_needles)} needle(s) in both sets (e.g. {shown})")
    eval_questions = {r["question"] for r in eval_records if r.get("question")}
    if eval_questions:
        normal = {normal_question(q): q for q in eval_questions}
        asked: set[str] = set()
        for r in train_records:
            if r.get("question") and normal_question(r["question"]) in normal:
                asked.add(normal[normal_question(r["question"])])
            # The text check also covers records whose `question` field was dropped.
            texts = [r[key] for key in ("input", "text") if r.get(key)]
            asked.update(q for q in eval_questions if any(f"Question: {q}" in x for x in texts))
        if asked:
            shown = "; ".join(sorted(asked)[:3])
            problems.append(f"{len(asked)} eval QA question(s) in training records (e.g. {shown})")
    if problems:
        raise AssertionError("train/eval overlap: " + "; ".join(problems))
