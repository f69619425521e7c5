"""The training stream and JSONL records."""

from __future__ import annotations

import json
import os
import random
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from .ruler_scripts import ruler_scripts
from .samples import check_length, make_sample
from .splits import sample_seed
from .tasks import TRAIN_SEED, TRAIN_TASKS, DataError, task_spec


class TrainingData:
    """The training stream: sample i is a deterministic function of (seed, i), so a run
    resumes from a cursor (the next index) with no state beyond the config.

    Each sample picks its task and length from `task_names` and `lengths` with a generator
    seeded by (seed, i) and is built in training form from the train split.
    """

    def __init__(
        self,
        tokenizer_path: str | os.PathLike[str] | None = None,
        task_names: Sequence[str] = TRAIN_TASKS,
        lengths: Sequence[int] = (1024, 2048),
        seed: int = TRAIN_SEED,
        chat: bool = True,
    ) -> None:
        if not task_names:
            raise DataError("no training tasks given")
        for t in task_names:
            task_spec(t)
        if not lengths:
            raise DataError("no training lengths given")
        for length in lengths:
            check_length(length)
        self.tokenizer_path = tokenizer_path
        self.task_names = tuple(task_names)
        self.lengths = tuple(int(x) for x in lengths)
        self.seed = seed
        self.chat = chat

    def check(self) -> None:
        """Build one sample of every (task, length) pair, so a length too short for a task
        fails before training starts rather than mid-run (DataError)."""
        for task in self.task_names:
            for length in self.lengths:
                make_sample(
                    task, length, split="train", seed=self.seed, index=0,
                    tokenizer_path=self.tokenizer_path, chat=self.chat, for_training=True,
                )

    @property
    def tokenizer(self):
        return ruler_scripts(self.tokenizer_path).tokenizer

    def sample(self, index: int) -> dict[str, Any]:
        """Training record `index` plus `input_ids` (the tokens of its `text`) and
        `answer_start` (the index of the answer's first token in input_ids; None for plain
        text)."""
        rng = random.Random(sample_seed("train", "mix", 0, self.seed, index))
        task = self.task_names[rng.randrange(len(self.task_names))]
        length = self.lengths[rng.randrange(len(self.lengths))]
        record = make_sample(
            task, length, split="train", seed=self.seed, index=index,
            tokenizer_path=self.tokenizer_path, chat=self.chat, for_training=True,
        )
        ids = self.tokenizer.encode(record["text"])[:length]
        record["input_ids"] = ids
        record["answer_start"] = None
        if task_spec(task).kind != "essay":
            # The text is the prompt (trailing space dropped) + " " + answer: the prompt's
            # tokens are the text's up to where the two tokenisations first differ.
            prompt = self.tokenizer.encode(record["input"].rstrip(" "))
            start = next((i for i, (a, b) in enumerate(zip(prompt, ids)) if a != b),
                         min(len(prompt), len(ids)))
            record["answer_start"] = start if start < len(ids) else None
        return record


def write_jsonl(records: Iterable[Mapping[str, Any]], path: str | os.PathLike[str]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    return path


def read_jsonl(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]
