"""Scored multi-turn sessions with the radix cache on: how many requests a server answers and how
many of its answers are right, measured on one serving run.

S sessions (chats) run concurrently, built from the held-out split (RULER's multi-turn recall:
the keys, digits and essays of the eval split). Each session first plants F facts ("the secret
code for the <key> is <7 digits>"), then discusses P essay passages (W words each), then asks Q
of the facts back, one turn each. Every turn resends the whole conversation through the model's
chat template, the model's own replies included, so the radix cache serves each turn's history.
A scored turn is right when its reply contains the fact's digits.

A sweep runs its servers one after the other: vanilla SGLang at each pool (--pools, tokens at
full size) and sglang-evict at the same pools and each budget (--budgets). Per server: accuracy
of the scored turns with a 95% bootstrap interval, requests/s, output tokens/s, p50/p99 latency
and time to first token, prefix hit rate, most requests running, retractions and failures.
Plots: accuracy vs KV pool and requests/s vs KV pool, one line per system. For each eviction
point the table names the smallest vanilla pool that reaches its accuracy.

    .venv/bin/python bench/scored_sessions.py --out bench/results/scored_sessions.json
    .venv/bin/python bench/scored_sessions.py --quick --out /tmp/scored_quick.json   # < 5 min
"""

from __future__ import annotations

import argparse
import random

import scored

FACT = "Please remember this for later: the secret code for the {key} is {value}."
PASSAGE = "Here is a passage from an essay I am reading:\n\n{text}\n\nWhat do you make of it?"
ASK = ("Earlier in our conversation I told you some secret codes. What is the secret code for "
       "the {key}? Answer with the number only.")


def build_sessions(n: int, facts: int, passages: int, words: int, asks: int, seed: int,
                   tokenizer_path: str | None = None) -> list[dict]:
    """`n` sessions of the eval split: each a list of user turns and, per scored turn, the
    digits its reply must contain."""
    from sglang_evict.training.data.ruler_builders import essay_window
    from sglang_evict.training.data.ruler_scripts import ruler_scripts
    from sglang_evict.training.data.splits import sample_seed

    if asks > facts:
        raise SystemExit(f"--asks {asks} is more than --facts {facts}")
    s = ruler_scripts(tokenizer_path)
    out = []
    with s.lock:
        s.split = "eval"
        key_space = s.keys("eval")
        for i in range(n):
            rng = random.Random(sample_seed("eval", "scored_sessions", words, seed, i))
            keys, values = scored.draw_secrets(rng, key_space, facts)
            text = essay_window(s, "eval", rng, passages * words)
            turns = [FACT.format(key=k, value=v) for k, v in zip(keys, values)]
            turns += [PASSAGE.format(text=" ".join(text[j * words:(j + 1) * words]))
                      for j in range(passages)]
            asked = rng.sample(range(facts), asks)
            asks_at = {len(turns) + j: values[a] for j, a in enumerate(asked)}
            turns += [ASK.format(key=keys[a]) for a in asked]
            out.append({"index": i, "turns": turns, "scored": asks_at})
    return out


def run_session(url: str, tokenizer, session: dict, new_tokens: int,
                answer_tokens: int) -> list[dict]:
    """Every turn of one session, each resending the conversation so far; a failed turn ends
    the session, and a turn never sent counts as a wrong answer where it was scored."""
    messages: list[dict] = []
    out = []
    for t, user in enumerate(session["turns"]):
        messages.append({"role": "user", "content": user})
        expected = session["scored"].get(t)
        turn = scored.ask(url, tokenizer, messages, answer_tokens if expected else new_tokens,
                          expected)
        out.append(turn)
        if not turn["ok"]:
            break
        messages.append({"role": "assistant", "content": turn["reply"]})
    sent = len(out)
    out += [{"ok": False, "scored": t in session["scored"], "right": False, "unsent": True}
            for t in range(sent, len(session["turns"]))]
    return out


def build(argv=None) -> scored.Bench:
    """The bench's sweep from its command line."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--sessions", type=int, default=12)
    p.add_argument("--facts", type=int, default=2)
    p.add_argument("--passages", type=int, default=3)
    p.add_argument("--words", type=int, default=60, help="words per essay passage")
    p.add_argument("--asks", type=int, default=2, help="scored turns per session")
    p.add_argument("--new-tokens", type=int, default=32, help="reply length of other turns")
    p.add_argument("--answer-tokens", type=int, default=32)
    scored.add_sweep_args(p, pools=[1024, 2048, 8192], budgets=[128])
    p.add_argument("--quick", action="store_true",
                   help="4 sessions of 5 turns, one vanilla and one eviction server (< 5 min)")
    p.add_argument("--out", default="bench/results/scored_sessions.json")
    args = p.parse_args(argv)
    if args.quick:
        args.sessions, args.facts, args.passages, args.words, args.asks = 4, 2, 2, 60, 1
        args.pools, args.budgets = [512], [64]
    from transformers import AutoTokenizer

    from sglang_evict.default_model import resolve

    tokenizer = AutoTokenizer.from_pretrained(resolve())
    sessions = build_sessions(args.sessions, args.facts, args.passages, args.words, args.asks,
                              args.seed)
    jobs = [lambda url, s=s: run_session(url, tokenizer, s, args.new_tokens, args.answer_tokens)
            for s in sessions]
    return scored.Bench(
        args, {"sessions": jobs}, "scored_sessions",
        ("sessions", "facts", "passages", "words", "asks", "new_tokens", "answer_tokens",
         "policy", "buffer", "seed", "quick", "reclaim", "vanilla"),
        f"{args.sessions} scored sessions, {args.facts} facts, {args.passages} passages, "
        f"{args.asks} asks each")


def main(argv=None, serve=scored.start_server) -> int:
    """`serve(server_args)`: a context manager giving the server for each system of the sweep
    (a fresh one by default)."""
    scored.sweep_together([build(argv)], serve)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
