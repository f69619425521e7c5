"""SGLang's own `bench_serving` with its generated-shared-prefix dataset: vanilla SGLang vs
sglang-evict at the same KV memory, servers one after the other in one run on one machine.

G groups of P requests; each group shares a system prompt of S tokens, each request adds a
question of Q tokens and generates O tokens (ignore_eos, as bench_serving sends). All requests
are sent at once (request rate inf). The pool (the same for both servers) holds a fraction
(--fraction, default a quarter) of the workload at full size with the prefixes shared:
G*S + G*P*(Q+O) tokens. Reported per server: bench_serving's request and output throughput,
p50/p99 TTFT and ITL and mean concurrency; from the server's log: the most requests running
together, the prefix hit rate (cached / prompt tokens over the prefill batches) and
retractions.

    .venv/bin/python bench/shared_prefix.py --out bench/results/shared_prefix.json
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import figures
from server_plot import plot_servers
from side_by_side import add_pair_arguments, pair_server_args, write_pair

KEEP = ("completed", "duration", "request_throughput", "output_throughput", "median_ttft_ms",
        "p99_ttft_ms", "median_itl_ms", "p99_itl_ms", "concurrency")


def run_server(name: str, sargs: list[str], args, model: str) -> dict:
    from sglang_evict.server_process import ServerProcess

    print(f"{name}: {' '.join(sargs)}", flush=True)
    with ServerProcess(sargs, startup_timeout=900) as srv, \
            tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "bench.jsonl"
        cmd = [sys.executable, "-m", "sglang.benchmark.serving", "--backend", "sglang",
               "--base-url", srv.url, "--model", model, "--tokenizer", model,
               "--dataset-name", "generated-shared-prefix",
               "--gsp-num-groups", str(args.groups),
               "--gsp-prompts-per-group", str(args.prompts_per_group),
               "--gsp-system-prompt-len", str(args.system_len),
               "--gsp-question-len", str(args.question_len),
               "--gsp-output-len", str(args.output_len), "--tokenize-prompt",
               "--request-rate", "inf", "--seed", str(args.seed), "--disable-tqdm",
               "--output-file", str(out)]
        subprocess.run(cmd, check=True, cwd=tmp)
        bench = json.loads(out.read_text().splitlines()[-1])
        log = srv.log_path.read_text(errors="replace")
    prefill = re.findall(r"Prefill batch.*?#new-token: (\d+), #cached-token: (\d+)", log)
    new, cached = (sum(int(p[i]) for p in prefill) for i in (0, 1))
    result = {k: bench.get(k) for k in KEEP}
    result.update({
        "server_args": sargs,
        "prefix_hit_rate": cached / max(1, new + cached),
        "prefill_tokens_computed": new,
        **figures.log_figures(log),
    })
    print(json.dumps({name: result}), flush=True)
    return result


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--groups", type=int, default=4)
    p.add_argument("--prompts-per-group", type=int, default=16)
    p.add_argument("--system-len", type=int, default=1024)
    p.add_argument("--question-len", type=int, default=64)
    p.add_argument("--output-len", type=int, default=32)
    add_pair_arguments(p, budget=64, what="the workload")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--out", default="bench/results/shared_prefix.json")
    args = p.parse_args(argv)
    from sglang_evict import default_model

    model = str(default_model.resolve())
    full = args.groups * (args.system_len
                          + args.prompts_per_group * (args.question_len + args.output_len))
    # at least one request at full size must fit, or vanilla could not serve at all
    pool = max(int(full * args.fraction),
               args.system_len + args.question_len + args.output_len + 64)
    servers = pair_server_args(pool, args)
    results = {"groups": args.groups, "prompts_per_group": args.prompts_per_group,
               "system_len": args.system_len, "question_len": args.question_len,
               "output_len": args.output_len, "full_size_tokens": full, "pool_tokens": pool,
               "servers": {n: run_server(n, s, args, model) for n, s in servers.items()}}
    names = list(results["servers"])
    out = write_pair(results, ("request_throughput", "output_throughput"), args.out)
    plot_servers(results["servers"], {
        "request_throughput": "requests/s", "output_throughput": "output tokens/s",
        "p99_ttft_ms": "p99 TTFT (ms)", "p99_itl_ms": "p99 ITL (ms)",
        "prefix_hit_rate": "prefix hit rate", "max_running": "most running"},
        f"bench_serving generated-shared-prefix, pool {pool} tokens "
        f"({args.fraction:.0%} of the workload)", out.with_suffix(".png"))
    print(f"{names[1]} / vanilla request throughput: {results['ratio_request_throughput']:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
