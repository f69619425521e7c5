"""Scored shared context (SCBench's multi-request setting) with the radix cache on: one long
document per group, many different questions about it, how many a server answers and how many
right, measured on one serving run.

Each group's document is an essay window of the held-out split (W words) with N needles at
random sentence ends ("One of the special magic numbers for <key> is: <7 digits>.", RULER's
needle); each of its N questions asks one key back, the document first, so every question of a
group shares the document as its prefix. A reply is right when it states the needle's digits.

Every server runs two phases on different documents: "at once" sends every question of its
groups together (prefill of one shared prefix under concurrency), "in sequence" asks each
group's questions one after the other, the groups side by side (the cached document reused,
compressed where eviction is on). A sweep runs vanilla SGLang at each pool and sglang-evict at
the same pools and each budget, one server after the other; the figures, plots and matched
vanilla pool are bench/scored_sessions.py's, per phase.

    .venv/bin/python bench/scored_context.py --out bench/results/scored_context.json
    .venv/bin/python bench/scored_context.py --quick --out /tmp/scored_context_quick.json
"""

from __future__ import annotations

import argparse
import random

import scored

NEEDLE = "One of the special magic numbers for {key} is: {value}."
INTRO = ("Some special magic numbers are hidden within the following text. Make sure to "
         "memorize it. I will quiz you about the numbers afterwards.")
QUESTION = ("What is the special magic number for {key} mentioned in the provided text? "
            "Answer with the number only.")
PHASES = ("at once", "in sequence")


def build_groups(n: int, needles: int, words: int, seed: int, first: int = 0) -> list[dict]:
    """Groups `first`..`first + n - 1` of the eval split: each a document with `needles`
    needles and, per needle, its question and the digits the reply must state."""
    from sglang_evict.training.data.ruler_builders import essay_window
    from sglang_evict.training.data.ruler_scripts import ruler_scripts
    from sglang_evict.training.data.splits import sample_seed

    s = ruler_scripts(None)
    out = []
    with s.lock:
        s.split = "eval"
        key_space = s.keys("eval")
        for i in range(first, first + n):
            rng = random.Random(sample_seed("eval", "scored_context", words, seed, i))
            keys, values = scored.draw_secrets(rng, key_space, needles)
            text = list(essay_window(s, "eval", rng, words))
            ends = [j + 1 for j, w in enumerate(text) if w.endswith((".", "?", "!"))]
            ends = ends or list(range(1, len(text) + 1))
            at = sorted(rng.sample(ends, needles) if len(ends) >= needles
                        else [rng.choice(ends) for _ in keys])
            # from the back, so earlier insertion points keep their index
            for j, (k, v) in sorted(zip(at, zip(keys, values)), reverse=True):
                text.insert(j, NEEDLE.format(key=k, value=v))
            document = " ".join(text)
            order = rng.sample(range(needles), needles)
            out.append({"index": i, "document": document,
                        "questions": [{"key": keys[q], "expected": values[q]} for q in order]})
    return out


def prompt(group: dict, question: dict) -> list[dict]:
    return [{"role": "user", "content": f"{INTRO}\n\n{group['document']}\n\n"
                                        f"{QUESTION.format(key=question['key'])}"}]


def jobs(groups: list[dict], phase: str, tokenizer, answer_tokens: int) -> list[scored.Job]:
    """At once: one job per question. In sequence: one job per group, its questions in turn."""
    def one(url, g, q):
        return [scored.ask(url, tokenizer, prompt(g, q), answer_tokens, q["expected"])]

    if phase == "at once":
        return [lambda url, g=g, q=q: one(url, g, q) for g in groups for q in g["questions"]]
    return [lambda url, g=g: [t for q in g["questions"] for t in one(url, g, q)] for g in groups]


def build(argv=None) -> scored.Bench:
    """The bench's sweep from its command line."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--groups", type=int, default=4, help="documents per phase")
    p.add_argument("--needles", type=int, default=6, help="needles, and questions, per document")
    p.add_argument("--words", type=int, default=600, help="essay words per document")
    p.add_argument("--answer-tokens", type=int, default=24)
    scored.add_sweep_args(p, pools=[1024, 2048, 8192], budgets=[128])
    p.add_argument("--quick", action="store_true",
                   help="2 documents of 200 words, 3 questions each, per phase; one vanilla and "
                        "one eviction server (< 5 min)")
    p.add_argument("--out", default="bench/results/scored_context.json")
    args = p.parse_args(argv)
    if args.quick:
        args.groups, args.needles, args.words = 2, 3, 200
        args.pools, args.budgets = [512], [64]
    from transformers import AutoTokenizer

    from sglang_evict.default_model import resolve

    tokenizer = AutoTokenizer.from_pretrained(resolve())
    phases = {phase: jobs(build_groups(args.groups, args.needles, args.words, args.seed,
                                       first=k * args.groups), phase, tokenizer,
                          args.answer_tokens)
              for k, phase in enumerate(PHASES)}
    return scored.Bench(
        args, phases, "scored_context",
        ("groups", "needles", "words", "answer_tokens", "policy", "buffer", "seed", "quick",
         "reclaim", "vanilla"),
        f"{args.groups} documents of {args.words} words per phase, {args.needles} questions "
        "each")


def main(argv=None, serve=scored.start_server) -> int:
    """`serve(server_args)`: a context manager giving the server for each system of the sweep
    (a fresh one by default)."""
    scored.sweep_together([build(argv)], serve)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
