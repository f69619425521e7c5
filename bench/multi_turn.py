"""Multi-turn agent sessions with the radix cache on: vanilla SGLang vs sglang-evict at the same KV
memory, servers one after the other in one run on one machine.

S sessions run concurrently; each sends T turns, every turn resends its whole history plus a new
user message (U tokens) and generates G tokens (greedy, ignore_eos). The pool (--pool tokens at
full size, the same for both servers) holds a fraction of what the sessions' histories need at
full size (--fraction, default a quarter). Reported per server: requests/s and output tokens/s
over the whole run, p50/p99 request latency, prompt tokens served from the radix cache (hit
rate), the largest number of requests running together (from the server log), retractions and
failed requests.

    .venv/bin/python -P bench/multi_turn.py --out bench/results/multi_turn.json
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import random
import re
import statistics
import sys
import time
from pathlib import Path

import requests
sys.path.insert(0, str(Path(__file__).resolve().parent))  # run with -P: bench/ is not on it
from server_plot import plot_servers  # noqa: E402


def session(url: str, seed: int, turns: int, user_tokens: int, new_tokens: int) -> list[dict]:
    rng = random.Random(seed)
    history: list[int] = []
    out = []
    for _ in range(turns):
        history = history + [rng.randrange(1000, 20000) for _ in range(user_tokens)]
        t0 = time.perf_counter()
        try:
            r = requests.post(url + "/generate", json={
                "input_ids": history,
                "sampling_params": {"temperature": 0, "max_new_tokens": new_tokens,
                                    "ignore_eos": True},
            }, timeout=3600)
            ok = r.status_code == 200
        except requests.RequestException:
            ok = False
        latency = time.perf_counter() - t0
        if not ok:
            out.append({"ok": False, "latency": latency})
            break
        body = r.json()
        meta = body["meta_info"]
        out.append({"ok": True, "latency": latency, "prompt": meta["prompt_tokens"],
                    "cached": meta.get("cached_tokens", 0),
                    "completion": meta["completion_tokens"]})
        history = history + body["output_ids"]
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
    lat = sorted(r["latency"] for r in done)
    running = [int(m) for m in re.findall(r"#running-req: (\d+)", log)]
    result = {
        "server_args": sargs,
        "requests": len(done),
        "failed": len(reqs) - len(done),
        "wall_s": wall,
        "requests_per_s": len(done) / wall,
        "output_tokens_per_s": sum(r["completion"] for r in done) / wall,
        "latency_p50_s": statistics.median(lat) if lat else None,
        "latency_p99_s": lat[min(len(lat) - 1, int(0.99 * len(lat)))] if lat else None,
        "prefix_hit_rate": (sum(r["cached"] for r in done) / max(1, sum(r["prompt"] for r in done))),
        "max_running": max(running) if running else 0,
        "retractions": log.count("KV cache pool is full. Retract requests."),
    }
    print(json.dumps({name: result}), flush=True)
    return result


def plot(results: dict, out: Path) -> None:
    plot_servers(results["servers"], {
        "requests_per_s": "requests/s", "output_tokens_per_s": "output tokens/s",
        "latency_p99_s": "p99 latency (s)", "prefix_hit_rate": "prefix hit rate",
        "max_running": "most running"},
        f"{results['sessions']} sessions x {results['turns']} turns, pool "
        f"{results['pool_tokens']} tokens", out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--sessions", type=int, default=8)
    p.add_argument("--turns", type=int, default=8)
    p.add_argument("--user-tokens", type=int, default=48)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--fraction", type=float, default=0.25,
                   help="the pool as a share of the sessions' full-size histories")
    p.add_argument("--policy", default="retention-global")
    p.add_argument("--budget", type=int, default=32)
    p.add_argument("--buffer", type=int, default=16)
    p.add_argument("--out", default="bench/results/multi_turn.json")
    args = p.parse_args(argv)
    full = args.sessions * args.turns * (args.user_tokens + args.new_tokens)
    pool = max(int(full * args.fraction), args.turns * (args.user_tokens + args.new_tokens) + 64)
    common = ["--max-total-tokens", str(pool), "--enable-cache-report"]
    servers = {
        "vanilla": common,
        f"{args.policy} M={args.budget}": common + [
            "--evict-policy", args.policy, "--evict-budget", str(args.budget),
            "--evict-buffer", str(args.buffer)],
    }
    results = {"sessions": args.sessions, "turns": args.turns, "user_tokens": args.user_tokens,
               "new_tokens": args.new_tokens, "full_size_tokens": full, "pool_tokens": pool,
               "servers": {name: run_server(name, sargs, args) for name, sargs in servers.items()}}
    names = list(results["servers"])
    base, ours = (results["servers"][n] for n in names)
    results["ratio_requests_per_s"] = ours["requests_per_s"] / base["requests_per_s"]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    plot(results, out.with_suffix(".png"))
    print(f"{names[1]} / vanilla requests/s: {results['ratio_requests_per_s']:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
