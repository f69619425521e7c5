"""RULER quality vs KV budget through a real sglang-evict server.

One server with head-granular eviction; every request picks its policy and budget through
`custom_params.sglang_evict`, so all policies see the same prompts on the same server:

    full                 policy none (every head-slot kept)
    retention-global     DBTrimKV: one budget L*H*M per request, scored by the retention gates
    retention            TrimKV: M per (layer, head)
    streaming / random / knorm   training-free baselines under the same global budget

Prompts are RULER's (nvidia-long-context-eval generators, held-out eval split, the default
model's tokenizer and chat template), scored with RULER's metrics. Results: one JSON with every
prediction and the per-cell mean with a 95% bootstrap interval, and a PNG (score vs M per
length). No request may be squeezed by another: the pool is sized so that cross-request reclaim
never happens, and the run fails if it does.

    .venv/bin/python bench/ruler.py --gates init --lengths 2048 4096 --n 5 \
        --out bench/results/ruler_untrained.json

New gates change only the retention cells: `--reuse EARLIER.json` takes the full-cache and
baseline rows (which do not read the gates) from an earlier run on the same prompts (the same
task, length, index and expected answers, and the same buffer and server settings) and
measures the rest.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import hashlib
import json
import sys
import time
from pathlib import Path

import numpy as np
import client
from intervals import bootstrap_ci
from tqdm import tqdm

BASELINE = "full"
POLICIES = ("retention-global", "retention", "streaming", "random", "knorm")
# The cells whose requests never read the gates' scores.
GATE_FREE = (BASELINE, "streaming", "random", "knorm")
GATED = ("retention-global", "retention")
DEFAULT_TASKS = ("niah_single_1", "niah_multikey_1", "niah_multivalue", "vt")


def write_init_gates(model_path: Path, out: Path) -> Path:
    """Gates as initialised for training (bias 10: beta ~ 1, nothing decays yet): the untrained
    reference."""
    import torch

    from sglang_evict.gates.checkpoint import save_gates
    from sglang_evict.gates.modules import GateConfig, RetentionGates

    hf = json.loads((model_path / "config.json").read_text())
    gates = RetentionGates(GateConfig.from_hf_config(hf, gate_hidden=64, shared_projection=True))
    with torch.no_grad():
        gates.reset_parameters(torch.Generator().manual_seed(0))
    save_gates(out, gates, extra={"note": "untrained (initialisation)"})
    return out


def cells(policies, budgets):
    yield BASELINE, None
    for p in policies:
        for m in budgets:
            yield p, m


def override(policy: str, budget: int | None, buffer: int) -> dict:
    """A cell's request settings. "retention-global+la1" is retention-global scored with
    lookahead 1 ((t + 1 - pos) log beta)."""
    if policy == BASELINE:
        return {"policy": "none"}
    name, _, lookahead = policy.partition("+la")
    fields = {"policy": name, "budget": budget, "buffer": buffer}
    if lookahead:
        fields["lookahead"] = int(lookahead)
    return fields


def reads_gates(policy: str) -> bool:
    """Whether a cell's requests are scored by the gates ("retention-global+la1" too)."""
    return policy.partition("+la")[0] in GATED


def cell_key(sample: dict, policy: str, budget: int | None) -> tuple:
    """One request's identity: (task, length, index, policy, budget). Rows carry all five."""
    return (sample["task"], sample["length"], sample["index"], policy, budget)


def reusable_rows(path: Path, samples: list[dict], grid: list, buffer: int,
                  server_args: list[str]) -> dict[tuple, dict]:
    """The gate-free rows of an earlier run that this run would measure again, keyed by
    (task, length, index, policy, budget). Refused unless the earlier run used the same buffer
    and server settings (gates aside) and every reused prompt has the same expected answers."""
    earlier = json.loads(Path(path).read_text())

    def without_gates(argv: list[str]) -> list[str]:
        i = argv.index("--evict-gates")
        return argv[:i] + argv[i + 2:]

    if earlier["buffer"] != buffer or without_gates(earlier["server_args"]) != without_gates(server_args):
        raise SystemExit(f"--reuse {path}: it ran with other server settings "
                         f"({earlier['server_args']}, buffer {earlier['buffer']})")
    by_key = {cell_key(r, r["policy"], r["budget"]): r for r in earlier["rows"]}
    wanted = {(p, m) for p, m in grid if p in GATE_FREE}
    reused = {}
    for s in samples:
        for p, m in wanted:
            key = cell_key(s, p, m)
            row = by_key.get(key)
            if row is None:
                continue
            if row["outputs"] != s["outputs"]:
                raise SystemExit(f"--reuse {path}: {s['task']}@{s['length']} #{s['index']} "
                                 "is another prompt there (other expected answers)")
            reused[key] = row
    return reused


def server_args_for(gates: str, budgets, buffer: int, pool: int, concurrency: int,
                    chunk: int) -> list[str]:
    """One server for every cell: retention-global at the largest budget; each request sets its
    own policy, budget, buffer (and lookahead) through custom_params, the full cache included
    (policy none, which the operator switch must allow)."""
    return [
        "--evict-policy", "retention-global", "--evict-gates", gates, "--evict-overrides", "any",
        "--evict-budget", str(max(budgets)), "--evict-buffer", str(buffer),
        "--disable-radix-cache", "--max-total-tokens", str(pool),
        "--max-running-requests", str(concurrency),
        "--chunked-prefill-size", str(chunk),
    ]


def serve_rows(server, jobs: list, buffer: int, concurrency: int) -> list[dict]:
    """Run (sample, policy, budget) jobs on a started server; one scored row each. Refused if
    any request lost head-slots to another (the pool must not squeeze anyone)."""
    from sglang_evict.training.data import score_sample

    def one(job):
        sample, policy, budget = job
        body = client.generate(server.url, sample["input"], sample["tokens_to_generate"],
                               ignore_eos=False, evict=override(policy, budget, buffer),
                               timeout=3600)
        meta = body["meta_info"]["sglang_evict"]
        return {
            "task": sample["task"], "length": sample["length"], "index": sample["index"],
            "policy": policy, "budget": budget, "prediction": body["text"],
            "outputs": sample["outputs"],
            "score": score_sample(sample["task"], body["text"], sample["outputs"]),
            "prompt_tokens": body["meta_info"]["prompt_tokens"],
            "live_head_slots": meta["live_head_slots"],
            "full_head_slots": meta["full_head_slots"],
            "peak_live_head_slots": meta["peak_live_head_slots"],
            "reclaimed_head_slots": meta["reclaimed_head_slots"],
            "kv_kept_fraction": meta["live_head_slots"] / meta["full_head_slots"],
        }

    with cf.ThreadPoolExecutor(concurrency) as ex:
        rows = list(tqdm(ex.map(one, jobs), total=len(jobs), desc="sglang-evict requests"))
    squeezed = [r for r in rows if r["reclaimed_head_slots"]]
    if squeezed:
        raise SystemExit(
            f"{len(squeezed)} requests lost head-slots to others (pool too small); "
            "raise --pool or lower --concurrency"
        )
    return rows


def summarize(rows: list[dict], lengths, grid, tasks) -> list[dict]:
    """Per (length, policy, budget): mean score, 95% bootstrap interval, KV kept, per task."""
    summary = []
    for length in lengths:
        for policy, budget in grid:
            sel = [r for r in rows if r["length"] == length and r["policy"] == policy
                   and r["budget"] == budget]
            if not sel:
                continue
            scores = [r["score"] for r in sel]
            lo, hi = bootstrap_ci(scores)
            summary.append({
                "length": length, "policy": policy, "budget": budget, "n": len(sel),
                "score": float(np.mean(scores)), "ci95": [lo, hi],
                "kv_kept_fraction": float(np.mean([r["kv_kept_fraction"] for r in sel])),
                "per_task": {t: float(np.mean([r["score"] for r in sel if r["task"] == t]))
                             for t in tasks if any(r["task"] == t for r in sel)},
            })
    return summary


def run(args) -> dict:
    from sglang_evict import default_model
    from sglang_evict.server_process import ServerProcess
    from sglang_evict.training.data import build_eval_set

    model = default_model.resolve()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    gates = args.gates
    if gates == "init":
        gates = str(write_init_gates(model, out.with_suffix(".init_gates.safetensors")))

    samples = []
    for length in args.lengths:
        for task in args.tasks:
            samples += build_eval_set(task, length, args.n)
    grid = list(cells(args.policies, args.budgets))
    jobs = [(s, p, m) for s in samples for p, m in grid]
    pool = args.pool or max(args.lengths) * (args.concurrency + 1)
    server_args = server_args_for(gates, args.budgets, args.buffer, pool, args.concurrency,
                                  args.chunk)
    reused = reusable_rows(Path(args.reuse), samples, grid, args.buffer, server_args) if args.reuse else {}
    jobs = [j for j in jobs if cell_key(*j) not in reused]
    print(f"{len(samples)} prompts x {len(grid)} cells: {len(jobs)} requests, {len(reused)} rows "
          f"reused from {args.reuse}; pool {pool} tokens", flush=True)

    t0 = time.time()
    with ServerProcess(server_args, log_path=out.with_suffix(".server.log")) as server:
        started = time.time() - t0
        rows = serve_rows(server, jobs, args.buffer, args.concurrency)
    rows += [dict(r, reused_from=str(args.reuse)) for r in reused.values()]
    for r in rows:  # rows of runs before kv_kept_fraction was a row field
        r.setdefault("kv_kept_fraction", r["live_head_slots"] / r["full_head_slots"])
    result = {
        "benchmark": "ruler", "gates": args.gates,
        "gates_sha256": hashlib.sha256(Path(gates).read_bytes()).hexdigest(),
        "tasks": list(args.tasks),
        "lengths": list(args.lengths), "n_per_task": args.n, "buffer": args.buffer,
        "reused_from": args.reuse, "reused_rows": len(reused),
        "server_args": server_args, "server_start_s": started,
        "wall_s": time.time() - t0,
        "summary": summarize(rows, args.lengths, grid, args.tasks), "rows": rows,
    }
    out.write_text(json.dumps(result, indent=1))
    plot(result, out.with_suffix(".png"))
    print_table(result)
    return result


def plot(result: dict, path: Path) -> None:
    """Score vs M per system, one panel per length: gated policies thick, peers (kvpress)
    dashed, the full cache a dotted line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lengths = result["lengths"]
    fig, axes = plt.subplots(1, len(lengths), figsize=(6 * len(lengths), 4.5), squeeze=False)
    for ax, length in zip(axes[0], lengths):
        rows = [s for s in result["summary"] if s["length"] == length]
        for policy in sorted({s["policy"] for s in rows if s["budget"] is not None}):
            pts = sorted((s["budget"], s["score"]) for s in rows if s["policy"] == policy)
            ax.plot([p[0] for p in pts], [p[1] for p in pts],
                    "--" if policy.startswith("kvpress:") else "-", marker="o",
                    lw=2.5 if reads_gates(policy) else 1.2, label=policy)
        full = [s["score"] for s in rows if s["policy"] == BASELINE]
        if full:
            ax.axhline(full[0], color="k", linestyle=":", label="full cache")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("budget M (KV entries per layer and KV head, + buffer B)")
        ax.set_ylabel("RULER score")
        ax.set_ylim(-0.02, 1.02)
        ax.set_title(f"{length} tokens, gates: {Path(str(result['gates'])).name}", fontsize=9)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def print_table(result: dict) -> None:
    print("| length | policy | M | n | score | 95% CI | KV kept |")
    print("|---|---|---|---|---|---|---|")
    for s in result["summary"]:
        lo, hi = s["ci95"]
        print(f"| {s['length']} | {s['policy']} | {s['budget'] or '-'} | {s['n']} | "
              f"{s['score']:.3f} | [{lo:.2f}, {hi:.2f}] | {s['kv_kept_fraction']:.1%} |")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--gates", required=True, help="gate checkpoint, or 'init' for untrained gates")
    p.add_argument("--lengths", type=int, nargs="+", default=[2048, 4096])
    p.add_argument("--tasks", nargs="+", default=list(DEFAULT_TASKS))
    p.add_argument("--n", type=int, default=5, help="samples per task and length")
    p.add_argument("--policies", nargs="+", default=["retention-global", "streaming", "random"],
                   choices=POLICIES)
    p.add_argument("--budgets", type=int, nargs="+", default=[64, 128, 256, 512])
    p.add_argument("--buffer", type=int, default=32)
    p.add_argument("--concurrency", type=int, default=3)
    p.add_argument("--chunk", type=int, default=1024, help="--chunked-prefill-size")
    p.add_argument("--pool", type=int, default=None, help="--max-total-tokens (physical)")
    p.add_argument("--reuse", default=None, metavar="EARLIER.json",
                   help="take the gate-free rows (full cache, baselines) from an earlier run")
    p.add_argument("--out", required=True)
    run(p.parse_args(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
