"""Multi-turn agent sessions with the radix cache on: vanilla SGLang vs sglang-evict at the same KV
memory, servers one after the other in one run on one machine.

S sessions run concurrently; each sends T turns, every turn resends its whole history plus a new
user message (U tokens) and generates G tokens (greedy, ignore_eos). The pool (--pool tokens at
full size, the same for both servers) holds a fraction of what the sessions' histories need at
full size (--fraction, default a quarter). Reported per server: requests/s and output tokens/s
over the whole run, p50/p99 request latency, prompt tokens served from the radix cache (hit
rate), p50/p99 time to first token and inter-token latency (requests are streamed), the largest
number of requests running together (from the server log), retractions and failed requests.

    .venv/bin/python bench/multi_turn.py --out bench/results/multi_turn.json
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import random
import time
from pathlib import Path

import client
import figures
import requests
from server_plot import plot_servers
from side_by_side import add_pair_arguments, pair_server_args, write_pair


def _streamed(url: str, input_ids: list[int], new_tokens: int) -> client.Streamed | None:
    """One streamed /generate, or None if it failed."""
    try:
        got = client.stream(url, input_ids, new_tokens, timeout=3600)
    except requests.RequestException:
        return None
    return got if got.ok else None


def session(url: str, seed: int, turns: int, user_tokens: int, new_tokens: int) -> list[dict]:
    rng = random.Random(seed)
    history: list[int] = []
    out = []
    for _ in range(turns):
        history = history + [rng.randrange(1000, 20000) for _ in range(user_tokens)]
        t0 = time.perf_counter()
        got = _streamed(url, history, new_tokens)
        latency = time.perf_counter() - t0
        if got is None:
            out.append({"ok": False, "latency": latency})
            break
        meta, arrivals = got.meta_info, got.arrivals
        out.append({"ok": True, "latency": latency, "prompt": meta["prompt_tokens"],
                    "cached": meta.get("cached_tokens", 0),
                    "completion": meta["completion_tokens"],
                    "ttft": arrivals[0] - t0,
                    "itl": [b - a for a, b in zip(arrivals, arrivals[1:])]})
        history = history + got.output_ids
    return out


def run_server(name: str, sargs: list[str], args) -> dict:
    from sglang_evict.server_process import ServerProcess

    print(f"{name}: {' '.join(sargs)}", flush=True)
    with ServerProcess(sargs, startup_timeout=900) as srv:
        t0 = time.perf_counter()
        with cf.ThreadPoolExecutor(args.sessions) as pool:
            runs = list(pool.map(
                lambda s: session(srv.url, s, args.turns, args.user_tokens, args.new_tokens),
                range(args.sessions)))
        wall = time.perf_counter() - t0
        log = srv.log_path.read_text(errors="replace")
    reqs = [r for run in runs for r in run]
    done = [r for r in reqs if r["ok"]]
    itl = [x for r in done for x in r["itl"]]
    result = {
        "server_args": sargs,
        "requests": len(done),
        "failed": len(reqs) - len(done),
        "wall_s": wall,
        **figures.request_figures(done, wall),
        "itl_p50_ms": 1000 * figures.percentile(itl, 0.5) if itl else None,
        "itl_p99_ms": 1000 * figures.percentile(itl, 0.99) if itl else None,
        **figures.log_figures(log),
    }
    print(json.dumps({name: result}), flush=True)
    return result


def plot(results: dict, out: Path) -> None:
    plot_servers(results["servers"], {
        "requests_per_s": "requests/s", "output_tokens_per_s": "output tokens/s",
        "latency_p99_s": "p99 latency (s)", "ttft_p99_s": "p99 TTFT (s)",
        "itl_p99_ms": "p99 ITL (ms)", "prefix_hit_rate": "prefix hit rate",
        "max_running": "most running"},
        f"{results['sessions']} sessions x {results['turns']} turns, pool "
        f"{results['pool_tokens']} tokens", out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--sessions", type=int, default=8)
    p.add_argument("--turns", type=int, default=8)
    p.add_argument("--user-tokens", type=int, default=48)
    p.add_argument("--new-tokens", type=int, default=32)
    add_pair_arguments(p, budget=32, what="the sessions' histories")
    p.add_argument("--out", default="bench/results/multi_turn.json")
    args = p.parse_args(argv)
    full = args.sessions * args.turns * (args.user_tokens + args.new_tokens)
    pool = max(int(full * args.fraction), args.turns * (args.user_tokens + args.new_tokens) + 64)
    servers = pair_server_args(pool, args)
    results = {"sessions": args.sessions, "turns": args.turns, "user_tokens": args.user_tokens,
               "new_tokens": args.new_tokens, "full_size_tokens": full, "pool_tokens": pool,
               "servers": {name: run_server(name, sargs, args) for name, sargs in servers.items()}}
    names = list(results["servers"])
    out = write_pair(results, ("requests_per_s",), args.out)
    plot(results, out.with_suffix(".png"))
    print(f"{names[1]} / vanilla requests/s: {results['ratio_requests_per_s']:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
