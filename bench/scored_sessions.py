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
import concurrent.futures as cf
import json
import random
import re
import time
from pathlib import Path

import client
import requests
from intervals import bootstrap_ci

FACT = "Please remember this for later: the secret code for the {key} is {value}."
PASSAGE = "Here is a passage from an essay I am reading:\n\n{text}\n\nWhat do you make of it?"
ASK = ("Earlier in our conversation I told you some secret codes. What is the secret code for "
       "the {key}? Answer with the number only.")


def build_sessions(n: int, facts: int, passages: int, words: int, asks: int, seed: int,
                   tokenizer_path: str | None = None) -> list[dict]:
    """`n` sessions of the eval split: each a list of user turns and, per scored turn, the
    digits its reply must contain."""
    from sglang_evict.training.data.ruler_builders import draw_in_split, essay_window
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
            keys: list[str] = []
            while len(keys) < facts:
                k = key_space[rng.randrange(len(key_space))]
                if k not in keys:
                    keys.append(k)
            values = [draw_in_split(rng, lambda r: str(r.randint(10**6, 10**7 - 1)), "eval")
                      for _ in keys]
            text = essay_window(s, "eval", rng, passages * words)
            turns = [FACT.format(key=k, value=v) for k, v in zip(keys, values)]
            turns += [PASSAGE.format(text=" ".join(text[j * words:(j + 1) * words]))
                      for j in range(passages)]
            asked = rng.sample(range(facts), asks)
            scored = {len(turns) + j: values[a] for j, a in enumerate(asked)}
            turns += [ASK.format(key=keys[a]) for a in asked]
            out.append({"index": i, "turns": turns, "scored": scored})
    return out


def is_right(reply: str, digits: str) -> bool:
    """The reply states the digits (as a number of its own, not inside a longer one)."""
    return re.search(rf"(?<!\d){digits}(?!\d)", reply) is not None


def run_session(url: str, tokenizer, session: dict, new_tokens: int,
                answer_tokens: int) -> list[dict]:
    """Every turn of one session, each resending the conversation so far; a failed turn ends
    the session."""
    messages: list[dict] = []
    out = []
    for t, user in enumerate(session["turns"]):
        messages.append({"role": "user", "content": user})
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        scored = session["scored"].get(t)
        try:
            got = client.stream(url, ids, answer_tokens if scored else new_tokens,
                                ignore_eos=False, timeout=3600)
        except requests.RequestException:
            got = None
        done = time.perf_counter()
        if got is None or not got.ok:
            out.append({"ok": False, "scored": scored is not None, "right": False})
            break
        reply = tokenizer.decode(got.output_ids, skip_special_tokens=True)
        messages.append({"role": "assistant", "content": reply})
        meta = got.meta_info
        out.append({"ok": True, "scored": scored is not None,
                    "right": scored is not None and is_right(reply, scored),
                    "latency": done - got.sent, "ttft": got.arrivals[0] - got.sent,
                    "prompt": meta["prompt_tokens"], "cached": meta.get("cached_tokens", 0),
                    "completion": meta["completion_tokens"],
                    **({"reply": reply, "expected": scored} if scored else {})})
    # a turn never sent (the session ended early) counts as a wrong answer where it was scored
    sent = len(out)
    out += [{"ok": False, "scored": t in session["scored"], "right": False, "unsent": True}
            for t in range(sent, len(session["turns"]))]
    return out


def _pct(values: list[float], q: float) -> float | None:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))] if values else None


def run_server(name: str, sargs: list[str], sessions: list[dict], tokenizer, args) -> dict:
    from sglang_evict.server_process import ServerProcess

    print(f"{name}: {' '.join(sargs)}", flush=True)
    with ServerProcess(sargs, startup_timeout=900) as srv:
        t0 = time.perf_counter()
        with cf.ThreadPoolExecutor(len(sessions)) as pool:
            runs = list(pool.map(lambda s: run_session(
                srv.url, tokenizer, s, args.new_tokens, args.answer_tokens), sessions))
        wall = time.perf_counter() - t0
        log = srv.log_path.read_text(errors="replace")
    turns = [t for run in runs for t in run]
    done = [t for t in turns if t["ok"]]
    scored = [float(t["right"]) for t in turns if t["scored"]]
    lo, hi = bootstrap_ci(scored)
    running = [int(n) for n in re.findall(r"Decode batch.*?#running-req: (\d+)", log)]
    result = {
        "server_args": sargs,
        "accuracy": sum(scored) / len(scored), "accuracy_ci95": [lo, hi],
        "scored_turns": len(scored), "right": int(sum(scored)),
        "requests": len(done), "failed": len(turns) - len(done), "wall_s": wall,
        "requests_per_s": len(done) / wall,
        "output_tokens_per_s": sum(t["completion"] for t in done) / wall,
        "latency_p50_s": _pct([t["latency"] for t in done], 0.5),
        "latency_p99_s": _pct([t["latency"] for t in done], 0.99),
        "ttft_p50_s": _pct([t["ttft"] for t in done], 0.5),
        "ttft_p99_s": _pct([t["ttft"] for t in done], 0.99),
        "prefix_hit_rate": sum(t["cached"] for t in done) / max(1, sum(t["prompt"] for t in done)),
        "max_running": max(running) if running else 0,
        "retractions": log.count("KV cache pool is full. Retract requests."),
        "answers": [{"reply": t["reply"], "expected": t["expected"], "right": t["right"]}
                    for t in done if t["scored"]],
    }
    print(json.dumps({name: {k: v for k, v in result.items() if k != "answers"}}), flush=True)
    return result


def systems(pools: list[int], budgets: list[int], args) -> list[dict]:
    """The sweep's servers: vanilla at every pool, then eviction at every pool and budget."""
    out = []
    for pool in pools:
        common = ["--max-total-tokens", str(pool), "--enable-cache-report",
                  "--decode-log-interval", "1"]
        out.append({"name": f"vanilla pool={pool}", "system": "vanilla", "pool": pool,
                    "budget": None, "args": common})
        for m in budgets:
            out.append({"name": f"{args.policy} M={m} pool={pool}", "system": f"{args.policy} "
                        f"M={m}", "pool": pool, "budget": m, "args": common + [
                            "--evict-policy", args.policy, "--evict-budget", str(m),
                            "--evict-buffer", str(args.buffer)]})
    return out


def matched_vanilla(results: list[dict]) -> None:
    """For each eviction point: the smallest vanilla pool whose accuracy reaches its accuracy
    (None if no vanilla pool of the sweep does), and its requests/s against that pool's."""
    vanilla = sorted((r for r in results if r["budget"] is None), key=lambda r: r["pool"])
    for r in results:
        if r["budget"] is None:
            continue
        match = next((v for v in vanilla if v["accuracy"] >= r["accuracy"]), None)
        r["vanilla_pool_at_same_accuracy"] = match["pool"] if match else None
        r["memory_share_of_that_pool"] = r["pool"] / match["pool"] if match else None
        r["requests_per_s_over_that_pool"] = (
            r["requests_per_s"] / match["requests_per_s"] if match else None)


def plot(results: list[dict], out: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
    for system in dict.fromkeys(r["system"] for r in results):
        rows = sorted((r for r in results if r["system"] == system), key=lambda r: r["pool"])
        pools = [r["pool"] for r in rows]
        acc = [r["accuracy"] for r in rows]
        err = [[a - r["accuracy_ci95"][0] for a, r in zip(acc, rows)],
               [r["accuracy_ci95"][1] - a for a, r in zip(acc, rows)]]
        axes[0].errorbar(pools, acc, yerr=err, marker="o", capsize=3, label=system)
        axes[1].plot(pools, [r["requests_per_s"] for r in rows], marker="o", label=system)
    for ax, label in zip(axes, ("accuracy of scored turns", "requests/s")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("KV pool (tokens at full size)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].set_ylim(-0.05, 1.05)
    axes[1].legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--sessions", type=int, default=12)
    p.add_argument("--facts", type=int, default=2)
    p.add_argument("--passages", type=int, default=3)
    p.add_argument("--words", type=int, default=60, help="words per essay passage")
    p.add_argument("--asks", type=int, default=2, help="scored turns per session")
    p.add_argument("--new-tokens", type=int, default=32, help="reply length of other turns")
    p.add_argument("--answer-tokens", type=int, default=32)
    p.add_argument("--pools", type=int, nargs="+", default=[1024, 2048, 8192])
    p.add_argument("--budgets", type=int, nargs="+", default=[128])
    p.add_argument("--policy", default="retention-global")
    p.add_argument("--buffer", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
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
    results = []
    for spec in systems(args.pools, args.budgets, args):
        result = run_server(spec["name"], spec["args"], sessions, tokenizer, args)
        results.append({k: spec[k] for k in ("name", "system", "pool", "budget")} | result)
    matched_vanilla(results)
    report = {"benchmark": "scored_sessions", "settings": {
        k: getattr(args, k) for k in ("sessions", "facts", "passages", "words", "asks",
                                      "new_tokens", "answer_tokens", "policy", "buffer", "seed",
                                      "quick")}, "servers": results}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1))
    plot(results, out.with_suffix(".png"), f"{args.sessions} scored sessions, "
         f"{args.facts} facts, {args.passages} passages, {args.asks} asks each")
    for r in results:
        ci = r["accuracy_ci95"]
        print(f"{r['name']:>36}: accuracy {r['accuracy']:.2f} [{ci[0]:.2f}, {ci[1]:.2f}], "
              f"{r['requests_per_s']:.2f} req/s, hit {r['prefix_hit_rate']:.2f}, "
              f"retractions {r['retractions']}, failed {r['failed']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
