"""RULER's scoring (long_context_eval/eval/synthetic/constants.py) of predictions."""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence

from .tasks import DataError, task_spec


def postprocess_prediction(prediction: str | None) -> str:
    """RULER's evaluate.postprocess_pred: strip, control characters to newlines."""
    if prediction is None:
        return ""
    return re.sub(r"[\x00-\x1f]", "\n", prediction.strip()).strip()


def _metric(task: str) -> Callable[[list[str], list[list[str]]], list[float]]:
    from long_context_eval.eval.synthetic import constants

    spec = task_spec(task)
    if spec.metric is None:
        raise DataError(f"task {task!r} is not scored")
    return getattr(constants, spec.metric + "_per_sample")


def score_sample(task: str, prediction: str | None, outputs: Sequence[str]) -> float:
    """RULER's per-sample score of one prediction, in [0, 1] (RULER reports x100):
    string_match_all = share of expected answers found in the prediction (case-insensitive),
    string_match_part = 1 if any is found."""
    if not outputs:
        raise DataError("outputs (the expected answers) must not be empty")
    return _metric(task)([postprocess_prediction(prediction)], [list(outputs)])[0] / 100.0


def score(
    task: str, predictions: Sequence[str | None], references: Sequence[Sequence[str]]
) -> float:
    """Mean RULER score of `predictions` against `references` (each a list of expected
    answers), in [0, 1]."""
    if len(predictions) != len(references):
        raise DataError(
            f"{len(predictions)} predictions for {len(references)} references"
        )
    if not predictions:
        raise DataError("nothing to score")
    return sum(score_sample(task, p, r) for p, r in zip(predictions, references)) / len(
        predictions
    )
