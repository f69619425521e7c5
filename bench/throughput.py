"""Output throughput of long generations under a fixed small KV pool: eviction vs vanilla SGLang.

The same workload (R concurrent requests, each generating G tokens with ignore_eos) runs on
servers with the same physical KV memory (--max-total-tokens P), one after the other in one
run:

    vanilla     SGLang's own pool and torch_native attention (requests beyond the pool are
                queued or retracted and recomputed)
    none        the sglang_evict backend holding every head-slot (the backend's own cost)
    <policy>    the sglang_evict backend evicting to budget M (all R requests fit at once)

Reported per server: wall time, output tokens/s, SGLang's retraction count (from its log), and
the ratio to vanilla measured in this run.

    .venv/bin/python bench/throughput.py --out bench/results/throughput.json
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import sys
import time
from pathlib import Path

import client
import figures
from tqdm import tqdm


def workload(server, prompts, new_tokens, concurrency):
    def one(text):
        return client.generate(server.url, text, new_tokens)["meta_info"]

    t0 = time.perf_counter()
    with cf.ThreadPoolExecutor(concurrency) as ex:
        metas = list(tqdm(ex.map(one, prompts), total=len(prompts), desc=f"  {server.url}"))
    return time.perf_counter() - t0, metas


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--pool", type=int, default=512, help="--max-total-tokens (physical)")
    p.add_argument("--requests", type=int, default=8)
    p.add_argument("--new-tokens", type=int, default=512)
    p.add_argument("--policy", default="streaming")
    p.add_argument("--budget", type=int, default=32)
    p.add_argument("--buffer", type=int, default=16)
    p.add_argument("--gates", default=None, help="needed by the retention policies")
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    from sglang_evict.server_process import ServerProcess

    prompts = [f"Request {i}: write a long story about a lighthouse keeper." for i in range(args.requests)]
    common = ["--disable-radix-cache", "--max-total-tokens", str(args.pool),
              "--max-running-requests", str(args.requests)]
    evict = ["--evict-policy", args.policy, "--evict-budget", str(args.budget),
             "--evict-buffer", str(args.buffer)]
    if args.gates:
        evict += ["--evict-gates", args.gates]
    servers = {
        "vanilla": common,
        "none": common + ["--evict-policy", "none"],
        args.policy: common + evict,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    results = {}
    for name, sargs in servers.items():
        log = out.with_suffix(f".{name}.log")
        print(f"{name}: {' '.join(sargs)}", flush=True)
        with ServerProcess(sargs, log_path=log) as server:
            wall, metas = workload(server, prompts, args.new_tokens, args.requests)
        text = log.read_text(errors="replace")
        tokens = sum(m["completion_tokens"] for m in metas)
        results[name] = {
            "server_args": sargs,
            "wall_s": wall,
            "output_tokens": tokens,
            "output_tokens_per_s": tokens / wall,
            "retraction_events": text.count(figures.RETRACTION),
            "request_retractions": sum(m.get("num_retractions", 0) for m in metas),
            "finish_reasons": sorted({m["finish_reason"]["type"] for m in metas}),
        }
        print(json.dumps(results[name]), flush=True)
    base = results["vanilla"]["output_tokens_per_s"]
    for r in results.values():
        r["ratio_to_vanilla"] = r["output_tokens_per_s"] / base
    report = {"benchmark": "throughput", "pool_tokens": args.pool, "requests": args.requests,
              "new_tokens": args.new_tokens, "results": results}
    out.write_text(json.dumps(report, indent=1))
    print("| server | wall s | output tok/s | x vanilla | retraction events |")
    print("|---|---|---|---|---|")
    for name, r in results.items():
        print(f"| {name} | {r['wall_s']:.1f} | {r['output_tokens_per_s']:.2f} | "
              f"{r['ratio_to_vanilla']:.2f} | {r['retraction_events']} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
