"""One sample in eval or training form, and held-out eval sets."""

from __future__ import annotations

import os
from typing import Any

from .fit import Built, fit_filler
from .qa import qa_builder
from .ruler_builders import essay_builder, multiturn_builder, niah_builder, vt_builder
from .ruler_scripts import ruler_scripts
from .splits import check_split, sample_seed
from .tasks import EVAL_SEED, DataError, task_spec


_BUILDERS = {
    "niah": niah_builder,
    "variable_tracking": vt_builder,
    "qa": qa_builder,
    "multiturn_recall": multiturn_builder,
    "essay": essay_builder,
}


# ---------------------------------------------------------------------- public API


def check_length(length: int) -> None:
    """DataError unless `length` is a usable sample length (an integer >= 64 tokens)."""
    if isinstance(length, bool) or not isinstance(length, int) or length < 64:
        raise DataError(f"length must be an integer >= 64 tokens, got {length!r}")


def make_sample(
    task: str,
    length: int,
    *,
    split: str,
    seed: int,
    index: int,
    tokenizer_path: str | os.PathLike[str] | None = None,
    chat: bool = True,
    for_training: bool = False,
) -> dict[str, Any]:
    """One sample, a deterministic function of (task, length, split, seed, index, chat).

    Eval form (for_training=False): `input` is the prompt, fitted so that its tokens plus the
    task's tokens_to_generate are <= length. Training form: also `text` = prompt + answer
    (+ the tokenizer's EOS in chat format), fitted so that `text` has <= length tokens.
    `tokenizer_path`: folder with the model's tokenizer (default: the default model).
    """
    spec = task_spec(task)
    check_split(split)
    check_length(length)
    if spec.kind == "essay" and not for_training:
        raise DataError("task 'essay' is plain training text and has no eval form")
    s = ruler_scripts(tokenizer_path)
    own_seed = sample_seed(split, task, length, seed, index)
    # In chat format the answer turn ends like the template ends turns (SmolLM2: <|im_end|>).
    eos = (s.tokenizer.eos_token or "") if chat else ""

    def training_text(b: Built) -> str:
        if spec.kind == "essay":
            return b.prompt
        return b.prompt.rstrip(" ") + " " + b.answer + eos

    with s.lock:
        s.split = split
        if for_training:
            fits = lambda b: s.count(training_text(b)) <= length  # noqa: E731
        else:
            fits = lambda b: s.count(b.prompt) + spec.tokens_to_generate <= length  # noqa: E731
        # QA picks its question from (seed, index) and skips questions that cannot fit.
        extra = {"base_seed": seed, "index": index, "fits": fits} if spec.kind == "qa" else {}
        build, lo, hi, limit = _BUILDERS[spec.kind](
            s, spec, split, own_seed, length, chat, **extra
        )
        built = fit_filler(build, fits, lo=lo, hi=hi, limit=limit, what=f"{task} at {length} tokens")
        n_tokens = s.count(built.prompt)
    record: dict[str, Any] = {
        "index": index,
        "task": task,
        "length": length,
        "input": built.prompt,
        "outputs": built.outputs,
        "n_tokens": n_tokens,
        "tokens_to_generate": spec.tokens_to_generate,
        "metric": spec.metric,
        "split": split,
        "seed": seed,
        "chat": chat,
        "needles": built.needles,
    }
    if built.question is not None:
        record["question"] = built.question
    if for_training:
        record["text"] = training_text(built)
    return record


def build_eval_set(
    task: str,
    length: int,
    n: int,
    seed: int = EVAL_SEED,
    *,
    tokenizer_path: str | os.PathLike[str] | None = None,
    chat: bool = True,
) -> list[dict[str, Any]]:
    """`n` held-out records of `task` at `length` tokens (prompt + tokens_to_generate), from
    the eval split. Each record: index, task, length, input (the prompt: chat-formatted with
    the model's template, or RULER's raw 'base' form with chat=False; it ends with RULER's
    answer prefix), outputs (expected answers), n_tokens (prompt tokens), tokens_to_generate,
    metric, split, seed, chat, needles; QA records also carry `question`."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise DataError(f"n must be a non-negative integer, got {n!r}")
    return [
        make_sample(
            task, length, split="eval", seed=seed, index=i,
            tokenizer_path=tokenizer_path, chat=chat,
        )
        for i in range(n)
    ]
